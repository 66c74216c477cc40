"""Config loading: every shipped config validates; bad keys and values give errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raydistill.config import ConfigError, apply_overrides, config_from_dict, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "quick.yaml", "demo-teacher.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must start with a comment giving the command that runs it"
    head = [line for line in text.splitlines()[:3] if line.startswith("#")]
    assert any("raydistill " in line for line in head), f"{path.name}: say which command runs it"
    cfg = load_config(path)
    # Round trip: the resolved config, dumped and re-read, is the same config.
    again = config_from_dict(yaml.safe_load(dump_config(cfg)), origin="dump")
    assert again == cfg


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "quick.yaml", ["train.lr=2e-3", "train.steps=7", "distill.terms=[feature, cosine]",
                                                        "teacher.pool.label_selector={raydistill/role: teacher}"])
    assert cfg.train.lr == pytest.approx(2e-3)
    assert cfg.train.steps == 7
    assert cfg.distill.terms == ["feature", "cosine"]
    assert cfg.teacher.pool.label_selector == {"raydistill/role": "teacher"}


def test_apply_overrides_creates_sections_and_rejects_bad_syntax() -> None:
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr is not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_unknown_key_is_named(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_sise: 12\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value)
    assert "unknown key 'train.batch_sise'" in str(err.value)


def test_bad_value_names_key_value_and_rule(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: -4\n")
    with pytest.raises(ConfigError, match=r"train.batch_size = -4: Input should be greater than 1"):
        load_config(p)


def test_bad_choice_lists_the_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balancer.kind = 'magic'.*'dsmd', 'dsmd_rate', 'fixed', 'dwa' or 'uncertainty'"):
        config_from_dict({"balancer": {"kind": "magic"}})
    with pytest.raises(ConfigError, match=r"unknown term\(s\) \['pixel'\]"):
        config_from_dict({"distill": {"terms": ["feature", "pixel"]}})


def test_contradictory_settings_fail_fast() -> None:
    with pytest.raises(ConfigError, match="ground_truth uses no teacher"):
        config_from_dict({"distill": {"objective": "ground_truth"}, "student": {"embed_dim": 8}, "cache": {"mode": "cache"}})
    with pytest.raises(ConfigError, match="needs student.embed_dim"):
        config_from_dict({"distill": {"objective": "ground_truth"}})
    with pytest.raises(ConfigError, match="needs teacher.checkpoint"):
        config_from_dict({"teacher": {"kind": "hf_clip"}})
    with pytest.raises(ConfigError, match="needs teacher.tokenizer"):
        config_from_dict({"teacher": {"kind": "beit3", "checkpoint": "x.pth"}})
    with pytest.raises(ConfigError, match="needs data.path"):
        config_from_dict({"data": {"source": "karpathy"}})
    with pytest.raises(ConfigError, match="max_size \\(1\\) must be >= min_size \\(2\\)"):
        config_from_dict({"teacher": {"pool": {"min_size": 2, "max_size": 1}}})
    with pytest.raises(ConfigError, match="not in distill.terms"):
        config_from_dict({"distill": {"terms": ["feature"]}, "balancer": {"kind": "fixed", "params": {"weights": {"cosine": 1}}}})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.json").write_text("{}")
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("data:\n  source: karpathy\n  path: data.json\n  image_root: imgs\n")
    cfg = load_config(p)
    assert cfg.data.path == str((tmp_path / "sub" / "data.json").resolve())
    assert cfg.data.image_root == str((tmp_path / "sub" / "imgs").resolve())
    # Object-store URIs and hub names are kept as given.
    p.write_text("data:\n  source: webdataset\n  path: s3://bucket/shards-{000..009}.tar\n"
                 "teacher:\n  kind: hf_clip\n  checkpoint: openai/clip-vit-base-patch32\n")
    cfg = load_config(p)
    assert cfg.data.path == "s3://bucket/shards-{000..009}.tar"
    assert cfg.teacher.checkpoint == "openai/clip-vit-base-patch32"


def test_the_data_budget_is_sixteen_training_batches_of_rows_within_256_and_2048_mib() -> None:
    from raydistill.pipeline.plans import data_budget_mb

    def budget(**sections: dict) -> int | None:
        return data_budget_mb(config_from_dict(sections))

    base = {"preset": "base", "from_scratch": True}  # decoded at its resize size, 256 px
    # Cache mode: rows carry the student's pixels, 3 * 256**2 bytes, and 16 KiB besides; 16 batches of 256 rows.
    assert budget(student=base, cache={"mode": "cache"}, train={"batch_size": 256}) == (
        16 * 256 * (3 * 256**2 + 16 * 1024) // 2**20) == 832
    assert budget(student=base, cache={"mode": "cache"}, train={"batch_size": 128}) == 416
    # Streaming: the teacher's 384 px pixels too, 2,560 MiB: capped.
    assert budget(student=base, data={"decode_size": 384}, train={"batch_size": 256}) == 2048
    # The default run's 48 px student: 71 MiB of rows, raised to the floor.
    assert budget() == 256
    assert budget(ray={"data_object_store_mb": 512}) == 512
    assert budget(ray={"data_object_store_mb": None}) is None
    # Blocks are at most a quarter of the budget and 8 MiB (Ray Data lets each operator hold one whatever the
    # budget), never larger than Ray's own setting.
    from raydistill.pipeline.plans import max_block_bytes

    assert max_block_bytes(16, None) == 4 * 2**20
    assert max_block_bytes(256, None) == max_block_bytes(2048, 128 * 2**20) == 8 * 2**20
    assert max_block_bytes(2048, 2 * 2**20) == 2 * 2**20
    import ray.data

    from raydistill.pipeline.plans import configure_data_context

    before = ray.data.DataContext._set_current(ray.data.DataContext())  # a fresh context, restored below
    try:
        configure_data_context(config_from_dict({}))
        ctx = ray.data.DataContext.get_current()
        assert ctx.execution_options.resource_limits.object_store_memory == 256 * 2**20
        assert ctx.target_max_block_size == 8 * 2**20
    finally:
        ray.data.DataContext._set_current(before)
    # One line for the key, whichever member of its type (a number or auto) the value missed.
    with pytest.raises(ConfigError) as err:
        config_from_dict({"ray": {"data_object_store_mb": 0}})
    assert str(err.value) == "<config>: ray.data_object_store_mb = 0: Input should be greater than 0; or input " \
                             "should be 'auto'"


def test_a_budgeted_pipeline_holds_each_output_queue_to_what_its_consumer_has_in_flight(monkeypatch) -> None:
    # Ray Data applies its downstream-capacity rule only once an operator uses half its share of the budget, which
    # includes the budget's shared part: cache rows queued ahead of decoding until they filled it. Under a budget
    # the dataset's context carries the rule applied always, in place of Ray's and beside its other policies.
    import ray.data
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES as RAYS,
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY as KEY,
        DownstreamCapacityBackpressurePolicy,
    )

    from raydistill.pipeline.backpressure import THRESHOLD_ENV, HeldQueues
    from raydistill.pipeline.plans import configure_data_context

    monkeypatch.delenv(THRESHOLD_ENV, raising=False)

    def policies(budget_mb: int | str | None) -> list[type]:
        before = ray.data.DataContext._set_current(ray.data.DataContext())
        try:
            configure_data_context(config_from_dict({"ray": {"data_object_store_mb": budget_mb}}))
            configure_data_context(config_from_dict({"ray": {"data_object_store_mb": budget_mb}}))  # idempotent
            return ray.data.DataContext.get_current().get_config(KEY, RAYS)
        finally:
            ray.data.DataContext._set_current(before)

    held = policies("auto")
    assert held == [HeldQueues if p is DownstreamCapacityBackpressurePolicy else p for p in RAYS] != RAYS
    assert HeldQueues.OBJECT_STORE_BUDGET_UTIL_THRESHOLD == 0.0 and len(held) == len(RAYS) == 3
    assert policies(None) == RAYS  # no budget: Ray Data's own settings
    monkeypatch.setenv(THRESHOLD_ENV, "0.25")  # the user set Ray's threshold: Ray's policy reads it
    assert policies("auto") == RAYS
