"""Distillation quality on the embedded benchmark: teacher, DSMD student, undistilled baseline, ablations.

The fitted demo teacher embeds the synthetic captioned scenes once, through the real pipeline
(``raydistill embed``: actor pool -> Parquet cache, kept under ``RAYDISTILL_HOME`` for later runs of the same
teacher and data: :func:`reusable_cache_dir`). Every student arm then trains in this process with the training
step the Ray Train workers run (``pipeline.trainer.Trainer``) on the cached rows, read and decoded here with the
pipeline's row functions, and is evaluated as a run evaluates (``pipeline.evaluate.embed_split``), all with the
same data, steps, batch size, optimizer and schedule:

- ``dsmd``: the four losses and the ``dsmd`` balancer (configs/demo.yaml);
- ``baseline``: the same student without a teacher (ground-truth image-text contrastive loss);
- ``no_<term>``: DSMD with one loss removed;
- ``balancer_<kind>``: DSMD with another balancer (``dsmd_rate``, ``fixed`` equal weights, ``dwa``,
  ``uncertainty``).

Each arm gets its own best learning rate from a small grid (a baseline at a bad learning rate flatters
distillation): every rate of the grid runs with every seed, and the rate with the best mean validation RSUM over
the seeds is chosen (choosing on one seed favoured rates at the edge of stability, where another seed
collapsed). The table gives the test-split mean and spread (sample standard deviation) over the seeds at that
rate.

    python -m benchmarks.quality                               # the full table (about three hours on 2 cores)
    python -m benchmarks.quality --arms dsmd baseline --seeds 2  # just the headline gap
    python -m benchmarks.quality --arms no_feature --merge         # add arms to results/quality.json

``--merge`` keeps the arms already in the result file that this run does not re-measure, and reuses the file's
runs (arm, rate, seed) of the arms it measures instead of training them again (a run is deterministic for its
settings; ``--rerun`` trains them again); it refuses a file measured with other settings (steps, batch size,
images, grid, seeds, teacher) or whose teacher scored differently on the test split (other data or weights).
Rows measured by the earlier protocol (rate chosen on seed 0 alone) say so in their ``select_on``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import log

TERMS = ["feature", "cosine", "contrastive", "hard_negative"]
ARMS: dict[str, dict[str, Any]] = {
    "dsmd": {},
    "baseline": {"distill.objective": "ground_truth", "cache.mode": "stream"},
    **{f"no_{t}": {"distill.terms": [x for x in TERMS if x != t]} for t in TERMS},
    **{f"balancer_{k}": {"balancer.kind": k, "balancer.params": {}} for k in ("dsmd_rate", "fixed", "dwa", "uncertainty")},
}
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = copy.deepcopy(value)


def arm_config(base: dict[str, Any], arm: str, lr: float, seed: int, dim: int) -> Any:
    """The typed config of one arm at one learning rate and seed, from the benchmark's base config (a dict)."""
    from raydistill.config import config_from_dict

    raw = copy.deepcopy(base)
    raw["student"]["embed_dim"] = dim  # the teacher's: the baseline has no teacher to take it from
    for key, value in ARMS[arm].items():
        _set(raw, key, value)
    raw["train"]["lr"], raw["train"]["seed"] = lr, seed
    return config_from_dict(raw)


def reusable_cache_dir(cfg: Any) -> Path:
    """Where the teacher's embeddings of this benchmark's data are kept between runs (``--merge`` adds arms to a
    result without embedding again): ``<RAYDISTILL_HOME>/benchmarks/cache/<name>``, the name a hash of the
    cache's key (teacher identity, preprocessing, data) and of the teacher weights' fingerprint, so a folder is
    only ever reused for the same embeddings. What the arms measure does not depend on where they came from."""
    import hashlib

    from raydistill.data.source import source_identity
    from raydistill.models.teachers import load_teacher
    from raydistill.paths import raydistill_home
    from raydistill.pipeline.teacher_side import cache_key, teacher_spec

    spec = teacher_spec(cfg)
    key = cache_key(cfg, spec, source_identity(cfg))["hash"]
    name = hashlib.sha256(f"{key}:{load_teacher(spec).fingerprint}".encode()).hexdigest()[:16]
    return raydistill_home() / "benchmarks" / "cache" / name


def split_rows(cfg: Any, cache_dir: str, split: str) -> list[dict[str, Any]]:
    """A split's decoded image rows from the cache, one dict per image (what ``batches_from_rows`` takes)."""
    batch = common.cached_split(cfg, cache_dir, split)
    return [{k: batch[k][i] for k in batch} for i in range(len(batch["image_id"]))]


def evaluate(model: Any, rows: list[dict[str, Any]], tokenizer: Any, max_len: int, cfg: Any) -> dict[str, float]:
    """The student's recall (and embedding throughput) on a split held in memory, as a run evaluates it."""
    import torch

    from raydistill.pipeline.evaluate import batches_from_rows, embed_split, student_metrics

    emb = embed_split(batches_from_rows(rows, cfg.eval.batch_size), model, tokenizer, max_len, torch.device("cpu"))
    return student_metrics(emb, cfg.eval.chunk_size)


def train_arm(cfg: Any, rows: dict[str, np.ndarray], dim: int, vocab: int, steps: int) -> Any:
    """Train one student with the workers' training step; returns the model."""
    import random

    import torch

    from raydistill.pipeline.trainer import Trainer

    seed = cfg.train.seed
    random.seed(seed)
    np.random.seed(seed)
    trainer = Trainer(cfg, dim, vocab, steps, torch.device("cpu"))
    keys = [k for k in ("pixels", "input_ids", "attention_mask", "image_key", "sample_key", "t_img", "t_txt")
            if k in rows]
    tensors = {k: torch.as_tensor(rows[k]) for k in keys}
    n, batch = len(rows["input_ids"]), cfg.train.batch_size
    rng = np.random.default_rng(seed)
    while trainer.step < steps:
        order = torch.as_tensor(rng.permutation(n))
        for start in range(0, n - batch + 1, batch):
            idx = order[start:start + batch]
            trainer.train_step({k: v[idx] for k, v in tensors.items()})
            if trainer.step >= steps:
                break
        trainer.epoch += 1
    return trainer.raw_model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo", help="demo (the fitted demo teacher) | tiny (smoke test)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3], help="learning-rate grid")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--merge", action="store_true",
                   help="keep the other arms of the existing result file and reuse its runs (same settings and "
                        "teacher required)")
    p.add_argument("--rerun", action="store_true", help="with --merge: train the measured arms' runs again")
    args = p.parse_args(argv)
    previous = _previous(args) if args.merge else None

    import ray
    import torch

    from benchmarks.teacher_throughput import teacher_spec
    from raydistill.models.tokenizers import build_wordpiece_tokenizer
    from raydistill.pipeline.evaluate import batches_from_rows, embed_split, teacher_metrics
    from raydistill.pipeline.rows import explode_batch
    from raydistill.pipeline.runner import embed

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = teacher_spec(args.teacher, "cpu", work)
        overrides = [f"data.synth.n_images={args.images}", f"train.steps={args.steps}",
                     f"train.batch_size={args.batch_size}", "cache.mode=cache"]
        cfg = common.run_config(spec, work, overrides)
        cfg = common.run_config(spec, work, [*overrides, f"cache.dir={reusable_cache_dir(cfg)}"])
        started = not ray.is_initialized()
        common.start_ray()
        log("teacher pass through the pipeline into the cache")
        filled = embed(cfg)
        if started:  # the students train in this process: give the cores back
            ray.shutdown()
        batch = common.cached_split(cfg, filled["cache_dir"], cfg.data.train_split)
        # The vocabulary is learned from the training captions (it does not depend on their order).
        tokenizer = build_wordpiece_tokenizer([str(c) for caps in batch["captions"] for c in caps],
                                              vocab_size=cfg.student.vocab_size)
        max_len = common.student_max_len(cfg)
        rows = explode_batch(batch, tokenizer, max_len, with_teacher=True)
        val = split_rows(cfg, filled["cache_dir"], cfg.data.val_split)
        test = split_rows(cfg, filled["cache_dir"], cfg.data.test_split)
        teacher_params = sum(int(np.prod(s)) for s in _teacher_shapes(spec))
    dim = int(rows["t_img"].shape[1])
    base = cfg.model_dump(mode="json")
    teacher = teacher_metrics(embed_split(batches_from_rows(test, cfg.eval.batch_size), None, tokenizer, max_len,
                                          torch.device("cpu")), cfg.eval.chunk_size)
    log(f"{len(rows['input_ids'])} training captions, val {len(val)} / test {len(test)} images; "
        f"teacher test RSUM {teacher['rsum']:.1f}")

    teacher_row = {k: teacher[k] for k in RECALLS} | {"params": teacher_params}
    if previous is not None and abs(previous["teacher"]["rsum"] - teacher_row["rsum"]) > 1e-6:
        raise SystemExit(f"--merge: the teacher scored RSUM {teacher_row['rsum']:.4f} on the test split, the "
                         f"result file's {previous['teacher']['rsum']:.4f}: other data or weights; run all arms")
    runs: list[dict[str, Any]] = []

    def run(arm: str, lr: float, seed: int) -> dict[str, Any]:
        start = time.perf_counter()
        model = train_arm(arm_config(base, arm, lr, seed, dim), rows, dim, len(tokenizer), args.steps)
        record = {"arm": arm, "lr": lr, "seed": seed,
                  "val_rsum": evaluate(model, val, tokenizer, max_len, cfg)["rsum"],
                  "test": evaluate(model, test, tokenizer, max_len, cfg),
                  "params": int(model.num_parameters()), "seconds": time.perf_counter() - start}
        log(f"{arm} lr {lr:g} seed {seed}: val RSUM {record['val_rsum']:.1f}, test RSUM {record['test']['rsum']:.1f} "
            f"({record['seconds']:.0f} s)")
        runs.append(record)
        return record

    def result(measured: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The result object of the arms measured so far (with --merge, and the file's other arms)."""
        arms, all_runs = dict(measured), list(runs)
        if previous is not None:
            kept = {row["arm"]: {"select_on": LEGACY_SELECT_ON} | {k: v for k, v in row.items() if k != "arm"}
                    for row in previous["ablation"] if row["arm"] not in measured}
            all_runs = [r for r in previous["runs"] if r["arm"] in kept] + all_runs
            arms = {name: (measured | kept)[name] for name in ARMS if name in measured or name in kept}
        figures: dict[str, Any] = {"teacher": teacher_row}
        if "dsmd" in arms:
            figures["distilled"] = arms["dsmd"] | {"of_teacher": arms["dsmd"]["rsum"] / teacher["rsum"]}
        if "baseline" in arms:
            figures["baseline"] = arms["baseline"]
        if "dsmd" in arms and "baseline" in arms:
            figures["gain_rsum"] = arms["dsmd"]["rsum"] - arms["baseline"]["rsum"]
        figures["ablation"] = [{"arm": name, **values} for name, values in arms.items()]
        figures["runs"] = all_runs
        config = {k: v for k, v in vars(args).items() if k not in ("out", "tag", "merge", "rerun")} | {
            "arms": list(arms), "student": cfg.student.preset, "teacher_dim": dim, "select_on": SELECT_ON,
            "report_on": "test"}
        return common.result("quality", config, **figures), arms

    stored = {} if previous is None or args.rerun else {
        (r["arm"], r["lr"], r["seed"]): r for r in previous["runs"] if r["arm"] in args.arms}
    measured: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        grid: dict[float, list[dict[str, Any]]] = {}
        for seed in range(args.seeds):
            for lr in args.lrs:
                reused = stored.get((arm, lr, seed))
                if reused is not None:
                    log(f"{arm} lr {lr:g} seed {seed}: reused from the result file")
                    runs.append(reused)
                grid.setdefault(lr, []).append(reused or run(arm, lr, seed))
        mean_val = {lr: statistics.fmean(r["val_rsum"] for r in seeds) for lr, seeds in grid.items()}
        best = max(args.lrs, key=lambda lr: mean_val[lr])
        tests = [r["test"] for r in grid[best]]
        summary = {k: statistics.fmean(t[k] for t in tests) for k in RECALLS}
        summary.update({
            "rsum_std": statistics.stdev([t["rsum"] for t in tests]) if len(tests) > 1 else 0.0,
            "rsum_per_seed": [t["rsum"] for t in tests],
            "lr": best,
            "select_on": SELECT_ON,
            "val_rsum_by_lr": {f"{lr:g}": mean_val[lr] for lr in args.lrs},
            "params": grid[best][0]["params"],
            "images_per_s": statistics.fmean(t["images_per_s"] for t in tests),
            "captions_per_s": statistics.fmean(t["captions_per_s"] for t in tests),
        })
        measured[arm] = summary
        if args.merge and arm != args.arms[-1]:  # each finished arm is kept: a long run cut short loses one arm
            common.write_result(result(measured)[0], args.out, args.tag)

    from benchmarks.report import quality_table

    out = result(measured)[0]
    print(quality_table(out))
    if "gain_rsum" in out:
        print(f"DSMD - baseline: {out['gain_rsum']:+.1f} RSUM (mean over {args.seeds} seeds)")
    common.write_result(out, args.out, args.tag)
    return out


SELECT_ON = "mean val_rsum over seeds"
LEGACY_SELECT_ON = "val_rsum (seed 0)"  # the first protocol: the grid on seed 0, the other seeds at its best rate
MERGE_KEYS = ("teacher", "lrs", "seeds", "steps", "batch_size", "images")


def _previous(args: argparse.Namespace) -> dict[str, Any] | None:
    """The result file ``--merge`` adds to (None when there is none yet); refuses one with other settings."""
    import json

    path = common.result_path("quality", args.out, args.tag)
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    differ = [f"{k}: file {previous['config'].get(k)!r}, now {getattr(args, k)!r}" for k in MERGE_KEYS
              if previous["config"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--merge: {path} was measured with other settings ({'; '.join(differ)}); "
                         "use the same ones or run all arms without --merge")
    return previous


def _teacher_shapes(spec: dict[str, Any]) -> list[tuple[int, ...]]:
    from raydistill.models.teachers import load_teacher

    teacher = load_teacher(spec)
    model = getattr(teacher, "model", None)
    return [tuple(p.shape) for p in model.parameters()] if model is not None else []


if __name__ == "__main__":
    main()
