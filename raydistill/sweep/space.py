"""Search spaces for ``raydistill tune``: read a ``tune_spaces/*.yaml`` file, check it, map it onto Ray Tune.

A space file names config keys (the dotted form of command-line overrides) and how to sample each::

    # raydistill tune configs/quick.yaml --space tune_spaces/demo.yaml
    samples: 1                       # optional: default for --samples (Tune's num_samples)
    fixed:                           # optional: set in every trial, like overrides
      train.eval_every: 10
    space:
      student.preset: {grid: [test, demo]}
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}
      balancer:
        grid:
          - {kind: dsmd, params: {k: {uniform: [5, 20]}, temperature: 1.0}}
          - {kind: fixed}

A sampler is a mapping with exactly one key, one of Tune's sampling functions:

=============================  =====================================================================
``{choice: [a, b, ...]}``      ``tune.choice``: one option at random per trial
``{grid: [a, b, ...]}``        ``tune.grid_search``: every option (times ``samples``)
``{uniform: [low, high]}``     ``tune.uniform``: a float in [low, high)
``{loguniform: [low, high]}``  ``tune.loguniform``: a float, uniform in log space, 0 < low < high
``{randint: [low, high]}``     ``tune.randint``: an integer in [low, high) (high excluded, as in Tune)
=============================  =====================================================================

The options of ``choice`` and ``grid`` are literal values (strings, numbers, lists such as a
``distill.terms`` list, or whole sections such as a balancer), and may hold samplers of their own:
those are sampled only in the trials that pick that option (conditional hyper-parameters, e.g. ``k``
of the ``dsmd`` balancer). A ``grid`` may sit inside a ``grid`` option, not inside a ``choice`` option
(the trial count would be random). A sampled value REPLACES what the config holds at its key, so
``balancer: {grid: [{kind: fixed}]}`` drops the base config's ``balancer.params``.

Keys that change what the teacher embeds (``teacher.*``, ``data.*``, ``cache.*``) cannot be searched:
the cache is filled once before the trials. Nor can the scheduler's time axis (``train.steps``,
``train.epochs``, ``train.eval_every``) or the run's plumbing (``name``, ``output_dir``, ``ray.*``,
``tracking.*``); set those in the config, the overrides or ``fixed``.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from raydistill.config import Config, ConfigError, config_from_dict

__all__ = [
    "SAMPLERS",
    "Sampler",
    "SearchSpace",
    "SearchSpaceError",
    "apply_values",
    "check_trial_config",
    "flatten_values",
    "iter_variants",
    "load_space",
    "parse_space",
    "validate_space",
]

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
_TOP_KEYS = ("space", "fixed", "samples", "description")
# Searched keys may not start with these: the cache is filled once, and a run's plumbing is the sweep's.
_FROZEN_PREFIXES = ("teacher", "data", "cache", "ray", "tracking", "name", "output_dir")
# The scheduler's time axis: every trial must count steps and validate the same way.
_SCHEDULE_KEYS = ("train.steps", "train.epochs", "train.eval_every")


class SearchSpaceError(ConfigError):
    """A search-space file, key or sampler is wrong; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Sampler:
    """One sampling function of a space: ``kind`` (one of :data:`SAMPLERS`) and its arguments.

    For ``choice`` and ``grid``, ``args`` are the options (parsed: they may hold nested samplers); for the
    others, the ``[low, high]`` bounds.
    """

    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The Ray Tune domain (or ``grid_search`` marker) for this sampler, nested samplers converted too."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice([_to_tune(o) for o in self.args])
        if self.kind == "grid":
            return tune.grid_search([_to_tune(o) for o in self.args])
        low, high = self.args
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high)

    def spec(self) -> dict[str, Any]:
        """The sampler as it was written (``{kind: args}``), for logs and MLflow params."""
        return {self.kind: [_spec(a) for a in self.args]}


@dataclass(frozen=True)
class SearchSpace:
    """A parsed, checked search space.

    Attributes:
        origin: The file it came from (used in messages).
        params: Dotted config key -> :class:`Sampler`, in file order.
        fixed: Dotted config key -> value set in every trial.
        samples: Default Tune ``num_samples`` (each grid point is repeated this many times).
        description: Free text from the file.
    """

    origin: str
    params: dict[str, Sampler]
    fixed: dict[str, Any] = field(default_factory=dict)
    samples: int = 1
    description: str | None = None

    def to_tune(self) -> dict[str, Any]:
        """The ``param_space`` for ``ray.tune.Tuner``: one entry per searched key (keys stay dotted)."""
        return {key: sampler.to_tune() for key, sampler in self.params.items()}

    def grid_size(self) -> int:
        """Trials per sample: the product of the grid sizes (a grid option's own grids multiply it)."""
        return math.prod(_grid_size(s) for s in self.params.values())

    def fixed_overrides(self) -> list[str]:
        """``fixed`` as ``key=value`` overrides (JSON values, which the override parser reads as YAML)."""
        return [f"{key}={json.dumps(value)}" for key, value in self.fixed.items()]

    def spec(self) -> dict[str, Any]:
        """The space as written: ``{key: {sampler: args}}``."""
        return {key: sampler.spec() for key, sampler in self.params.items()}


# --------------------------------------------------------------------------------------------- parsing


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space YAML file (see the module docstring for the format).

    Raises:
        SearchSpaceError: missing file, bad YAML, unknown top-level keys, bad samplers or keys.
    """
    p = Path(path)
    if not p.is_file():
        raise SearchSpaceError(f"search space file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SearchSpaceError(f"{p}: not valid YAML: {err}") from None
    return parse_space(raw, origin=str(p))


def parse_space(raw: Any, origin: str = "<space>") -> SearchSpace:
    """Check a parsed space file and return its :class:`SearchSpace`.

    Args:
        raw: The YAML document: a mapping with ``space`` and optionally ``fixed``, ``samples``, ``description``.
        origin: What to call the source in messages.

    Raises:
        SearchSpaceError: naming ``origin``, the key and what is allowed.
    """
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"{origin}: the top level must be a mapping with a 'space' key, got {_kind(raw)}")
    unknown = [k for k in raw if k not in _TOP_KEYS]
    if unknown:
        raise SearchSpaceError(f"{origin}: unknown top-level key(s) {unknown}; allowed: {list(_TOP_KEYS)}")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise SearchSpaceError(
            f"{origin}: 'space' must be a non-empty mapping of config keys to samplers, got {_kind(space)}"
        )
    params: dict[str, Sampler] = {}
    for key, value in space.items():
        where = f"{origin}: space.{key}"
        _check_searchable(str(key), where)
        _check_config_key(str(key), where)
        sampler = _parse_value(value, where, inside_choice=False)
        if not isinstance(sampler, Sampler):
            raise SearchSpaceError(
                f"{where} = {value!r}: must be a sampler, a mapping with one key of {list(SAMPLERS)} "
                f"(a constant belongs in 'fixed' or the config)"
            )
        params[str(key)] = sampler

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SearchSpaceError(f"{origin}: 'fixed' must be a mapping of config keys to values, got {_kind(fixed)}")
    for key, value in fixed.items():
        where = f"{origin}: fixed.{key}"
        _check_config_key(str(key), where)
        if str(key) in params:
            raise SearchSpaceError(f"{where}: the key is also searched in 'space'; keep one of them")
        if _holds_sampler(value):
            raise SearchSpaceError(f"{where} = {value!r}: 'fixed' holds plain values; move samplers to 'space'")

    samples = raw.get("samples", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise SearchSpaceError(f"{origin}: samples = {samples!r}: must be an integer >= 1")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise SearchSpaceError(f"{origin}: description must be text, got {_kind(description)}")
    return SearchSpace(origin, params, {str(k): v for k, v in fixed.items()}, samples, description)


def _parse_value(value: Any, where: str, inside_choice: bool) -> Any:
    """A literal with any nested samplers parsed into :class:`Sampler` objects."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SAMPLERS:
        kind, args = next(iter(value.items()))
        return _parse_sampler(kind, args, where, inside_choice)
    if isinstance(value, dict):
        unknown = [k for k in value if isinstance(k, str) and k in SAMPLERS]
        if unknown:
            raise SearchSpaceError(
                f"{where}: a sampler must be the only key of its mapping, found {unknown[0]!r} beside "
                f"{sorted(str(k) for k in value if k not in SAMPLERS)}"
            )
        return {k: _parse_value(v, f"{where}.{k}", inside_choice) for k, v in value.items()}
    if isinstance(value, list):
        return [_parse_value(v, f"{where}[{i}]", inside_choice) for i, v in enumerate(value)]
    return value


def _parse_sampler(kind: str, args: Any, where: str, inside_choice: bool) -> Sampler:
    if kind in ("choice", "grid"):
        if kind == "grid" and inside_choice:
            raise SearchSpaceError(
                f"{where}: 'grid' inside a 'choice' option would make the number of trials random; "
                "use 'choice' there, or make the outer sampler a 'grid'"
            )
        if not isinstance(args, list) or not args:
            raise SearchSpaceError(f"{where}: {kind} needs a non-empty list of options, got {args!r}")
        nested_in_choice = inside_choice or kind == "choice"
        options = tuple(_parse_value(o, f"{where}.{kind}[{i}]", nested_in_choice) for i, o in enumerate(args))
        return Sampler(kind, options)
    if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)):
        raise SearchSpaceError(f"{where}: {kind} needs [low, high] (two numbers), got {args!r}")
    low, high = args
    if not low < high:
        raise SearchSpaceError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{where}: loguniform needs 0 < low < high, got [{low}, {high}]")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise SearchSpaceError(f"{where}: randint needs integer bounds [low, high) (high excluded), got {args!r}")
    return Sampler(kind, (low, high))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _holds_sampler(value: Any) -> bool:
    if isinstance(value, dict):
        return any(k in SAMPLERS for k in value) or any(_holds_sampler(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_sampler(v) for v in value)
    return False


def _check_searchable(key: str, where: str) -> None:
    first = key.split(".", 1)[0]
    if first in _FROZEN_PREFIXES:
        raise SearchSpaceError(
            f"{where}: {first}.* cannot be searched: the teacher cache is filled once for the whole sweep and "
            f"every trial shares the sweep's data, Ray instance and tracking; searchable sections: "
            f"student, distill, balancer, train, eval"
        )
    if key in _SCHEDULE_KEYS:
        raise SearchSpaceError(
            f"{where}: {key} is the scheduler's time axis and must be the same in every trial; "
            "set it in the config, an override or the space's 'fixed' section"
        )


def _check_config_key(key: str, where: str) -> None:
    """``key`` must name a config field (or lie inside a free-form mapping field such as balancer.params)."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:i])
            raise SearchSpaceError(
                f"{where}: unknown config key {part!r}{f' in {prefix}' if prefix else ''}; "
                f"allowed: {sorted(fields)}"
            )
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        if typing.get_origin(annotation) is dict:
            return  # free-form mapping: any sub-key (e.g. balancer.params.k)
        if i != len(parts) - 1:
            raise SearchSpaceError(f"{where}: {'.'.join(parts[: i + 1])} is a value, not a section")
        return


def _to_tune(value: Any) -> Any:
    if isinstance(value, Sampler):
        return value.to_tune()
    if isinstance(value, dict):
        return {k: _to_tune(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_tune(v) for v in value]
    return value


def _spec(value: Any) -> Any:
    if isinstance(value, Sampler):
        return value.spec()
    if isinstance(value, dict):
        return {k: _spec(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_spec(v) for v in value]
    return value


def _grid_size(value: Any) -> int:
    if isinstance(value, Sampler):
        if value.kind == "grid":
            return sum(_grid_size(o) for o in value.args)
        return 1  # a choice's options hold no grid (refused when parsing); bounds hold nothing
    if isinstance(value, dict):
        return math.prod(_grid_size(v) for v in value.values())
    if isinstance(value, list):
        return math.prod(_grid_size(v) for v in value)
    return 1


# --------------------------------------------------------------------------------------------- trial configs


def apply_values(raw: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the config mapping ``raw`` with each dotted key of ``values`` set (replacing what was there).

    Raises:
        SearchSpaceError: a key descends into something that is not a mapping.
    """
    out = json.loads(json.dumps(raw))  # a deep copy that also turns tuples into lists, as YAML would
    for key, value in values.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SearchSpaceError(f"search key {key!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = json.loads(json.dumps(value))
    return out


def flatten_values(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Sampled values as flat dotted keys: ``{"balancer": {"kind": "dsmd"}}`` -> ``{"balancer.kind": "dsmd"}``.

    Lists (e.g. ``distill.terms``) stay whole; an empty mapping stays ``{}`` so its key is not lost.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_values(value, name))
        else:
            flat[name] = value
    return flat


def check_trial_config(cfg: Config, origin: str) -> None:
    """Checks a trial's config beyond the config schema: a known student preset and valid balancer params.

    Raises:
        SearchSpaceError: naming ``origin`` and the bad value.
    """
    from raydistill.method.balancers import make_balancer
    from raydistill.models.architecture import get_preset, preset_names

    try:
        get_preset(cfg.student.preset)
    except (KeyError, ValueError):
        raise SearchSpaceError(
            f"{origin}: student.preset = {cfg.student.preset!r}: unknown preset; allowed: {preset_names()}"
        ) from None
    if cfg.uses_teacher:
        try:
            make_balancer(cfg.balancer.kind, names=list(cfg.distill.terms), **cfg.balancer.params)
        except (TypeError, ValueError) as err:
            raise SearchSpaceError(
                f"{origin}: balancer {cfg.balancer.kind} with params {cfg.balancer.params}: {err}"
            ) from None


def iter_variants(space: SearchSpace, random_draws: int = 3, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Trial values Tune could produce: every grid point, each with ``random_draws`` random draws.

    Used to check a space against a config before anything runs; the sweep itself lets Tune sample.
    """
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.RandomState(seed)
    for _ in range(max(1, random_draws)):
        for _, values in generate_variants(space.to_tune(), random_state=rng):
            yield values


def validate_space(space: SearchSpace, base: Config, random_draws: int = 3, seed: int = 0) -> int:
    """Build and check the config of every grid point (and a few random draws) of ``space`` over ``base``.

    Returns:
        How many trial configs were checked.

    Raises:
        SearchSpaceError: the first trial config that fails, with its sampled values.
    """
    raw = base.model_dump(mode="json")
    count = 0
    for values in iter_variants(space, random_draws, seed):
        origin = f"{space.origin}: trial values {flatten_values(values)}"
        try:
            cfg = config_from_dict(apply_values(raw, values), origin=origin)
        except SearchSpaceError:
            raise
        except ConfigError as err:
            raise SearchSpaceError(str(err)) from None
        check_trial_config(cfg, origin)
        count += 1
    return count
