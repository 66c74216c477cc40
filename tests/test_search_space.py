"""Search-space files: parsing, the mapping onto Ray Tune's sampling functions, conditional options,
checks against the config, and every shipped ``tune_spaces/*.yaml``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raydistill.config import load_config
from raydistill.sweep.space import (
    Sampler,
    SearchSpaceError,
    apply_values,
    flatten_values,
    iter_variants,
    load_space,
    parse_space,
    validate_space,
)

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick.yaml"
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))


def _space(space: dict, **top) -> object:
    return parse_space({"space": space, **top}, origin="s.yaml")


def _draws(key_spec: dict, n: int = 2000, seed: int = 0) -> np.ndarray:
    """n values Tune samples from the one-key space ``{"train.lr": key_spec}``."""
    domain = _space({"train.lr": key_spec}).to_tune()["train.lr"]
    return np.asarray(domain.sample(size=n, random_state=np.random.RandomState(seed)))


# --------------------------------------------------------------------------------------------- samplers


def test_uniform_draws_cover_the_interval_evenly():
    values = _draws({"uniform": [2.0, 4.0]})
    assert values.min() >= 2.0 and values.max() < 4.0
    # Uniform on [2, 4): a quarter of the draws below 2.5 (binomial sd ~ 0.01 for n = 2000).
    assert abs(np.mean(values < 2.5) - 0.25) < 0.05


def test_loguniform_draws_are_uniform_in_log_space():
    values = _draws({"loguniform": [1e-4, 1e-2]})
    assert values.min() >= 1e-4 and values.max() <= 1e-2
    # Half the draws below the geometric mean 1e-3 (a plain uniform draw would put ~5% there).
    assert abs(np.mean(values < 1e-3) - 0.5) < 0.05


def test_randint_excludes_the_upper_bound_like_tune():
    values = _draws({"randint": [3, 6]}, n=600)
    assert set(values.tolist()) == {3, 4, 5}


def test_choice_draws_only_the_options():
    values = _draws({"choice": [1e-3, 3e-3]}, n=200)
    assert set(values.tolist()) == {1e-3, 3e-3}


def test_grid_becomes_tune_grid_search_over_the_options():
    space = _space({"student.preset": {"grid": ["test", "demo"]}})
    assert space.to_tune() == {"student.preset": {"grid_search": ["test", "demo"]}}
    assert space.grid_size() == 2


def test_grids_multiply_and_a_grid_option_counts_its_own_grid():
    space = _space({
        "student.preset": {"grid": ["test", "demo"]},
        "balancer": {"grid": [{"kind": "dsmd", "params": {"k": {"grid": [5, 10]}}}, {"kind": "fixed"}]},
        "train.lr": {"loguniform": [1e-4, 1e-3]},
    })
    # 2 presets x (2 dsmd k values + 1 fixed) = 6; the loguniform key adds no grid points.
    assert space.grid_size() == 6
    variants = list(iter_variants(space, random_draws=1))
    assert len(variants) == 6
    kinds = sorted((v["student.preset"], v["balancer"]["kind"], v["balancer"].get("params", {}).get("k"))
                   for v in variants)
    assert kinds == [("demo", "dsmd", 5), ("demo", "dsmd", 10), ("demo", "fixed", None),
                     ("test", "dsmd", 5), ("test", "dsmd", 10), ("test", "fixed", None)]
    assert all(1e-4 <= v["train.lr"] <= 1e-3 for v in variants)


def test_nested_samplers_are_drawn_only_in_the_option_that_holds_them():
    space = _space({"balancer": {"choice": [
        {"kind": "dsmd", "params": {"k": {"uniform": [5.0, 20.0]}, "temperature": 1.0}},
        {"kind": "fixed", "params": {}},
    ]}})
    variants = list(iter_variants(space, random_draws=200, seed=3))
    dsmd = [v["balancer"] for v in variants if v["balancer"]["kind"] == "dsmd"]
    fixed = [v["balancer"] for v in variants if v["balancer"]["kind"] == "fixed"]
    assert dsmd and fixed
    assert all(5.0 <= b["params"]["k"] < 20.0 and b["params"]["temperature"] == 1.0 for b in dsmd)
    assert len({b["params"]["k"] for b in dsmd}) == len(dsmd)  # drawn per trial, not once
    assert all(b == {"kind": "fixed", "params": {}} for b in fixed)


def test_iter_variants_is_reproducible_for_a_seed():
    space = _space({"train.lr": {"loguniform": [1e-4, 1e-2]}})
    first = [v["train.lr"] for v in iter_variants(space, random_draws=5, seed=7)]
    again = [v["train.lr"] for v in iter_variants(space, random_draws=5, seed=7)]
    other = [v["train.lr"] for v in iter_variants(space, random_draws=5, seed=8)]
    assert first == again and first != other


def test_spec_round_trips_the_written_space():
    written = {"balancer": {"grid": [{"kind": "dsmd", "params": {"k": {"uniform": [1, 2]}}}]},
               "train.lr": {"loguniform": [0.001, 0.01]}}
    assert _space(written).spec() == written


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], "top level must be a mapping"),
        ({"space": {}}, "'space' must be a non-empty mapping"),
        ({"space": {"train.lr": {"uniform": [0, 1]}}, "sample": 2}, "unknown top-level key(s) ['sample']"),
        ({"space": {"train.lr": 0.001}}, "must be a sampler"),
        ({"space": {"train.lr": {"unifrom": [0, 1]}}}, "must be a sampler, a mapping with one key of"),
        ({"space": {"train.lr": {"uniform": [1, 0]}}}, "uniform needs low < high, got [1, 0]"),
        ({"space": {"train.lr": {"uniform": [0, "1"]}}}, "uniform needs [low, high] (two numbers)"),
        ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "loguniform needs 0 < low < high"),
        ({"space": {"train.log_every": {"randint": [1, 2.5]}}}, "randint needs integer bounds"),
        ({"space": {"train.lr": {"choice": []}}}, "choice needs a non-empty list"),
        ({"space": {"train.lr": {"grid": [1, 2], "choice": [3]}}}, "a sampler must be the only key"),
        ({"space": {"balancer": {"choice": [{"kind": "dsmd", "params": {"k": {"grid": [1, 2]}}}]}}},
         "'grid' inside a 'choice' option"),
        ({"space": {"train.lrr": {"uniform": [0, 1]}}}, "unknown config key 'lrr' in train; allowed:"),
        ({"space": {"trian.lr": {"uniform": [0, 1]}}}, "unknown config key 'trian'; allowed:"),
        ({"space": {"train.lr.peak": {"uniform": [0, 1]}}}, "train.lr is a value, not a section"),
        ({"space": {"teacher.kind": {"grid": ["demo"]}}}, "teacher.* cannot be searched"),
        ({"space": {"data.synth.n_images": {"grid": [100, 200]}}}, "data.* cannot be searched"),
        ({"space": {"train.steps": {"grid": [10, 20]}}}, "train.steps is the scheduler's time axis"),
        ({"space": {"train.lr": {"uniform": [0, 1]}}, "fixed": {"train.lr": 0.1}}, "also searched in 'space'"),
        ({"space": {"train.lr": {"uniform": [0, 1]}}, "fixed": {"train.wd": 1}}, "unknown config key 'wd'"),
        ({"space": {"train.lr": {"uniform": [0, 1]}}, "fixed": {"train.seed": {"choice": [1, 2]}}},
         "'fixed' holds plain values"),
        ({"space": {"train.lr": {"uniform": [0, 1]}}, "samples": 0}, "samples = 0: must be an integer >= 1"),
        ({"space": {"train.lr": {"uniform": [0, 1]}}, "samples": True}, "must be an integer >= 1"),
    ],
)
def test_bad_spaces_are_refused_with_the_file_and_key(raw, message):
    with pytest.raises(SearchSpaceError) as err:
        parse_space(raw, origin="spaces/bad.yaml")
    assert "spaces/bad.yaml" in str(err.value)
    assert message in str(err.value)


def test_a_free_form_section_accepts_any_sub_key():
    # balancer.params is a free mapping: its keys are checked later, against the balancer kind.
    space = _space({"balancer.params.k": {"uniform": [1, 10]}})
    assert list(space.params) == ["balancer.params.k"]


def test_load_space_reports_missing_files_and_bad_yaml(tmp_path):
    with pytest.raises(SearchSpaceError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {train.lr: [unclosed\n")
    with pytest.raises(SearchSpaceError, match=r"bad\.yaml: not valid YAML"):
        load_space(bad)


# --------------------------------------------------------------------------------------------- trial configs


def test_apply_values_replaces_sections_and_leaves_the_input_alone():
    raw = {"balancer": {"kind": "dsmd", "params": {"k": 10, "temperature": 1.0}}, "train": {"lr": 1e-3}}
    out = apply_values(raw, {"balancer": {"kind": "fixed"}, "train.lr": 5e-4, "student.preset": "demo"})
    assert out == {"balancer": {"kind": "fixed"}, "train": {"lr": 5e-4}, "student": {"preset": "demo"}}
    assert raw["balancer"]["params"] == {"k": 10, "temperature": 1.0}


def test_apply_values_refuses_to_descend_into_a_value():
    with pytest.raises(SearchSpaceError, match="train.lr is not a section"):
        apply_values({"train": {"lr": 1e-3}}, {"train.lr.peak": 1})


def test_flatten_values_gives_dotted_keys_and_keeps_lists():
    values = {"balancer": {"kind": "dsmd", "params": {"k": 7.5}}, "distill.terms": ["feature", "cosine"],
              "other": {"params": {}}}
    assert flatten_values(values) == {"balancer.kind": "dsmd", "balancer.params.k": 7.5,
                                      "distill.terms": ["feature", "cosine"], "other.params": {}}


@pytest.fixture(scope="module")
def quick():
    return load_config(QUICK, ["train.eval_every=10"])


def test_validate_space_finds_a_parameter_the_balancer_does_not_take(quick):
    options = [{"kind": "dsmd", "params": {"k": 3}}, {"kind": "fixed", "params": {"k": 3}}]
    space = _space({"balancer": {"grid": options}})
    with pytest.raises(SearchSpaceError) as err:
        validate_space(space, quick)
    assert "balancer fixed with params {'k': 3}" in str(err.value)
    assert "unknown parameter(s) ['k']" in str(err.value)


def test_validate_space_finds_an_unknown_student_preset(quick):
    with pytest.raises(SearchSpaceError, match=r"student.preset = 'huge': unknown preset; allowed: \['test'"):
        validate_space(_space({"student.preset": {"grid": ["demo", "huge"]}}), quick)


def test_validate_space_finds_fixed_weights_that_do_not_match_the_terms(quick):
    space = _space({
        "balancer": {"grid": [{"kind": "fixed", "params": {"weights": {"feature": 1.0, "cosine": 2.0}}}]},
    })
    with pytest.raises(SearchSpaceError, match="must be exactly the loss names"):
        validate_space(space, quick)


def test_validate_space_reports_schema_errors_with_the_trial_values(quick):
    with pytest.raises(SearchSpaceError) as err:
        validate_space(_space({"train.batch_size": {"grid": [32, -4]}}), quick)
    assert "train.batch_size = -4" in str(err.value) and "'train.batch_size': -4" in str(err.value)


def test_validate_space_counts_grid_points_times_draws(quick):
    space = _space({"student.preset": {"grid": ["test", "demo"]}, "train.lr": {"uniform": [1e-4, 1e-3]}})
    assert validate_space(space, quick, random_draws=3) == 6


# --------------------------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_loads_and_builds_valid_trial_configs(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# raydistill tune ") and f"--space tune_spaces/{path.name}" in first_line
    space = load_space(path)
    base = load_config(QUICK, space.fixed_overrides() + (["train.eval_every=10"] if "train.eval_every" not in
                                                          space.fixed else []))
    assert validate_space(space, base) == 3 * space.grid_size()


def _sampler_kinds(value) -> set[str]:
    if isinstance(value, Sampler):
        return {value.kind} | {k for a in value.args for k in _sampler_kinds(a)}
    if isinstance(value, dict):
        return {k for v in value.values() for k in _sampler_kinds(v)}
    if isinstance(value, list):
        return {k for v in value for k in _sampler_kinds(v)}
    return set()


def test_shipped_spaces_cover_what_the_issue_asks_for():
    spaces = [load_space(p) for p in SPACES]
    searched = {k for s in spaces for k in s.params}
    assert {"balancer", "distill.terms", "train.lr", "student.preset"} <= searched
    kinds = {k for s in spaces for k in _sampler_kinds(s.params)}
    assert {"choice", "grid", "uniform", "loguniform"} <= kinds
    balancer = load_space(REPO / "tune_spaces" / "balancer.yaml").params["balancer"]
    options = {o["kind"]: o.get("params", {}) for o in balancer.args}
    assert set(options) == {"dsmd", "dsmd_rate", "dwa", "uncertainty", "fixed"}
    assert {"k", "temperature"} <= set(options["dsmd"]) and "weights" in options["fixed"]


def test_demo_space_is_two_sizes_times_two_balancers():
    space = load_space(REPO / "tune_spaces" / "demo.yaml")
    variants = list(iter_variants(space, random_draws=1))
    assert sorted((v["student.preset"], v["balancer"]["kind"]) for v in variants) == [
        ("demo", "dsmd"), ("demo", "fixed"), ("test", "dsmd"), ("test", "fixed")]
    assert space.grid_size() * space.samples == 4
    # The space's fixed values reach the config (quick.yaml itself does not validate).
    assert load_config(QUICK).train.eval_every is None
    assert load_config(QUICK, space.fixed_overrides()).train.eval_every == 10
