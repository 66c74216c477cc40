"""`raydistill demo --quick --json` from a fresh working directory: the embedded product end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raydistill.demo import QUICK_RAY_CPUS, QUICK_STEPS

pytestmark = [pytest.mark.ray, pytest.mark.slow]
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def test_quick_demo_prints_the_comparison(tmp_path: Path) -> None:
    env = dict(os.environ, RAYDISTILL_HOME=os.environ["RAYDISTILL_HOME"], PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "raydistill.cli", "demo", "--quick", "--json", "--output-dir", str(tmp_path / "demo")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for arm in ("teacher", "distilled", "baseline"):
        row = summary[arm]
        assert all(0 <= row[k] <= 100 for k in KEYS)
        assert row["rsum"] == pytest.approx(sum(row[k] for k in KEYS))
    assert summary["teacher"]["params"] > 5 * summary["distilled"]["params"]
    assert summary["distilled"]["params"] == summary["baseline"]["params"]
    assert summary["mlflow_tracking_uri"].startswith("sqlite:////")
    assert summary["quick"] is True and summary["steps"] == QUICK_STEPS
    # The two arms ran side by side, each with its own tagged log lines.
    assert "[raydistill] [distilled] training demo student" in proc.stderr
    assert "[raydistill] [baseline] training demo student" in proc.stderr
    assert Path(summary["plot"]).is_file()
    # The table and the MLflow hint reach the user.
    assert "distilled student" in proc.stderr and "mlflow ui --backend-store-uri" in proc.stderr
    gain = summary["distilled"]["rsum"] - summary["baseline"]["rsum"]
    assert f"distillation gain at {QUICK_STEPS} steps: {gain:+.1f} RSUM" in proc.stderr  # the gain states its budget
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    for run_id in summary["runs"]["distilled"] + summary["runs"]["baseline"]:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["test/rsum"] >= 0
    # The baseline (ground-truth objective) never calls the teacher, so it has no teacher ceiling either.
    distilled, baseline = (client.get_run(summary["runs"][arm][0]).data for arm in ("distilled", "baseline"))
    assert distilled.params["distill.objective"] == "dsmd" and distilled.metrics["teacher_images_embedded"] > 0
    assert distilled.metrics["teacher_test/rsum"] == pytest.approx(summary["teacher"]["rsum"])
    assert baseline.params["distill.objective"] == "ground_truth" and baseline.metrics["teacher_images_embedded"] == 0
    assert not any(key.startswith("teacher_test/") for key in baseline.metrics)
    # A smoke run's local instance: one torch thread per side-by-side arm (the logged config says so).
    for arm in (distilled, baseline):
        assert (arm.params["ray.num_cpus"], arm.params["train.cpus_per_worker"]) == (str(QUICK_RAY_CPUS), "1.0")
    assert "State API may be temporarily unavailable" not in proc.stderr  # the dashboard serves Train's cleaner


def test_the_shipped_teacher_is_the_one_its_config_fits() -> None:
    """The checkpoint under raydistill/assets/demo-teacher/ was made by the current configs/demo-teacher.yaml
    (edit the config without refitting and this fails), and it loads as a teacher of the documented size."""
    import numpy as np

    from raydistill.demo import ensure_demo_teacher
    from raydistill.demo_assets import SHIPPED_TEACHER, demo_teacher_config_sha256
    from raydistill.models.teachers import load_teacher

    from raydistill.data.synth import GENERATOR_VERSION

    source = json.loads((SHIPPED_TEACHER / "SOURCE.json").read_text())
    assert source["config_sha256"] == demo_teacher_config_sha256()
    assert source["synth_generator_version"] == GENERATOR_VERSION  # fitted on the data the demo now generates
    assert source["command"] == "raydistill run configs/demo-teacher.yaml"
    assert ensure_demo_teacher() == SHIPPED_TEACHER  # used as is: nothing is fitted
    teacher = load_teacher({"kind": "raydistill", "checkpoint": str(SHIPPED_TEACHER)})
    assert (teacher.dim, teacher.image_size) == (256, 48)
    assert sum(p.numel() for p in teacher.model.parameters()) == 4_968_192
    emb = teacher.embed_texts(["a small red circle left of a large blue square"])
    assert emb.shape == (1, 256) and np.isclose(np.linalg.norm(emb), 1.0, atol=1e-5)


def test_the_shipped_teacher_is_ignored_when_the_synthetic_data_changes(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """A new generator version means new data: the shipped teacher (fitted on the old) is not used, and a
    teacher fitted locally for the old data is not found either."""
    from raydistill import demo_assets
    from raydistill.data import synth

    monkeypatch.setenv("RAYDISTILL_HOME", str(tmp_path))
    assert demo_assets.shipped_demo_teacher() == demo_assets.SHIPPED_TEACHER
    current = demo_assets.demo_teacher_dir()
    monkeypatch.setattr(synth, "GENERATOR_VERSION", synth.GENERATOR_VERSION + 1)
    assert demo_assets.shipped_demo_teacher() is None
    assert demo_assets.demo_teacher_dir() != current
    (current / "config.json").parent.mkdir(parents=True)
    (current / "config.json").write_text("{}")
    assert demo_assets.find_demo_teacher() is None


def test_the_demo_trains_each_arm_at_the_setting_the_quality_benchmark_chose() -> None:
    """The committed quality result picked each arm's setting (with the shipped teacher): the demo and
    configs/demo.yaml use those, so the demo's comparison is the benchmark's, at one seed."""
    from raydistill import demo
    from raydistill.config import load_config
    from raydistill.demo_assets import SHIPPED_TEACHER, config_path

    result = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality.json").read_text())
    for setting, row in ((demo.DISTILLED_SETTING, result["distilled"]), (demo.BASELINE_SETTING, result["baseline"])):
        assert setting == {"lr": row["lr"], "adam_beta2": row["beta2"], "warmup_fraction": row["warmup"]}
    train = load_config(config_path("demo.yaml")).train
    assert {"lr": train.lr, "adam_beta2": train.adam_beta2, "warmup_fraction": train.warmup_fraction} == \
        demo.DISTILLED_SETTING
    assert train.steps == result["config"]["steps"]
    shipped = json.loads((SHIPPED_TEACHER / "SOURCE.json").read_text())["test_metrics"]["rsum"]
    assert abs(result["teacher"]["rsum"] - shipped) < 0.01  # measured with the shipped teacher
