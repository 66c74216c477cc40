"""Loss balancers: map ``{name: loss}`` to a weighted total and the weights used (DSMD's and baselines).

Every balancer is called as ``total, weights = balancer(losses)`` with the same names every step. The
weights are computed from the DETACHED loss values averaged across ranks (one all-reduce of n values), so
every rank applies identical weights; a NaN on one rank becomes NaN everywhere and every rank raises
together instead of some ranks hanging in the next collective. Weights carry no gradient (except the
learned log-variances of ``uncertainty``, whose gradient is the point).

State (step counter, previous losses, learned parameters) lives in ``state_dict()``: python numbers and
lists in the module's extra state, which ``torch.save(..., weights_only=True)`` can hold.

Kinds (see :func:`make_balancer`): ``dsmd``, ``dsmd_rate``, ``fixed``, ``dwa``, ``uncertainty``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from raydistill.method import distributed

LossDict = Mapping[str, torch.Tensor]


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names) if not isinstance(names, str) else (names,)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"balancer names must be a non-empty list of distinct strings, got {list(names)}")
    return names


def _global_values(kind: str, names: tuple[str, ...], losses: LossDict, step: int) -> list[float]:
    """Detached loss values in ``names`` order, averaged across ranks, checked finite."""
    if set(losses) != set(names):
        missing = [n for n in names if n not in losses]
        extra = [n for n in losses if n not in names]
        raise ValueError(f"balancer {kind!r} expects losses {list(names)}; missing {missing}, unexpected {extra}")
    for name in names:
        if losses[name].numel() != 1:
            raise ValueError(f"balancer {kind!r}: loss {name!r} must be a scalar, got shape {list(losses[name].shape)}")
    local = torch.stack([losses[name].detach().float().reshape(()) for name in names])
    values = distributed.all_reduce_mean(local).double().cpu().tolist()
    for name, value in zip(names, values):
        if not math.isfinite(value):
            raise FloatingPointError(f"balancer {kind!r}: loss {name!r} is {value} at balancer step {step}")
    return values


def _weighted_total(names: tuple[str, ...], losses: LossDict, weights: list[float]) -> torch.Tensor:
    return sum(weight * losses[name] for name, weight in zip(names, weights))


def _softmax(values: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in values]
    top = max(scaled)  # shift for numerical safety; the softmax is unchanged
    exps = [math.exp(v - top) for v in scaled]
    return [e / sum(exps) for e in exps]


class _StatefulBalancer(nn.Module):
    """Shared plumbing: names, step counter and python state carried in ``state_dict`` as extra state."""

    kind = ""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = _check_names(names)
        self.step = 0

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    def get_extra_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "step": self.step, **self._state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or list(state.get("names", [])) != list(self.names):
            raise ValueError(
                f"balancer state is for kind {state.get('kind')!r} with names {state.get('names')}; this balancer "
                f"is {self.kind!r} with names {list(self.names)}"
            )
        self.step = int(state["step"])
        self._load_state(state)


class DSMDBalancer(_StatefulBalancer):
    """The reference code's dynamic self-adaptive balancer, exactly as written (kind ``dsmd``).

    ``M = max_j L_j``, ``a_j = M / (L_j + ε)``, ``A_j = a_j L_j``; first step ``w_j = 1``; later
    ``r_j = A_j / (A_prev_j + ε)`` and ``w_j = k · softmax(r / T)_j · a_j``. Since every ``A_j`` is ``M``,
    the softmax is uniform and ``w_j = (k / n) M / L_j``: each weighted term equals ``(k / n) M``.

    Args:
        names: Loss names, in a fixed order.
        k: Scale of the weights.
        temperature: Softmax temperature T.
        eps: ε in the divisions.
    """

    kind = "dsmd"

    def __init__(self, names: Sequence[str], k: float = 10.0, temperature: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__(names)
        if not temperature > 0:
            raise ValueError(f"balancer {self.kind!r}: temperature must be > 0, got {temperature}")
        self.k, self.temperature, self.eps = float(k), float(temperature), float(eps)
        self.previous: list[float] | None = None

    def _state(self) -> dict[str, Any]:
        return {"previous": self.previous}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.previous = None if state["previous"] is None else [float(v) for v in state["previous"]]

    def _remembered(self, values: list[float], adjusted: list[float]) -> list[float]:
        """What the rate of the next step divides by: the magnitude-adjusted losses."""
        return adjusted

    def forward(self, losses: LossDict) -> tuple[torch.Tensor, dict[str, float]]:
        values = _global_values(self.kind, self.names, losses, self.step)
        largest = max(values)
        magnitude = [largest / (v + self.eps) for v in values]
        adjusted = [a * v for a, v in zip(magnitude, values)]
        current = self._remembered(values, adjusted)
        if self.previous is None:
            weights = [1.0] * len(values)
        else:
            rates = [c / (p + self.eps) for c, p in zip(current, self.previous)]
            weights = [self.k * s * a for s, a in zip(_softmax(rates, self.temperature), magnitude)]
        self.previous = current
        self.step += 1
        return _weighted_total(self.names, losses, weights), dict(zip(self.names, weights))


class DSMDRateBalancer(DSMDBalancer):
    """The evidently intended DSMD variant (kind ``dsmd_rate``): the rate uses the raw losses.

    As :class:`DSMDBalancer` but ``r_j = L_j / (L_prev_j + ε)``, so the softmax favours the losses that
    decrease slowest; the magnitude factor ``a_j = M / (L_j + ε)`` is kept. First step: all weights 1.
    """

    kind = "dsmd_rate"

    def _remembered(self, values: list[float], adjusted: list[float]) -> list[float]:
        return values


class FixedBalancer(_StatefulBalancer):
    """Constant weights (kind ``fixed``).

    Args:
        names: Loss names, in a fixed order.
        weights: ``{name: weight}`` covering every name, or a list in ``names`` order; default all 1.
    """

    kind = "fixed"

    def __init__(self, names: Sequence[str], weights: Mapping[str, float] | Sequence[float] | None = None) -> None:
        super().__init__(names)
        if weights is None:
            values = [1.0] * len(self.names)
        elif isinstance(weights, Mapping):
            if set(weights) != set(self.names):
                raise ValueError(
                    f"balancer 'fixed': weights keys {sorted(weights)} must be exactly the loss names "
                    f"{list(self.names)}"
                )
            values = [float(weights[name]) for name in self.names]
        else:
            values = [float(w) for w in weights]
            if len(values) != len(self.names):
                raise ValueError(
                    f"balancer 'fixed': {len(values)} weights given for {len(self.names)} losses {list(self.names)}"
                )
        if not all(math.isfinite(w) for w in values):
            raise ValueError(f"balancer 'fixed': weights must be finite, got {values}")
        self.weights = values

    def forward(self, losses: LossDict) -> tuple[torch.Tensor, dict[str, float]]:
        # The all-reduce is not needed for the weights, but it keeps the NaN check collective (see module doc).
        _global_values(self.kind, self.names, losses, self.step)
        self.step += 1
        return _weighted_total(self.names, losses, self.weights), dict(zip(self.names, self.weights))


class DWABalancer(_StatefulBalancer):
    """Dynamic Weight Average (Liu, Johns, Davison 2019), kind ``dwa``.

    At step t, ``w_j = K · softmax(r / T)_j`` with ``r_j = L_j(t-1) / (L_j(t-2) + ε)``, the losses of the
    two previous calls; the first two steps use ``w_j = 1``. The paper averages losses per epoch; here one
    call is one step, so the rule sees per-step values (averaged across ranks).

    Args:
        names: Loss names, in a fixed order.
        k: Sum of the weights K; default n (the number of losses).
        temperature: Softmax temperature T (2 in the paper).
        eps: Guard of the division (a loss of exactly 0).
    """

    kind = "dwa"

    def __init__(
        self, names: Sequence[str], k: float | None = None, temperature: float = 2.0, eps: float = 1e-8
    ) -> None:
        super().__init__(names)
        if not temperature > 0:
            raise ValueError(f"balancer 'dwa': temperature must be > 0, got {temperature}")
        self.k = float(len(self.names) if k is None else k)
        self.temperature, self.eps = float(temperature), float(eps)
        self.history: list[list[float]] = []  # the last two steps' loss values, oldest first

    def _state(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.history = [[float(v) for v in h] for h in state["history"]]

    def forward(self, losses: LossDict) -> tuple[torch.Tensor, dict[str, float]]:
        values = _global_values(self.kind, self.names, losses, self.step)
        if len(self.history) < 2:
            weights = [1.0] * len(values)
        else:
            before_last, last = self.history
            rates = [l1 / (l2 + self.eps) for l1, l2 in zip(last, before_last)]
            weights = [self.k * s for s in _softmax(rates, self.temperature)]
        self.history = [*self.history, values][-2:]
        self.step += 1
        return _weighted_total(self.names, losses, weights), dict(zip(self.names, weights))


class UncertaintyBalancer(_StatefulBalancer):
    """Homoscedastic-uncertainty weighting (Kendall, Gal, Cipolla 2018), kind ``uncertainty``.

    Learned log-variances ``s_j`` (parameters: give ``.parameters()`` to the optimizer);
    ``total = Σ_j exp(-s_j) L_j + s_j``; the reported weight is ``exp(-s_j)``.

    Under data parallelism this module is not wrapped in DDP, so the gradient of ``s_j`` is built from the
    rank-averaged loss value: ``∂total/∂s_j = 1 - exp(-s_j) · mean_ranks(L_j)``, which is what DDP's
    gradient averaging would give and is identical on every rank, so the ``s_j`` never drift apart. The
    total's value and its gradient with respect to the losses are those of the formula above.

    Args:
        names: Loss names, in a fixed order.
        init_log_variance: Initial ``s_j`` (0: every weight starts at 1).
    """

    kind = "uncertainty"

    def __init__(self, names: Sequence[str], init_log_variance: float = 0.0) -> None:
        super().__init__(names)
        self.log_variance = nn.Parameter(torch.full((len(self.names),), float(init_log_variance)))

    def forward(self, losses: LossDict) -> tuple[torch.Tensor, dict[str, float]]:
        values = _global_values(self.kind, self.names, losses, self.step)
        s = self.log_variance
        precision = torch.exp(-s)
        mean_losses = torch.tensor(values, dtype=s.dtype, device=s.device)
        # Value: Σ exp(-s_j) L_j + s_j. Gradient to L_j: exp(-s_j); gradient to s_j: from the global mean.
        local = sum(precision[j].detach() * losses[name] for j, name in enumerate(self.names))
        learned = precision * mean_losses + s
        total = local + learned.sum() - (precision * mean_losses).sum().detach()
        self.step += 1
        return total, dict(zip(self.names, precision.detach().cpu().tolist()))


BALANCERS: dict[str, type[_StatefulBalancer]] = {
    cls.kind: cls for cls in (DSMDBalancer, DSMDRateBalancer, FixedBalancer, DWABalancer, UncertaintyBalancer)
}
"""Balancer classes by kind."""


def make_balancer(kind: str, names: Sequence[str], **params: Any) -> _StatefulBalancer:
    """Builds a balancer by kind, e.g. ``make_balancer("dsmd", names=["feature", ...], k=10, temperature=1.0)``.

    Args:
        kind: One of ``dsmd``, ``dsmd_rate``, ``fixed``, ``dwa``, ``uncertainty``.
        names: Loss names the balancer will receive every step.
        **params: The kind's hyper-parameters (see each class).

    Returns:
        The balancer, an ``nn.Module``; call it with ``{name: loss}``.

    Raises:
        ValueError: On an unknown kind, an unknown parameter, or bad names.
    """
    if kind not in BALANCERS:
        raise ValueError(f"unknown balancer kind {kind!r}; allowed: {sorted(BALANCERS)}")
    cls = BALANCERS[kind]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "names")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"balancer {kind!r}: unknown parameter(s) {unknown}; allowed: {allowed}")
    return cls(names, **params)
