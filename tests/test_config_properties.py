"""Property-based tests of the config loader: valid overrides round-trip, garbage only ever raises ConfigError.

Valid override sets are drawn from a table of real keys with generators of allowed values; each set, applied
to an empty config or to configs/quick.yaml, must give a config holding exactly those values that survives
dump -> YAML -> load unchanged. Garbage (random mappings, random override strings, random values under real
keys, random file bytes) must give a valid config or a ConfigError, never any other exception.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydistill.config import (
    DISTILL_TERMS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
QUICK = yaml.safe_load((REPO / "configs" / "quick.yaml").read_text())
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# YAML 1.1 reads these words as booleans or null, so a name made of them is not a string.
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _yaml_float(x: float) -> str:
    # PyYAML (YAML 1.1) reads "1e-05" as a string; with a dot, "1.0e-05" is a float.
    text = repr(x)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def _floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False, exclude_min=True)


_names = st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(lambda s: s.lower() not in _YAML_WORDS)
_terms = st.lists(st.sampled_from(DISTILL_TERMS), min_size=1, max_size=len(DISTILL_TERMS), unique=True)

# key -> (strategy of allowed values, how a value is written on the command line).
VALID: dict[str, tuple[st.SearchStrategy, Callable[[Any], str]]] = {
    "name": (_names, str),
    "train.lr": (_floats(0.0, 1.0), _yaml_float),
    "train.weight_decay": (st.floats(0.0, 1.0), _yaml_float),
    "train.batch_size": (st.integers(2, 65536), str),
    "train.steps": (st.one_of(st.none(), st.integers(1, 10**9)), lambda v: "null" if v is None else str(v)),
    "train.epochs": (st.integers(1, 1000), str),
    "train.seed": (st.integers(-(2**31), 2**31), str),
    "train.schedule": (st.sampled_from(["cosine", "step", "constant"]), str),
    "train.amp": (st.sampled_from(["auto", "off", "bf16", "fp16"]), str),
    "train.use_gpu": (st.sampled_from(["auto", "yes", "no"]), str),
    "train.shuffle_buffer": (st.integers(0, 10**6), str),
    "train.grad_clip": (st.one_of(st.none(), _floats(0.0, 100.0)), lambda v: "null" if v is None else _yaml_float(v)),
    "train.warmup_fraction": (st.floats(0.0, 0.99), _yaml_float),
    "distill.terms": (_terms, lambda v: "[" + ", ".join(v) + "]"),
    "distill.temperature": (_floats(0.0, 10.0), _yaml_float),
    "distill.max_violation": (st.booleans(), lambda v: "true" if v else "false"),
    "distill.queue_size": (st.integers(1, 10**6), str),
    "balancer.kind": (st.sampled_from(["dsmd", "dsmd_rate", "fixed", "dwa", "uncertainty"]), str),
    "data.decode_size": (st.integers(8, 1024), str),
    "data.on_bad_image": (st.sampled_from(["skip", "fail"]), str),
    "data.max_bad_fraction": (st.floats(0.0, 1.0), _yaml_float),
    "data.synth.n_images": (st.integers(11, 10**6), str),
    "teacher.dtype": (st.sampled_from(["float32", "bfloat16", "float16"]), str),
    "teacher.device": (st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:7"]), str),
    "teacher.pool.batch_size": (st.integers(1, 4096), str),
    "tracking.enabled": (st.booleans(), lambda v: "true" if v else "false"),
}


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@st.composite
def valid_overrides(draw) -> dict[str, object]:
    keys = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=len(VALID)))
    chosen = {key: draw(VALID[key][0]) for key in keys}
    # The one cross-field rule among these keys: a teacher pool's max_size >= its min_size.
    if draw(st.booleans()):
        low = draw(st.integers(1, 64))
        chosen["teacher.pool.min_size"] = low
        chosen["teacher.pool.max_size"] = draw(st.integers(low, 128))
    return chosen


def _as_override(key: str, value: object) -> str:
    fmt = VALID[key][1] if key in VALID else str
    return f"{key}={fmt(value)}"


@SETTINGS
@given(chosen=valid_overrides(), base=st.sampled_from(["empty", "quick"]))
def test_valid_overrides_are_applied_exactly_and_round_trip(chosen: dict[str, object], base: str) -> None:
    raw = {} if base == "empty" else QUICK
    overrides = [_as_override(k, v) for k, v in chosen.items()]
    cfg = config_from_dict(apply_overrides(raw, overrides), origin="props")
    for key, value in chosen.items():
        assert _get(cfg, key) == value, (key, value, overrides)
    # Untouched keys keep the base's value (or the default).
    reference = config_from_dict(raw, origin="props")
    for key in VALID:
        if key not in chosen:
            assert _get(cfg, key) == _get(reference, key)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)), origin="dump")
    assert again == cfg
    # Overrides never modify the mapping they are applied to.
    assert raw == ({} if base == "empty" else yaml.safe_load((REPO / "configs" / "quick.yaml").read_text()))


# ----------------------------------------------------------------------------------------------- garbage

_REAL_KEYS = ["name", "output_dir", "data", "teacher", "student", "train", "distill", "balancer", "cache", "ray",
              "tracking", "eval", "source", "path", "image_root", "coco_splits", "synth", "pool", "checkpoint",
              "batch_size", "lr", "steps", "terms", "kind", "params", "weights", "storage_path", "dir", "mode",
              "captions", "images", "arch", "tokenizer", "label_selector", "resources", "min_size", "max_size"]
_keys = st.one_of(st.sampled_from(_REAL_KEYS), st.text(max_size=12), st.integers(-3, 3), st.booleans(), st.none())
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40),
    st.binary(max_size=8), st.sampled_from(["", " ", ".", "~", "/", "s3://b/k", "\x00", "a" * 5000, "-1", "nan"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_keys, inner, max_size=4)), max_leaves=20)


def _only_config_errors(make) -> None:
    try:
        cfg = make()
    except ConfigError as err:
        assert str(err).strip(), "a ConfigError must say what is wrong"
        return
    assert isinstance(cfg, Config)


@SETTINGS
@given(raw=st.one_of(_values, st.dictionaries(_keys, _values, max_size=6)))
def test_random_mappings_give_a_config_or_a_config_error(raw: object) -> None:
    _only_config_errors(lambda: config_from_dict(raw, origin="garbage"))


@SETTINGS
@given(overrides=st.lists(st.text(max_size=40), max_size=5), base=st.sampled_from(["empty", "quick", "list"]))
def test_random_override_strings_give_a_config_or_a_config_error(overrides: list[str], base: str) -> None:
    raw = {"empty": {}, "quick": QUICK, "list": [1, 2]}[base]
    _only_config_errors(lambda: config_from_dict(apply_overrides(raw, overrides), origin="garbage"))


_SECTION_KEYS = sorted(VALID) + ["output_dir", "data.path", "data.image_root", "teacher.checkpoint",
                                 "student.tokenizer", "cache.dir", "train.storage_path", "data.coco_splits",
                                 "teacher.pool", "balancer.params", "teacher.arch", "train", "data.source"]


@SETTINGS
@given(key=st.sampled_from(_SECTION_KEYS), text=st.text(max_size=60), base=st.sampled_from(["empty", "quick"]))
def test_random_values_under_real_keys_give_a_config_or_a_config_error(key: str, text: str, base: str) -> None:
    raw = {} if base == "empty" else QUICK
    _only_config_errors(lambda: config_from_dict(apply_overrides(raw, [f"{key}={text}"]), origin="garbage"))


@SETTINGS
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8"))),
       overrides=st.lists(st.sampled_from(["train.lr=0.5", "data.path=x", "name=ok"]), max_size=2))
def test_random_files_give_a_config_or_a_config_error(content: bytes, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_bytes(content)
        _only_config_errors(lambda: load_config(path, overrides))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"output_dir": "runs\x00x"}, "output_dir"),
        ({"train": {"storage_path": "/tmp/a\x00b"}}, "train.storage_path"),
        ({"teacher": {"kind": "raydistill", "checkpoint": "x" * 5000}}, None),
    ],
)
def test_unusable_paths_are_config_errors_naming_the_key(raw: dict, message: str | None) -> None:
    """Hand-picked cases of what the generators above look for: odd path strings never escape as OSError."""
    _only_config_errors(lambda: config_from_dict(raw, origin="paths"))
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw, origin="paths")


def test_a_yaml_list_with_overrides_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- lr\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError):
        load_config(path, ["train.lr=0.1"])
    assert os.path.exists(path)
