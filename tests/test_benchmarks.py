"""Each benchmark at tiny size: it runs end to end, and its result file holds what it measured, consistently.

A tiny raydistill-format teacher and the `test` student on ~100 synthetic images; one local Ray instance for
the module. The stream benchmark (``benchmarks.pipeline``) and the scaling benchmark (``benchmarks.scaling``)
make Train runs of kinds tested end to end elsewhere (write-through then cache mode in tests/test_e2e_run.py,
two workers on two nodes in tests/test_placement.py); their arithmetic is tested here. No timing assertions:
the figures are checked against each other (a ratio is the quotient of the steady rates it names, a rate is
the counted items over the measured seconds, start-up is the seconds beyond the items at the steady rate),
not against expectations of speed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import ray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common, pipeline, quality, scale, scaling, teacher_throughput, train_throughput  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
COMMON_KEYS = {"benchmark", "hardware", "versions", "config"}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if ray.is_initialized():
        ray.shutdown()


def _written(out: Path, name: str, returned: dict) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data == json.loads(json.dumps(returned))
    assert COMMON_KEYS <= set(data) and data["benchmark"] == name
    assert data["versions"]["ray"].startswith("2.60") and data["hardware"]["cpus"] >= 1
    return data


def _split_rates(figures: dict, unit: str, items: float) -> None:
    """Steady, end-to-end and start-up figures of one measurement agree: seconds = start-up + items / steady."""
    steady, end_to_end = figures[f"steady_{unit}_per_s"], figures[f"end_to_end_{unit}_per_s"]
    assert steady > 0 and end_to_end > 0
    assert math.isclose(end_to_end, items / figures["seconds"])
    assert math.isclose(figures["startup_s"], figures["seconds"] - items / steady, abs_tol=1e-9)
    if figures["startup_s"] > 0:
        assert steady >= end_to_end


def test_rates_split_a_measurement_into_startup_and_steady_state() -> None:
    figures = common.rates(items=100, seconds=12.0, steady=10.0, unit="images")
    assert figures == {"steady_images_per_s": 10.0, "end_to_end_images_per_s": 100 / 12, "startup_s": 2.0}
    # The first window (start-up) is left out; the others are averaged over time: 2 / (1/20 + 1/30).
    assert math.isclose(common.steady_rate([{"samples_per_s": 1.0}, {"samples_per_s": 20.0},
                                            {"samples_per_s": 30.0}]), 24.0)
    with pytest.raises(RuntimeError, match="two logging windows"):
        common.steady_rate([{"samples_per_s": 1.0}])


def test_pool_steady_window_starts_when_every_actor_has_finished_a_batch() -> None:
    # Actor a finishes batches at 1, 2, 3, 4; actor b starts late and finishes its first at 2.5, then at 4.5.
    calls = [{"time": t, "actor": "a", "teacher_seconds": 0.5} for t in (1.0, 2.0, 3.0, 4.0)] + [
        {"time": t, "actor": "b", "teacher_seconds": 0.5} for t in (2.5, 4.5)]
    # Without per-batch sizes every batch holds the mean: 6 batches of 60 images, 3 of them after t = 2.5.
    window = common.pool_steady_window(calls, images=360, captions=1440)
    assert window == {"images": 180, "captions": 720, "seconds": 2.0, "batches": 3}
    # With sizes the window counts them.
    sized = [dict(c, teacher_images_embedded=10 * k, teacher_captions_embedded=40 * k) for k, c in enumerate(calls)]
    window = common.pool_steady_window(sized, images=150, captions=600)
    assert (window["images"], window["captions"], window["batches"]) == (20 + 30 + 50, 80 + 120 + 200, 3)
    with pytest.raises(RuntimeError, match="measure more batches"):
        common.window_rate(0, 0.0, "one batch")


def test_teacher_throughput(tmp_path: Path) -> None:
    out = teacher_throughput.main(["--teacher", "tiny", "--images", "64", "--batch-size", "16",
                                   "--cpus-per-actor", "1", "--out", str(tmp_path)])
    data = _written(tmp_path, "teacher_throughput", out)
    records = common.synth_records(1500, 48)
    n_captions = sum(len(records[i % len(records)]["captions"]) for i in range(64))
    assert (data["images"], data["captions"]) == (64, n_captions)
    for side in ("plain", "pipeline"):
        figures = data[side]
        assert math.isclose(figures["images_per_s"], 64 / figures["seconds"])
        assert math.isclose(figures["captions_per_s"], n_captions / figures["seconds"])
        assert figures["images_per_s"] == figures["end_to_end_images_per_s"]
        _split_rates(figures, "images", 64)
        assert figures["steady_captions_per_s"] > 0 and figures["busy_images_per_s"] > 0
    # Four batches on one actor: the steady window holds the three after the first.
    assert data["pipeline"]["steady_batches"] == 3
    assert math.isclose(data["ratio"], data["pipeline"]["steady_images_per_s"] / data["plain"]["steady_images_per_s"])
    assert math.isclose(data["ratio_end_to_end"], data["pipeline"]["images_per_s"] / data["plain"]["images_per_s"])
    assert data["config"]["dim"] == 32 and data["config"]["image_size"] == 48
    from benchmarks import report

    md = report.render(tmp_path)
    assert "| steady images/s | steady captions/s | start-up s | end-to-end images/s | seconds |" in md
    assert "| **ratio** (pipeline / plain) |" in md


def test_train_throughput(tmp_path: Path) -> None:
    out = train_throughput.main(["--teacher", "tiny", "--student", "test", "--images", "120", "--steps", "8",
                                 "--log-every", "4", "--batch-size", "16", "--cpus-per-worker", "1",
                                 "--out", str(tmp_path)])
    data = _written(tmp_path, "train_throughput", out)
    assert data["ray_train"]["steps"] == 8 and data["plain"]["steps"] == 8
    for side in ("ray_train", "plain"):
        figures = data[side]
        assert figures["samples"] == 8 * 16
        assert figures["samples_per_s"] == figures["steady_samples_per_s"]
        _split_rates(figures, "samples", 8 * 16)
    assert 0 < data["plain"]["prepare_s"] < data["plain"]["seconds"]
    assert math.isclose(data["ratio"],
                        data["ray_train"]["steady_samples_per_s"] / data["plain"]["steady_samples_per_s"])
    assert math.isclose(data["ratio_end_to_end"],
                        data["ray_train"]["end_to_end_samples_per_s"] / data["plain"]["end_to_end_samples_per_s"])
    assert data["student_params"] > 0
    from benchmarks import report

    assert "| steady samples/s | start-up s | end-to-end samples/s | seconds |" in report.render(tmp_path)


def _run(seconds: float, steady: float, samples: int, **extra: float) -> dict:
    return {"seconds": seconds, "samples": samples, "steady_samples_per_s": steady,
            "end_to_end_samples_per_s": samples / seconds, "startup_s": seconds - samples / steady, **extra}


def test_pipeline_figures_from_the_four_measurements(tmp_path: Path) -> None:
    # The stream benchmark's runs are Ray Train runs of the same kind as tests/test_e2e_run.py's (write-through,
    # then cache mode) and train_throughput's (rates from the reports); its own part is the arithmetic.
    # Two epochs of 12 steps of 32 (384 caption rows per epoch); the teacher alone embeds 96 images at 48/s.
    teacher = {"images": 96, "captions": 393, "seconds": 3.0, "steady_images_per_s": 48.0,
               "end_to_end_images_per_s": 32.0, "startup_s": 1.0}
    student = _run(10.0, 192.0, 768)
    no_cache = _run(16.0, 128.0, 768, teacher_images_embedded=200)
    write_through = _run(12.0, 160.0, 768, teacher_images_embedded=108)
    figures = pipeline.pipeline_figures(teacher, no_cache, write_through, student, epoch_samples=384, epochs=2)
    # One epoch at the steady rates: teacher 96 / 48 = 2 s, student 384 / 192 = 2 s, stream 384 / 128 = 3 s.
    assert (figures["t_teacher_s"], figures["t_student_s"], figures["t_stream_s"]) == (2.0, 2.0, 3.0)
    assert math.isclose(figures["overlap_efficiency"], 4 / 3)
    # Whole runs spread over 2 epochs: teacher 3 s, student 10 / 2, stream 16 / 2: (3 + 5) / 8.
    assert figures["end_to_end"] == {"t_teacher_s": 3.0, "t_student_s": 5.0, "t_stream_s": 8.0,
                                     "overlap_efficiency": 1.0}
    assert math.isclose(figures["cache_saving"], 1 - 12 / 16)
    assert math.isclose(figures["cache_saving_steady"], 1 - 128 / 160)
    assert figures["write_through"]["cache_hits"] == 92 and figures["teacher_alone"] == teacher
    assert figures["student_alone"] == student and figures["no_cache"] == no_cache
    from benchmarks import report

    common.write_result(common.result("pipeline", {"epochs": 2}, epoch_steps=12, epochs=2, **figures), tmp_path)
    assert "| 1.333 | 1.000 |" in report.render(tmp_path)


def test_quality(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYDISTILL_HOME", str(tmp_path / "home"))
    tiny = ["--teacher", "tiny", "--lrs", "1e-3", "3e-3", "--beta2s", "0.98", "0.999", "--warmups", "0.1",
            "--seeds", "2", "--finalists", "2", "--steps", "4", "--long-steps", "6", "--curve-every", "2",
            "--batch-size", "16", "--images", "120", "--threads", "1", "--out", str(tmp_path),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    import torch

    # Spy on training: the weights it returns as the best must be the model's at the curve's first best point.
    real_train_arm, trained = quality.train_arm, []

    def spy(cfg, rows, dim, vocab, steps, validate, every):
        snapshots = []

        def snapshot_then_validate(model):
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            return validate(model)

        model, curve, best = real_train_arm(cfg, rows, dim, vocab, steps, snapshot_then_validate, every)
        trained.append((curve, best, snapshots))
        return model, curve, best

    monkeypatch.setattr(quality, "train_arm", spy)
    out = quality.main(["--arms", "dsmd", "baseline", "no_cosine", *tiny])
    monkeypatch.setattr(quality, "train_arm", real_train_arm)
    data = _written(tmp_path, "quality", out)
    assert len(trained) == len(data["runs"])
    for (curve, best, snapshots), record in zip(trained, data["runs"]):
        first_best = next(i for i, (_, v) in enumerate(curve) if v == max(v for _, v in curve))
        assert record["best_step"] == curve[first_best][0] and record["curve"] == curve
        assert all(torch.equal(best[k], snapshots[first_best][k]) for k in best)
        if record["best_step"] == record["steps"]:
            assert record["test_best"] == record["test"]
    assert [row["arm"] for row in data["ablation"]] == ["dsmd", "baseline", "no_cosine"]
    grid = [(lr, b2) for lr in (1e-3, 3e-3) for b2 in (0.98, 0.999)]
    for row in data["ablation"][:2]:
        runs = [r for r in data["runs"] if r["arm"] == row["arm"] and r["steps"] == 4]
        # Every setting with seed 0, then the two best of those with seed 1; each run once.
        assert [(r["lr"], r["beta2"], r["seed"]) for r in runs[:4]] == [(lr, b2, 0) for lr, b2 in grid]
        first = {(r["lr"], r["beta2"]): r["val_rsum"] for r in runs[:4]}
        finalists = sorted(grid, key=lambda s: (first[s], s), reverse=True)[:2]
        assert sorted((r["lr"], r["beta2"]) for r in runs[4:]) == sorted(finalists)
        assert all(r["seed"] == 1 for r in runs[4:]) and len(runs) == 6
        mean = {s: (first[s] + next(r["val_rsum"] for r in runs[4:] if (r["lr"], r["beta2"]) == s)) / 2
                for s in finalists}
        assert (row["lr"], row["beta2"], row["warmup"], row["steps"]) == (*max(mean, key=lambda s: (mean[s], s)),
                                                                          0.1, 4)
        labels = {f"lr {lr:g}, beta2 {b2:g}, warm-up 0.1": s for s, (lr, b2) in zip(grid, grid)}
        for label, values in row["val_rsum_by_setting"].items():
            assert values["seed_0"] == first[labels[label]]
            assert values["mean"] == (pytest.approx(mean[labels[label]]) if labels[label] in mean else None)
        chosen = [r for r in runs if (r["lr"], r["beta2"]) == (row["lr"], row["beta2"])]
        assert row["rsum_per_seed"] == [r["test"]["rsum"] for r in chosen]
        assert math.isclose(row["rsum"], sum(row["rsum_per_seed"]) / 2)
        # The curve: validation RSUM every 2 steps, the last point the run's val_rsum; the row's is the mean.
        assert [[s for s, _ in r["curve"]] for r in chosen] == [[2, 4], [2, 4]]
        assert all(r["curve"][-1][1] == r["val_rsum"] for r in chosen)
        assert row["val_curve"] == [[2, pytest.approx((chosen[0]["curve"][0][1] + chosen[1]["curve"][0][1]) / 2)],
                                    [4, pytest.approx((chosen[0]["curve"][1][1] + chosen[1]["curve"][1][1]) / 2)]]
        assert row["select_on"] == quality.SELECT_ON and 0 <= row["rsum"] <= 600
    # The converged budget: both arms at their own setting, every seed, 6 steps.
    for name, arm in (("distilled", "dsmd"), ("baseline", "baseline")):
        row, short = data["converged"][name], data["ablation"][0 if arm == "dsmd" else 1]
        long_runs = [r for r in data["runs"] if r["arm"] == arm and r["steps"] == 6]
        assert [(r["lr"], r["beta2"], r["seed"]) for r in long_runs] == [(short["lr"], short["beta2"], s) for s in (0, 1)]
        assert row["rsum_per_seed"] == [r["test"]["rsum"] for r in long_runs] and row["steps"] == 6
        assert [s for s, _ in row["val_curve"]] == [2, 4, 6]
        # ... and each run tested at its best validation step too.
        assert row["at_best"]["rsum_per_seed"] == [r["test_best"]["rsum"] for r in long_runs]
        assert row["at_best"]["best_step_per_seed"] == [r["best_step"] for r in long_runs]
        assert math.isclose(row["at_best"]["t2i_r1"], sum(r["test_best"]["t2i_r1"] for r in long_runs) / 2)
    assert math.isclose(data["converged"]["gain_rsum"],
                        data["converged"]["distilled"]["rsum"] - data["converged"]["baseline"]["rsum"])
    assert math.isclose(data["converged"]["gain_rsum_at_best"], data["converged"]["distilled"]["at_best"]["rsum"]
                        - data["converged"]["baseline"]["at_best"]["rsum"])
    from benchmarks import report

    at_best = data["converged"]["baseline"]["at_best"]
    line = next(x for x in report.render(tmp_path).splitlines() if x.startswith("| baseline (converged, best val"))
    assert f"| {' / '.join(map(str, at_best['best_step_per_seed']))} |" in line
    assert f"| {at_best['rsum']:.1f} | {at_best['rsum_std']:.1f} |" in line
    # The ablation arm trains at DSMD's setting.
    ablation = data["ablation"][2]
    assert (ablation["lr"], ablation["beta2"]) == (data["ablation"][0]["lr"], data["ablation"][0]["beta2"])
    assert ablation["select_on"] == quality.ABLATION_SELECT_ON and len(ablation["rsum_per_seed"]) == 2
    assert math.isclose(data["gain_rsum"], data["distilled"]["rsum"] - data["baseline"]["rsum"])
    assert 0 <= data["teacher"]["rsum"] <= 600 and data["teacher"]["params"] > 0
    assert ray.is_initialized()  # it left the module's instance running

    # MLflow holds every trained run with its settings and validation curve.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(quality.EXPERIMENT)
    tracked = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(tracked) == len(data["runs"]) == 6 + 6 + 2 + 2 + 2
    one = next(r for r in data["runs"] if r["arm"] == "dsmd" and r["steps"] == 6 and r["seed"] == 1)
    history = client.get_metric_history(one["mlflow_run_id"], "val_rsum")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(v)) for s, v in one["curve"]]
    assert client.get_run(one["mlflow_run_id"]).data.params["beta2"] == str(one["beta2"])
    assert (tmp_path / "quality.png").stat().st_size > 0  # the curves' plot

    # A second call reuses the journal's runs (nothing trains) and gives the same result; --merge keeps the
    # file's other arms.
    def no_training(*args, **kwargs):
        raise AssertionError("trained a run the journal holds")

    with monkeypatch.context() as patched:
        patched.setattr(quality, "train_arm", no_training)
        merged = quality.main(["--arms", "dsmd", "no_cosine", "--merge", *tiny])
    assert [row["arm"] for row in merged["ablation"]] == ["dsmd", "baseline", "no_cosine"]
    assert merged["ablation"] == data["ablation"]
    # --rerun trains them again: the same recall, run for run (training is deterministic for its settings).
    rerun = quality.main(["--arms", "no_cosine", "dsmd", "--rerun", "--long-steps", "0",
                          *[a for a in tiny if a not in ("--long-steps", "6")]])
    assert [(r["arm"], r["lr"], r["seed"], r["val_rsum"], r["test"]["rsum"]) for r in rerun["runs"]] == [
        (r["arm"], r["lr"], r["seed"], r["val_rsum"], r["test"]["rsum"]) for r in data["runs"]
        if r["arm"] in ("dsmd", "no_cosine") and r["steps"] == 4]
    # The README's table (benchmarks.report): RSUM and its spread over seeds, one decimal each, with the budget.
    md = report.render(tmp_path)
    for row in rerun["ablation"]:
        line = next(x for x in md.splitlines() if x.startswith(f"| {row['arm']} |"))
        assert f"| {row['rsum']:.1f} | {row['rsum_std']:.1f} | {row['params']:,} |" in line
        assert line.startswith(f"| {row['arm']} | 4 | {row['lr']:g} / {row['beta2']:g} / 0.1 |")
    with pytest.raises(SystemExit, match="steps: file 4, now 5"):
        quality.main(["--arms", "no_cosine", "--merge", *[a if a != "4" else "5" for a in tiny]])


def test_quality_journal_ignores_a_line_cut_off_mid_write_and_other_data(tmp_path: Path) -> None:
    identity = {"teacher": "demo", "teacher_rsum": 400.0, "images": 1500, "batch_size": 128, "student": "demo",
                "threads": 2}
    path = tmp_path / "runs.jsonl"
    journal = quality.Journal(path, identity)
    setting = quality.Setting(1e-3, 0.98, 0.05)
    journal.add({"arm": "dsmd", "lr": 1e-3, "beta2": 0.98, "warmup": 0.05, "seed": 0, "steps": 300, "val_rsum": 1.0})
    other = quality.Journal(path, identity | {"teacher_rsum": 401.0})
    other.add({"arm": "dsmd", "lr": 1e-3, "beta2": 0.98, "warmup": 0.05, "seed": 0, "steps": 300, "val_rsum": 2.0})
    with path.open("a") as f:
        f.write('{"arm": "dsmd", "lr": 0.0')  # stopped mid-write
    again = quality.Journal(path, identity)
    assert again.get("dsmd", setting, 0, 300)["val_rsum"] == 1.0  # not the other data's run
    assert again.get("dsmd", setting, 1, 300) is None
    # A run recorded before a field was measured is not reused where that field is needed.
    assert again.get("dsmd", setting, 0, 300, needs=("test_best",)) is None
    assert quality.Journal(path, identity, reuse=False).get("dsmd", setting, 0, 300) is None
    path.write_text('not json\n{"arm": "dsmd"}\n')
    with pytest.raises(SystemExit, match="line 1: not a JSON run record"):
        quality.Journal(path, identity)


def test_scaling_efficiency_is_relative_to_the_smallest_worker_count() -> None:
    rows = [{"workers": 4, "samples_per_s": 300.0}, {"workers": 2, "samples_per_s": 200.0},
            {"workers": 8, "samples_per_s": 400.0}]
    scaling.add_efficiency(rows)  # per worker at 2 workers: 100 samples/s
    assert [r["efficiency"] for r in rows] == [0.75, 1.0, 0.5]


def test_scale_run_row_is_the_median_of_the_repeats_with_the_largest_peaks() -> None:
    runs = [{"driver_peak_rss_mb": 1200.0, "object_store_peak_mb": 180.0, "object_store_training_peak_mb": 170.0,
             "object_store_samples": 300, "object_store_samples_failed": 0, "seconds": 80.0, "samples_per_s": 1500.0},
            {"driver_peak_rss_mb": 1250.0, "object_store_peak_mb": 150.0, "object_store_training_peak_mb": 150.0,
             "object_store_samples": 350, "object_store_samples_failed": 2, "seconds": 95.0, "samples_per_s": 900.0},
            {"driver_peak_rss_mb": 1210.0, "object_store_peak_mb": 160.0, "object_store_training_peak_mb": 190.0,
             "object_store_samples": 290, "object_store_samples_failed": 1, "seconds": 78.0, "samples_per_s": 1800.0}]
    assert scale.run_row(1_000_000, runs) == {
        "command": "run", "images": 1_000_000, "driver_peak_rss_mb": 1250.0, "object_store_peak_mb": 180.0,
        "object_store_training_peak_mb": 190.0, "object_store_samples": 940, "object_store_samples_failed": 3,
        "seconds": 80.0, "samples_per_s": 1500.0, "seconds_runs": [80.0, 95.0, 78.0], "samples_per_s_runs": [1500.0, 900.0, 1800.0]}
