"""`raydistill demo`: the whole product on a laptop with no GPU and no network.

1. synthesise the captioned-scenes dataset (cached under $RAYDISTILL_HOME);
2. get the demo teacher (fitted by ``raydistill run configs/demo-teacher.yaml`` on first use, then cached);
3. distil a ~7x smaller student with DSMD (``configs/demo.yaml``): teacher actor pool -> Ray Train -> eval;
4. train the same student without distillation (ground-truth contrastive) as the baseline, with the same
   data, steps and optimizer, each arm at its own best setting (learning rate, AdamW beta2, warm-up: chosen
   by the quality benchmark's search, see benchmarks/results/quality.json);
5. print teacher vs distilled vs baseline, plot both students' validation RSUM over training, and give the
   ``mlflow ui`` command that compares the runs.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from raydistill.config import load_config
from raydistill.demo_assets import (
    DEMO_TEACHER_CONFIG,
    QUICK_TEACHER_OVERRIDES,
    config_path,
    demo_teacher_dir,
    find_demo_teacher,
)
from raydistill.paths import publish_dir, raydistill_home
from raydistill.pipeline.progress import LOG_PREFIX, log, recall_header, recall_line
from raydistill.pipeline.runner import run_experiment

# Each arm's training setting: the one the quality benchmark chose for it (benchmarks/results/quality.json,
# `python -m benchmarks.quality`): the same search for both arms over learning rate x AdamW beta2 x warm-up
# fraction at 300 steps, on the best mean validation RSUM over 3 seeds. A test keeps these equal to the file's.
DISTILLED_SETTING = {"lr": 2e-3, "adam_beta2": 0.98, "warmup_fraction": 0.2}
BASELINE_SETTING = {"lr": 1e-3, "adam_beta2": 0.98, "warmup_fraction": 0.2}
QUICK_STEPS = 10
RAY_CPUS = 6  # logical CPUs of the demo's local instance: two Train workers of 2 CPUs, the teacher actor and tasks
QUICK_RAY_CPUS = 4  # --quick: two Train workers of 1 CPU, the teacher actor and a decoding task
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mean_recall")


def ensure_demo_teacher(quick: bool = False) -> Path:
    """The demo teacher: the shipped checkpoint, a locally fitted one, or one fitted now (first use only).

    Args:
        quick: accept (and, if needed, fit) the smoke-test teacher of `raydistill demo --quick` when no full
            demo teacher exists yet.
    """
    import os
    import shutil

    found = find_demo_teacher(quick)
    if found is not None:
        return found
    target = demo_teacher_dir(quick)
    log("fitting the demo teacher on the synthetic scenes (first use only; "
        "`raydistill run configs/demo-teacher.yaml` does the same)")
    overrides = [f"output_dir={raydistill_home() / 'demo-teacher-runs'}"] + (QUICK_TEACHER_OVERRIDES if quick else [])
    summary = run_experiment(load_config(config_path(DEMO_TEACHER_CONFIG), overrides))
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(summary["student_dir"], tmp)
    publish_dir(tmp, target)
    return target


def _setting(setting: dict[str, float]) -> list[str]:
    return [f"train.{key}={value}" for key, value in setting.items()]


def _describe(setting: dict[str, float]) -> str:
    return f"lr {setting['lr']:g}, beta2 {setting['adam_beta2']:g}, warm-up {setting['warmup_fraction']:g}"


def _arm_overrides(quick: bool, output_dir: str, seed: int) -> list[str]:
    # --quick trains its two arms side by side: a worker of 1 CPU (one torch thread) each keeps them from
    # oversubscribing a 2-core laptop, which costs CPU time for the same results.
    # The local Ray instance keeps its dashboard: Ray Train's placement-group cleaner asks the dashboard's State API
    # whether the controller is alive, and warns every second when it cannot.
    common = [f"output_dir={output_dir}", f"train.seed={seed}", f"train.cpus_per_worker={1 if quick else 2}",
              f"ray.num_cpus={QUICK_RAY_CPUS if quick else RAY_CPUS}"]
    if quick:
        # A smoke run: 400 scenes of the same generator, 10 steps of 64 (numbers are not comparable with the full
        # demo's; every stage still runs: teacher pool, cache, Ray Train, validation, checkpoint, eval, MLflow).
        common += ["data.synth.n_images=400", f"train.steps={QUICK_STEPS}", "train.batch_size=64",
                   "train.eval_every=5", f"train.checkpoint_every={QUICK_STEPS}", "train.log_every=5",
                   "distill.queue_size=1024", "ray.shuffle_partitions=4"]
    else:
        common += ["train.eval_every=50"]
    return common


def run_demo(quick: bool = False, output_dir: str = "raydistill_runs/demo", seeds: int | None = None) -> dict[str, Any]:
    """Run teacher vs distilled vs baseline and return the comparison (the `--json` object).

    With ``quick`` the two arms of a seed run at the same time on the local Ray instance (each a Ray Train run
    with its own MLflow run): most of a smoke run is Ray start-up (processes importing torch, the Train
    controller, the dataset coordinator), which leaves cores idle that the other arm uses. The full demo runs
    them one after the other: there the training loops dominate, and two of them side by side would fight for
    the same cores. Results do not depend on it: each arm has its own seed, data order and worker.
    """
    start = time.perf_counter()
    output_dir = str(Path(output_dir).resolve())
    n_seeds = seeds or 1
    from raydistill.data.source import caption_files
    from raydistill.pipeline.ray_env import init_ray, warm_imports

    demo_cfg = load_config(config_path("demo.yaml"), _arm_overrides(quick, output_dir, 0))

    def prepare() -> None:
        # Shared by both arms, so made once before they start: the synthetic dataset and the MLflow store; and
        # the driver's own heavy imports. All of it while the local Ray instance starts (mostly waiting).
        warm_imports()
        caption_files(demo_cfg)  # writes the synthetic scenes on first use
        _create_tracking_store(demo_cfg)

    _side_by_side(("prepare", prepare), ("ray", lambda: init_ray(demo_cfg)), main="ray")
    teacher_dir = ensure_demo_teacher(quick=quick)
    log(f"[demo] teacher: {teacher_dir}")
    teacher_dim = _embed_dim(teacher_dir)
    distilled_runs, baseline_runs = [], []
    for seed in range(n_seeds):
        base = _arm_overrides(quick, output_dir, seed) + ["teacher.kind=raydistill", f"teacher.checkpoint={teacher_dir}"]
        distilled_cfg = load_config(config_path("demo.yaml"), base + _setting(DISTILLED_SETTING) + ["name=demo-dsmd"])
        baseline_cfg = load_config(
            config_path("demo.yaml"),
            base + _setting(BASELINE_SETTING) + ["name=demo-baseline", "distill.objective=ground_truth",
                                                 f"student.embed_dim={teacher_dim}"],
        )
        arms = (
            ("distilled", lambda: run_experiment(distilled_cfg, tags={"demo.arm": "distilled", "demo.seed": str(seed)})),
            ("baseline", lambda: run_experiment(baseline_cfg, tags={"demo.arm": "baseline", "demo.seed": str(seed)})),
        )
        log(f"[demo] seed {seed}: distilled student (DSMD, {_describe(DISTILLED_SETTING)}) and undistilled baseline "
            f"(ground-truth contrastive, {_describe(BASELINE_SETTING)}), "
            f"{'side by side' if quick else 'one after the other'}")
        if quick:
            distilled, baseline = _side_by_side(*arms)
        else:
            distilled, baseline = [_side_by_side(arm)[0] for arm in arms]
        distilled_runs.append(distilled)
        baseline_runs.append(baseline)

    log("[demo] embedding throughput of the three models (same images, batch and threads, one after another)")
    speed = {"n": 128, "batch": 128, "passes": 1} if quick else {}  # a smoke run: one short pass per model
    teacher = _row(distilled_runs[0]["metrics"]["teacher"], params=_teacher_params(teacher_dir),
                   throughput=_images_per_s(teacher_dir, **speed))
    distilled = _arm(distilled_runs) | {"images_per_s": _images_per_s(Path(distilled_runs[0]["student_dir"]), **speed)}
    baseline = _arm(baseline_runs) | {"images_per_s": _images_per_s(Path(baseline_runs[0]["student_dir"]), **speed)}
    plot = Path(output_dir) / "demo_rsum_curves.png"
    _plot_curves(distilled_runs, baseline_runs, plot)
    uri = distilled_runs[0]["mlflow_tracking_uri"]
    summary = {
        "teacher": teacher,
        "distilled": distilled,
        "baseline": baseline,
        "seeds": n_seeds,
        "quick": quick,
        "steps": distilled_runs[0]["steps"],
        "mlflow_tracking_uri": uri,
        "plot": str(plot),
        "runs": {"distilled": [r["run_id"] for r in distilled_runs], "baseline": [r["run_id"] for r in baseline_runs]},
        "seconds": round(time.perf_counter() - start, 1),
    }
    _print_table(summary)
    return summary


def _side_by_side(*arms: tuple[str, Any], main: str | None = None) -> list[Any]:
    """Run each ``(name, function)`` at the same time, ``main`` in this thread (``ray.init`` wants the main
    thread) and the others in their own (their log lines carry the name); results in order.

    The first failure is raised once every arm has ended (an arm is never left running behind an error).
    """
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def target(name: str, fn: Any, tagged: bool = True) -> None:
        if tagged:
            LOG_PREFIX.set(f"[{name}] ")
        try:
            results[name] = fn()
        except BaseException as error:  # re-raised in the caller's thread below
            errors.append(error)

    threads = [threading.Thread(target=target, args=arm, name=f"demo-{arm[0]}") for arm in arms if arm[0] != main]
    for thread in threads:
        thread.start()
    for name, fn in arms:
        if name == main:
            target(name, fn, tagged=False)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[name] for name, _ in arms]


def _create_tracking_store(cfg: Any) -> None:
    """Create the MLflow store (and its experiment) before two runs reach for it at once."""
    from mlflow.tracking import MlflowClient

    from raydistill.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(cfg.tracking.uri, Path(cfg.output_dir)))
    if client.get_experiment_by_name(cfg.tracking.experiment) is None:
        client.create_experiment(cfg.tracking.experiment)


def _embed_dim(model_dir: Path) -> int:
    from raydistill.models.student import read_saved_config

    return int(read_saved_config(model_dir)[0].embed_dim)


def _teacher_params(teacher_dir: Path) -> int:
    from raydistill.models.student import load_dual_encoder

    model, _, _ = load_dual_encoder(teacher_dir)
    return int(model.num_parameters())


def _images_per_s(model_dir: Path, n: int = 512, batch: int = 256, passes: int = 3) -> float:
    """Image-embedding throughput of a saved dual encoder in this process: the best of ``passes`` passes over
    ``n`` random images at the model's input size (the cost does not depend on the pixels)."""
    import numpy as np
    import torch

    from raydistill.models.student import load_dual_encoder

    model, _, _ = load_dual_encoder(model_dir)
    model.eval()
    size = model.config.image_size
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    best = 0.0
    with torch.inference_mode():
        model.encode_image(model.preprocess_images(images[:batch]))  # warm-up
        for _ in range(passes):
            start = time.perf_counter()
            for i in range(0, n, batch):
                model.encode_image(model.preprocess_images(images[i:i + batch]))
            best = max(best, n / (time.perf_counter() - start))
    return best


def _row(metrics: dict[str, float], params: int | None, throughput: float | None = None) -> dict[str, Any]:
    row = {k: float(metrics[k]) for k in RECALL_KEYS}
    row["params"] = params
    if throughput is not None:
        row["images_per_s"] = throughput
    return row


def _arm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of each recall, with the RSUM range (the spread)."""
    metrics = [r["metrics"]["student"] for r in runs]
    row = {k: statistics.fmean(m[k] for m in metrics) for k in RECALL_KEYS}
    row["rsum_min"] = min(m["rsum"] for m in metrics)
    row["rsum_max"] = max(m["rsum"] for m in metrics)
    row["rsum_per_seed"] = [m["rsum"] for m in metrics]
    row["params"] = runs[0]["student_params"]
    row["images_per_s"] = statistics.fmean(m["images_per_s"] for m in metrics)
    row["captions_per_s"] = statistics.fmean(m["captions_per_s"] for m in metrics)
    return row


def _curve(run: dict[str, Any]) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h["val_rsum"])) for h in run.get("history", []) if "val_rsum" in h]


def _plot_curves(distilled: list[dict[str, Any]], baseline: list[dict[str, Any]], out: Path) -> None:
    from raydistill.plots import plot_rsum_curves

    curves = {}
    for name, runs in (("distilled (DSMD)", distilled), ("baseline (no distillation)", baseline)):
        for k, run in enumerate(runs):
            points = _curve(run)
            if points:
                curves[f"{name}, seed {k}" if len(runs) > 1 else name] = points
    if curves:
        plot_rsum_curves(curves, out)


def _print_table(s: dict[str, Any]) -> None:
    def line(name: str, m: dict[str, Any]) -> str:
        params = f"{m['params'] / 1e6:6.2f}M" if m.get("params") else "      -"
        speed = f"{m['images_per_s']:8.0f}" if m.get("images_per_s") else "       -"
        return recall_line(name, m, 22, f" {params} {speed}")

    out = sys.stderr
    print("", file=out)
    print(recall_header(22, "  params  img/s"), file=out)
    print(line("teacher", s["teacher"]), file=out)
    print(line("distilled student", s["distilled"]), file=out)
    print(line("baseline student", s["baseline"]), file=out)
    d, b, t = s["distilled"], s["baseline"], s["teacher"]
    spread = ""
    if s["seeds"] > 1:
        spread = (f" (RSUM range over {s['seeds']} seeds: distilled {d['rsum_min']:.1f}-{d['rsum_max']:.1f}, "
                  f"baseline {b['rsum_min']:.1f}-{b['rsum_max']:.1f})")
    print(f"\ndistillation gain at {s['steps']:,} steps: {d['rsum'] - b['rsum']:+.1f} RSUM; distilled student reaches "
          f"{100 * d['rsum'] / t['rsum']:.0f}% of the teacher's RSUM{spread}", file=out)
    if s["seeds"] == 1:
        print("one seed per arm; `raydistill demo --seeds 2` states the spread", file=out)
    print(f"RSUM over training: {s['plot']}", file=out)
    print(f"compare the runs:   mlflow ui --backend-store-uri {s['mlflow_tracking_uri']}", file=out)
    if s.get("quick"):
        print(f"--quick is a smoke run ({s['steps']} steps): its recall numbers compare nothing; "
              "`raydistill demo` trains the arms for real", file=out)
    print(f"({s['seconds']:.0f} s)", file=out)
