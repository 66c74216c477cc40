"""`raydistill demo`: the whole product on a laptop with no GPU and no network.

1. synthesise the captioned-scenes dataset (cached under $RAYDISTILL_HOME);
2. get the demo teacher (fitted by ``raydistill run configs/demo-teacher.yaml`` on first use, then cached);
3. distil a ~7x smaller student with DSMD (``configs/demo.yaml``): teacher actor pool -> Ray Train -> eval;
4. train the same student without distillation (ground-truth contrastive) as the baseline, with the same
   data, steps, optimizer and schedule, each arm at its own best learning rate (chosen by the quality
   benchmark's grid, see benchmarks/results/quality.json);
5. print teacher vs distilled vs baseline, plot both students' validation RSUM over training, and give the
   ``mlflow ui`` command that compares the runs.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from raydistill.config import load_config
from raydistill.demo_assets import config_path
from raydistill.pipeline.runner import log, run_experiment

# Each arm's learning rate: the best validation RSUM of the grid {5e-4, 1e-3, 2e-3} (seed 0, 300 steps, the
# demo's data and student) in benchmarks/results/quality.json (`python -m benchmarks.quality --arms dsmd
# baseline`). Distilled: 499.0 / 491.9 / 489.0; baseline: 310.9 / 351.3 / 165.4.
DISTILLED_LR = 5e-4
BASELINE_LR = 1e-3
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mean_recall")


def _arm_overrides(quick: bool, output_dir: str, seed: int) -> list[str]:
    common = [f"output_dir={output_dir}", f"train.seed={seed}", "train.cpus_per_worker=2"]
    if quick:
        # A smoke run: 400 scenes of the same generator and 30 steps (numbers are not comparable with the full demo).
        common += ["data.synth.n_images=400", "train.steps=30", "train.eval_every=15", "train.checkpoint_every=30",
                   "train.log_every=10", "distill.queue_size=1024"]
    else:
        common += ["train.eval_every=50"]
    return common


def run_demo(quick: bool = False, output_dir: str = "raydistill_runs/demo", seeds: int | None = None) -> dict[str, Any]:
    """Run teacher vs distilled vs baseline and return the comparison (the `--json` object)."""
    start = time.perf_counter()
    output_dir = str(Path(output_dir).resolve())
    n_seeds = seeds or 1
    from raydistill.demo_assets import ensure_demo_teacher
    from raydistill.pipeline.runner import init_ray

    init_ray(load_config(config_path("demo.yaml")))
    teacher_dir = ensure_demo_teacher(quick=quick)
    log(f"[demo] teacher: {teacher_dir}")
    distilled_runs, baseline_runs = [], []
    for seed in range(n_seeds):
        base = _arm_overrides(quick, output_dir, seed) + ["teacher.kind=raydistill", f"teacher.checkpoint={teacher_dir}"]
        log(f"[demo] seed {seed}: distilled student (DSMD, lr {DISTILLED_LR:g})")
        cfg = load_config(config_path("demo.yaml"), base + [f"train.lr={DISTILLED_LR}", "name=demo-dsmd"])
        distilled_runs.append(run_experiment(cfg, tags={"demo.arm": "distilled", "demo.seed": str(seed)}))
        teacher_dim = _embed_dim(distilled_runs[-1])
        log(f"[demo] seed {seed}: undistilled baseline (ground-truth contrastive, lr {BASELINE_LR:g})")
        cfg = load_config(
            config_path("demo.yaml"),
            base + [f"train.lr={BASELINE_LR}", "name=demo-baseline", "distill.objective=ground_truth",
                    f"student.embed_dim={teacher_dim}"],
        )
        baseline_runs.append(run_experiment(cfg, tags={"demo.arm": "baseline", "demo.seed": str(seed)}))

    log("[demo] embedding throughput of the three models (same images, batch and threads, one after another)")
    teacher = _row(distilled_runs[0]["metrics"]["teacher"], params=_teacher_params(teacher_dir),
                   throughput=_images_per_s(teacher_dir))
    distilled = _arm(distilled_runs) | {"images_per_s": _images_per_s(Path(distilled_runs[0]["student_dir"]))}
    baseline = _arm(baseline_runs) | {"images_per_s": _images_per_s(Path(baseline_runs[0]["student_dir"]))}
    plot = Path(output_dir) / "demo_rsum_curves.png"
    _plot_curves(distilled_runs, baseline_runs, plot)
    uri = distilled_runs[0]["mlflow_tracking_uri"]
    summary = {
        "teacher": teacher,
        "distilled": distilled,
        "baseline": baseline,
        "seeds": n_seeds,
        "steps": distilled_runs[0]["steps"],
        "mlflow_tracking_uri": uri,
        "plot": str(plot),
        "runs": {"distilled": [r["run_id"] for r in distilled_runs], "baseline": [r["run_id"] for r in baseline_runs]},
        "seconds": round(time.perf_counter() - start, 1),
    }
    _print_table(summary)
    return summary


def _embed_dim(summary: dict[str, Any]) -> int:
    import json

    cfg = json.loads((Path(summary["student_dir"]) / "config.json").read_text())
    return int(cfg["student"]["embed_dim"])


def _teacher_params(teacher_dir: Path) -> int:
    from raydistill.models.student import load_dual_encoder

    model, _, _ = load_dual_encoder(teacher_dir)
    return int(model.num_parameters())


def _images_per_s(model_dir: Path, n: int = 512, batch: int = 256) -> float:
    """Image-embedding throughput of a saved dual encoder in this process: best of three passes over ``n``
    random images at the model's input size (the cost does not depend on the pixels)."""
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
        for _ in range(3):
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
        return (f"{name:<22}" + "".join(f"{m[k]:7.1f}" for k in RECALL_KEYS[:7]) + f" {params} {speed}")

    out = sys.stderr
    print("", file=out)
    print(f"{'model':<22}" + "".join(f"{h:>7}" for h in ("I2T@1", "I2T@5", "I2T@10", "T2I@1", "T2I@5", "T2I@10", "RSUM"))
          + "  params  img/s", file=out)
    print(line("teacher", s["teacher"]), file=out)
    print(line("distilled student", s["distilled"]), file=out)
    print(line("baseline student", s["baseline"]), file=out)
    d, b, t = s["distilled"], s["baseline"], s["teacher"]
    spread = ""
    if s["seeds"] > 1:
        spread = (f" (RSUM range over {s['seeds']} seeds: distilled {d['rsum_min']:.1f}-{d['rsum_max']:.1f}, "
                  f"baseline {b['rsum_min']:.1f}-{b['rsum_max']:.1f})")
    print(f"\ndistillation gain: {d['rsum'] - b['rsum']:+.1f} RSUM; distilled student reaches "
          f"{100 * d['rsum'] / t['rsum']:.0f}% of the teacher's RSUM{spread}", file=out)
    if s["seeds"] == 1:
        print("one seed per arm; `raydistill demo --seeds 2` states the spread", file=out)
    print(f"RSUM over training: {s['plot']}", file=out)
    print(f"compare the runs:   mlflow ui --backend-store-uri {s['mlflow_tracking_uri']}", file=out)
    print(f"({s['seconds']:.0f} s)", file=out)
