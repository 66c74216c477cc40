"""What one trial of a sweep reserves, and how many trials the cluster can hold at once.

A trial runs in cache mode: it reserves its driver (1 CPU); its Ray Train workers reserve their own placement
group, and Ray Data's tasks run outside both (on the cluster's free CPUs: ``data.decode_cpus`` per worker is
kept free for them). The default ``--max-concurrent`` counts trials against what the cluster can scale to
(:func:`cluster_capacity`), not only what is up when the sweep starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydistill.config import Config
from raydistill.pipeline.progress import log as progress_log

AUTOSCALER_CONFIG = "ray_bootstrap_config.yaml"


def log(message: str) -> None:
    progress_log(f"tune: {message}")


def trial_bundles(cfg: Config) -> list[dict[str, float]]:
    """The placement-group bundles of one trial: its driver's CPU, and nothing for the teacher.

    Trials run in cache mode: the teacher's dimension comes from the cache's manifest and the teacher is
    loaded nowhere, so a trial reserves none of the teacher pool's CPUs, GPUs or custom resources (``cfg``
    does not change the bundle). What the trial starts besides its driver needs no room in this group:

    * Train's workers are placed in a group of their own (Train V2's controller creates it), and a worker
      does not put its child tasks in it (Train schedules workers without ``capture_child_tasks``);
    * Ray Data's tasks, the driver's evaluation reads and each worker's epoch datasets, carry Data's own
      scheduling strategy (``SPREAD``, or ``DEFAULT`` for large arguments), and Ray puts only tasks without
      one in the caller's group: they run on the cluster's free CPUs, which :func:`default_max_concurrent`
      leaves them;
    * the Train controller, its synchronisation actor and raydistill's counters actor reserve no CPU and fit
      in the driver's bundle.
    """
    return [{"CPU": 1.0}]


@dataclass(frozen=True)
class NodeType:
    """Nodes of one kind that trials can use.

    Attributes:
        name: The node type's name (or a node's id on a fixed instance).
        resources: What one such node offers (``CPU``, ``GPU``, custom resources).
        count: The most such nodes at once; None: no limit.
    """

    name: str
    resources: dict[str, float]
    count: int | None


@dataclass(frozen=True)
class Capacity:
    """What the cluster can scale to: its node types, caps on summed resources, and where that came from."""

    node_types: list[NodeType]
    source: str
    max_resources: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        types = ", ".join(f"{t.name} x{'unlimited' if t.count is None else t.count}" for t in self.node_types)
        return f"{self.source}: {types}"


def cluster_capacity(connected: bool) -> Capacity:
    """What the Ray cluster this process is connected to can scale to, not only what is up now.

    Sources, first found wins:

    1. the cluster config an autoscaler reports to the GCS (node types with their resources and
       ``max_count``), which Ray Train and Ray Data read for the same question;
    2. the autoscaler's own config on the head, ``~/ray_bootstrap_config.yaml`` (``ray up`` writes it),
       read with the autoscaler's reader, when this process runs on the head of a cluster it connected to;
    3. the nodes up now (a fixed instance, or a cluster that reports neither).

    Args:
        connected: Whether the sweep connected to a running cluster (False: it started a local instance,
            whose nodes are all there is).
    """
    if connected:
        for found in (_reported_cluster_config(), _autoscaler_config_file(Path.home() / AUTOSCALER_CONFIG)):
            if found is not None:
                return found
    return _nodes_up_now()



def _reported_cluster_config() -> Capacity | None:
    """The node types an autoscaler reported to the GCS, or None where none did (a private Ray API)."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as err:  # a private API: a Ray upgrade may move it; the next source still answers
        log(f"could not read the cluster config from the GCS ({err}); trying the next source")
        return None
    if config is None or not config.node_group_configs:
        return None
    types = [NodeType(g.name, dict(g.resources), None if g.max_count == -1 else int(g.max_count))
             for g in config.node_group_configs if g.max_count != 0]
    return Capacity(types, "the cluster config the autoscaler reported", dict(config.max_resources))


def _autoscaler_config_file(path: Path) -> Capacity | None:
    """Node types and ``max_workers`` from the autoscaler's config file, when this process runs on the head."""
    import ray
    import yaml

    if not path.is_file():
        return None
    head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    if head != [ray.get_runtime_context().get_node_id()]:
        return None  # the file is the head's own: elsewhere it describes some other cluster
    try:
        return capacity_from_autoscaler_config(yaml.safe_load(path.read_text(encoding="utf-8")),
                                               f"the autoscaler's config {path}")
    except Exception as err:  # an unreadable file: fall back to the nodes up now, and say so
        log(f"could not read the autoscaler's config {path} ({err}); counting the nodes up now")
        return None


def capacity_from_autoscaler_config(raw: dict[str, Any], source: str) -> Capacity | None:
    """The node types of a cluster-launcher config (``clusters/aws.yaml``), as the autoscaler reads it.

    Each type counts up to its ``max_workers`` (the head's type one more, for the head); where the cluster-wide
    ``max_workers`` is below their sum, it bounds each type at its ``min_workers`` plus the nodes left to start.
    Ray's own reader fills in the launcher's defaults and validates the file; nothing is asked of the cloud.

    Returns:
        The capacity, or None for a config without ``available_node_types``.
    """
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    config = AutoscalingConfig(raw, skip_content_hash=True)
    configs = config.get_node_type_configs() or {}
    head_type = config.get_head_node_type()
    spare = config.get_max_num_worker_nodes()
    if spare is not None:
        spare -= sum(c.min_worker_nodes for name, c in configs.items() if name != head_type)
    types = []
    for name, c in configs.items():
        count = c.max_worker_nodes
        if spare is not None and name != head_type:
            count = min(count, c.min_worker_nodes + max(0, spare))
        if count:
            types.append(NodeType(name, dict(c.resources), count))
    return Capacity(types, source) if types else None


def _nodes_up_now() -> Capacity:
    """The alive nodes' resources (``node:*`` and other per-node markers left out)."""
    import ray

    types = [NodeType(n["NodeID"][:8], {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}, 1)
             for n in ray.nodes() if n["Alive"]]
    return Capacity(types, "the nodes up now")


def trial_demand(cfg: Config, gpus: bool) -> tuple[dict[str, float], dict[str, float]]:
    """One Train worker's bundle, and everything one trial needs at once (summed over its bundles).

    A trial needs its driver's bundle (:func:`trial_bundles`), ``train.num_workers`` worker bundles
    (``train.cpus_per_worker`` CPUs, one GPU each when the workers train on GPUs, ``train.resources_per_worker``)
    and, outside any reservation, ``data.decode_cpus`` per worker: one Ray Data task per worker at a time,
    so that its epochs' datasets are never starved.

    Args:
        gpus: Whether the cluster has GPUs (``train.use_gpu: auto`` then trains on them).
    """
    t = cfg.train
    worker = {"CPU": float(t.cpus_per_worker), **{k: float(v) for k, v in t.resources_per_worker.items()}}
    if t.use_gpu == "yes" or (t.use_gpu == "auto" and gpus):
        worker["GPU"] = 1.0
    total: dict[str, float] = {}
    for bundle in trial_bundles(cfg) + [worker] * t.num_workers + [{"CPU": cfg.data.decode_cpus}] * t.num_workers:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return worker, total


def default_max_concurrent(cfg: Config, capacity: Capacity, trials: int) -> int:
    """How many trials fit at once in what the cluster can scale to; at least 1, at most ``trials``.

    ``n`` trials fit when the node types hold ``n x train.num_workers`` whole worker bundles (a bundle sits
    on one node) and their summed resources (capped by ``capacity.max_resources``) cover ``n`` times what
    one trial needs (:func:`trial_demand`). A node type without a count limit fits any number.
    """
    gpus = any(t.resources.get("GPU", 0) > 0 for t in capacity.node_types)
    worker, per_trial = trial_demand(cfg, gpus)
    slots = sum(_times(t.count, _fits(t.resources, worker)) for t in capacity.node_types)
    fit = min(trials, slots // cfg.train.num_workers)
    for key, need in per_trial.items():
        total = sum(_times(t.count, t.resources.get(key, 0.0)) for t in capacity.node_types)
        total = min(total, capacity.max_resources.get(key, math.inf))
        fit = min(fit, total / need + 1e-9)
    return max(1, math.floor(fit))


def _fits(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many ``bundle`` one node with ``resources`` holds."""
    return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0)


def _times(count: int | None, amount: float) -> float:
    """``count`` nodes' worth of ``amount`` (no count limit: unlimited, unless there is none of it)."""
    if not amount:
        return 0.0
    return math.inf if count is None else count * amount
