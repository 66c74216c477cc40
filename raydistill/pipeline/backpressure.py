"""Ray Data's back-pressure as raydistill's budgeted pipelines use it (set by
:func:`raydistill.pipeline.plans.configure_data_context`).

Ray Data holds an operator's queue of finished blocks to a multiple (``downstream_capacity_backpressure_ratio``, 2)
of what the next operator has in flight, but only once the operator uses half its share of the pipeline's
budget, and that share includes a part of the budget every operator may draw on. Light rows read quickly
(a cache's ids, captions and embeddings) therefore queued ahead of decoding until they filled it: a quarter of a
million-image epoch, none of a small one. :class:`HeldQueues` applies the rule at any use of the budget, so how
far a stage reads ahead is a number of its consumer's inputs, the same at any dataset size.

The policy travels in the dataset's ``DataContext`` (Ray Data's ``backpressure_policies.enabled`` setting), so the
process that runs the pipeline applies it wherever that is: the driver, or the split coordinator actor a Train
worker reads its epoch through.
"""

from __future__ import annotations

from typing import Any

from ray.data._internal.execution.backpressure_policy import (
    ENABLED_BACKPRESSURE_POLICIES,
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    DownstreamCapacityBackpressurePolicy,
)

#: Ray's own setting of the threshold; a user who sets it keeps Ray's policy with their value.
THRESHOLD_ENV = "RAY_DATA_DOWNSTREAM_CAPACITY_OBJECT_STORE_BUDGET_UTIL_THRESHOLD"


class HeldQueues(DownstreamCapacityBackpressurePolicy):
    """Ray Data's downstream-capacity rule applied at any use of the operator's budget."""

    OBJECT_STORE_BUDGET_UTIL_THRESHOLD = 0.0


def hold_queues(ctx: Any) -> None:
    """Put :class:`HeldQueues` in place of Ray's downstream-capacity policy in ``ctx`` (a ``DataContext``)."""
    policies = ctx.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES)
    ctx.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                   [HeldQueues if p is DownstreamCapacityBackpressurePolicy else p for p in policies])


def release_queues(ctx: Any) -> None:
    """Put Ray's own downstream-capacity policy back in place of :class:`HeldQueues` in ``ctx``.

    For a pipeline behind a sort (``train.shuffle: global``): there the held queues stopped decoding after the
    epoch's first batch (a million-row epoch delivered one batch in two minutes, and 4,905 rows/s under Ray's
    own rule). The sort's exchange bounds what it holds by itself.
    """
    policies = ctx.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES)
    ctx.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                   [DownstreamCapacityBackpressurePolicy if p is HeldQueues else p for p in policies])
