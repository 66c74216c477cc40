"""Distillation quality on the embedded benchmark: teacher, DSMD student, undistilled baseline, ablations.

The fitted demo teacher embeds the synthetic captioned scenes once, through the real pipeline
(``raydistill embed``: actor pool -> Parquet cache, kept under ``RAYDISTILL_HOME`` for later runs of the same
teacher and data: :func:`reusable_cache_dir`). Every student arm then trains in this process with the training
step the Ray Train workers run (``pipeline.trainer.Trainer``) on the cached rows, read and decoded here with the
pipeline's row functions, and is evaluated as a run evaluates (``pipeline.evaluate.embed_split``), all with the
same data, batch size and optimizer:

- ``dsmd``: the four losses and the ``dsmd`` balancer (configs/demo.yaml);
- ``baseline``: the same student without a teacher (ground-truth image-text contrastive loss);
- ``no_<term>``: DSMD with one loss removed;
- ``balancer_<kind>``: DSMD with another balancer (``dsmd_rate``, ``fixed`` equal weights, ``dwa``,
  ``uncertainty``).

**Protocol.** ``dsmd`` and ``baseline`` get the same search (a baseline tuned less than the method flatters
distillation): every setting of the grid (learning rate x AdamW beta2 x warm-up fraction) trains for ``--steps``
with seed 0; the ``--finalists`` settings with the best validation RSUM also train with the other seeds; the
setting with the best mean validation RSUM over all seeds is the arm's choice, and the table gives the test
split's mean and spread (sample standard deviation) over the seeds at that setting. Both arms then train at
their choice for ``--long-steps`` (the converged budget; the schedule spans the whole budget), every seed. The
ablation arms train at DSMD's choice, every seed: each removes one part of the tuned recipe. Every run
records its validation RSUM every ``--curve-every`` steps (the curves in the result and in MLflow).

    python -m benchmarks.quality                                # everything (hours on 2 cores; resumable)
    python -m benchmarks.quality --arms dsmd baseline            # the headline gap at both budgets
    python -m benchmarks.quality --arms no_feature --merge       # add an arm to results/quality.json

Each finished run is appended to a journal (``results/quality-runs.jsonl``) and a later call with the same
data and teacher reuses it instead of training again (a run is deterministic for its settings), so a long
measurement can stop and go on, in the same session or another; ``--rerun`` trains again. ``--merge`` keeps
the arms of the result file that this call does not measure (it refuses a file measured with other settings).
Runs trained here are logged to MLflow (``--tracking-uri``, experiment ``raydistill-quality-benchmark``) with
their settings and validation curve.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
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


@dataclasses.dataclass(frozen=True, order=True)
class Setting:
    """One point of the search grid."""

    lr: float
    beta2: float
    warmup: float

    def label(self) -> str:
        return f"lr {self.lr:g}, beta2 {self.beta2:g}, warm-up {self.warmup:g}"

    def fields(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def arm_config(base: dict[str, Any], arm: str, setting: Setting, seed: int, dim: int, steps: int) -> Any:
    """The typed config of one arm at one setting, seed and budget, from the benchmark's base config (a dict)."""
    from raydistill.config import config_from_dict

    raw = copy.deepcopy(base)
    raw["student"]["embed_dim"] = dim  # the teacher's: the baseline has no teacher to take it from
    for key, value in ARMS[arm].items():
        _set(raw, key, value)
    raw["train"].update(lr=setting.lr, adam_beta2=setting.beta2, warmup_fraction=setting.warmup, seed=seed,
                        steps=steps)
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


def train_arm(cfg: Any, rows: dict[str, np.ndarray], dim: int, vocab: int, steps: int,
              validate: Callable[[Any], float] | None = None,
              every: int = 0) -> tuple[Any, list[list[float]], dict[str, Any] | None]:
    """Train one student with the workers' training step; returns the model, its validation curve (the
    ``[step, RSUM]`` of ``validate(model)`` every ``every`` steps and at the end; empty without ``validate``)
    and the weights at the curve's first best point (what a run exports), ``None`` without ``validate``."""
    import copy
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
    curve: list[list[float]] = []
    best: dict[str, Any] | None = None
    while trainer.step < steps:
        order = torch.as_tensor(rng.permutation(n))
        for start in range(0, n - batch + 1, batch):
            idx = order[start:start + batch]
            trainer.train_step({k: v[idx] for k, v in tensors.items()})
            # Validation draws no random numbers, and the next step puts the model back in training mode.
            if validate is not None and ((every and trainer.step % every == 0) or trainer.step == steps):
                curve.append([trainer.step, validate(trainer.raw_model)])
                if best_step(curve) == trainer.step:
                    best = copy.deepcopy(trainer.raw_model.state_dict())
            if trainer.step >= steps:
                break
        trainer.epoch += 1
    return trainer.raw_model, curve, best


class Journal:
    """The runs measured so far, one JSON line each (``--journal``), reused by later calls on the same data.

    A line is appended (and flushed to disk) as soon as its run finishes, so stopping a long measurement loses
    at most the run under way; a last line cut off mid-write is ignored. Runs of another ``identity`` (other
    data, teacher or batch size) are ignored too.
    """

    def __init__(self, path: Path, identity: dict[str, Any], reuse: bool = True) -> None:
        import json

        self.path, self.identity = path, identity
        self._runs: dict[tuple, dict[str, Any]] = {}
        if not reuse or not path.exists():
            return
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the process was stopped while writing it
                    log(f"{path}: ignoring its last line, cut off mid-write")
                    continue
                raise SystemExit(f"{path}, line {number}: not a JSON run record; move the file aside to start "
                                 "a new journal") from None
            if self._same(record.get("identity", {})):
                self._runs[self.key(record)] = record

    def _same(self, other: dict[str, Any]) -> bool:
        return (set(other) == set(self.identity) and all(
            abs(other[k] - v) <= 1e-6 if isinstance(v, float) else other[k] == v for k, v in self.identity.items()))

    @staticmethod
    def key(record: dict[str, Any]) -> tuple:
        return record["arm"], Setting(record["lr"], record["beta2"], record["warmup"]), record["seed"], record["steps"]

    def get(self, arm: str, setting: Setting, seed: int, steps: int,
            needs: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """The run's record, unless it lacks one of the fields ``needs`` (measured before they were)."""
        record = self._runs.get((arm, setting, seed, steps))
        return record if record is not None and all(k in record for k in needs) else None

    def add(self, record: dict[str, Any]) -> None:
        import json

        record = {**record, "identity": self.identity}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._runs[self.key(record)] = record


def best_step(curve: list[list[float]]) -> int:
    """The step of a validation curve's first best point."""
    return int(max(curve, key=lambda point: (point[1], -point[0]))[0])


def summarize(runs: list[dict[str, Any]], select_on: str) -> dict[str, Any]:
    """An arm's row: the test split's mean recalls and RSUM spread over the seeds of one setting and budget,
    the same at each run's best validation step (``at_best``, where every run measured it), and the validation
    curve averaged over the seeds."""
    tests = [r["test"] for r in runs]
    row: dict[str, Any] = {k: statistics.fmean(t[k] for t in tests) for k in RECALLS}
    row.update({
        "rsum_std": statistics.stdev([t["rsum"] for t in tests]) if len(tests) > 1 else 0.0,
        "rsum_per_seed": [t["rsum"] for t in tests],
        **{k: runs[0][k] for k in ("lr", "beta2", "warmup", "steps")},
        "select_on": select_on,
        "params": runs[0]["params"],
        "images_per_s": statistics.fmean(t["images_per_s"] for t in tests),
        "captions_per_s": statistics.fmean(t["captions_per_s"] for t in tests),
    })
    if all("test_best" in r for r in runs):
        best = [r["test_best"] for r in runs]
        row["at_best"] = {k: statistics.fmean(t[k] for t in best) for k in RECALLS} | {
            "rsum_std": statistics.stdev([t["rsum"] for t in best]) if len(best) > 1 else 0.0,
            "rsum_per_seed": [t["rsum"] for t in best], "best_step_per_seed": [r["best_step"] for r in runs]}
    steps = [step for step, _ in runs[0]["curve"]]
    if steps and all([s for s, _ in r["curve"]] == steps for r in runs):
        row["val_curve"] = [[step, statistics.fmean(r["curve"][k][1] for r in runs)] for k, step in enumerate(steps)]
    return row


def search(arm: str, grid: list[Setting], seeds: int, finalists: int,
           run: Callable[[str, Setting, int], dict[str, Any]]) -> tuple[Setting, list[dict[str, Any]], dict[str, Any]]:
    """The arm's setting: every setting with seed 0, the ``finalists`` best of those with every seed, then the
    best mean validation RSUM over the seeds. Returns it, its runs (one per seed) and the validation RSUM of
    every setting tried (seed 0, and the mean over the seeds where it was a finalist)."""
    first = {setting: run(arm, setting, 0) for setting in grid}
    ranked = sorted(grid, key=lambda setting: (first[setting]["val_rsum"], setting), reverse=True)
    final = {setting: [first[setting]] + [run(arm, setting, seed) for seed in range(1, seeds)]
             for setting in ranked[:finalists or len(grid)]}
    mean_val = {setting: statistics.fmean(r["val_rsum"] for r in final[setting]) for setting in final}
    best = max(final, key=lambda setting: (mean_val[setting], setting))
    by_setting = {setting.label(): {"seed_0": first[setting]["val_rsum"], "mean": mean_val.get(setting)}
                  for setting in grid}
    return best, final[best], by_setting


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo", help="demo (the fitted demo teacher) | tiny (smoke test)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--lrs", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
                   help="learning rates of the grid")
    p.add_argument("--beta2s", type=float, nargs="+", default=[0.98, 0.999], help="AdamW beta2 values of the grid")
    p.add_argument("--warmups", type=float, nargs="+", default=[0.05, 0.2],
                   help="warm-up fractions (of the run's steps) of the grid")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--finalists", type=int, default=4,
                   help="settings (best on seed 0) that train with every seed; 0: all of them")
    p.add_argument("--steps", type=int, default=300, help="the equal budget the grid searches at")
    p.add_argument("--long-steps", type=int, default=3000,
                   help="the converged budget: dsmd and baseline at their setting (0: skip)")
    p.add_argument("--curve-every", type=int, default=50, help="validation RSUM every this many steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--journal", default=None,
                   help="the run journal (default: quality[-TAG]-runs.jsonl beside the result file)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store of the trained runs (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<RAYDISTILL_HOME>/benchmarks/mlflow.db)")
    p.add_argument("--merge", action="store_true",
                   help="keep the result file's arms that this call does not measure (same settings required)")
    p.add_argument("--rerun", action="store_true", help="train every run again instead of reusing the journal's")
    args = p.parse_args(argv)
    previous = _previous(args) if args.merge else None
    grid = [Setting(lr, beta2, warmup) for lr in args.lrs for beta2 in args.beta2s for warmup in args.warmups]

    import ray
    import torch

    from benchmarks.teacher_throughput import teacher_spec
    from raydistill.models.tokenizers import build_wordpiece_tokenizer
    from raydistill.paths import raydistill_home
    from raydistill.pipeline.evaluate import batches_from_rows, embed_split, teacher_metrics
    from raydistill.pipeline.rows import explode_batch
    from raydistill.pipeline.runner import embed
    from raydistill.tracking import Tracker
    from raydistill.tracking_store import resolve_tracking_uri

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
    # Runs are reused only on the same data, teacher and batch, and with the same torch threads (the order of a
    # threaded reduction moves the last float bits, and a run's recall with them).
    identity = {"teacher": args.teacher, "teacher_rsum": teacher_row["rsum"], "images": args.images,
                "batch_size": args.batch_size, "student": cfg.student.preset, "threads": args.threads}
    journal_path = Path(args.journal) if args.journal else common.result_path(
        "quality", args.out, args.tag).with_name(f"quality{'-' + args.tag if args.tag else ''}-runs.jsonl")
    journal = Journal(journal_path, identity, reuse=not args.rerun)
    tracking_uri = args.tracking_uri or resolve_tracking_uri(None, raydistill_home() / "benchmarks")
    runs: list[dict[str, Any]] = []

    def run(arm: str, setting: Setting, seed: int, steps: int, needs: tuple[str, ...] = ()) -> dict[str, Any]:
        name = f"{arm} {setting.label()}, seed {seed}, {steps} steps"
        record = journal.get(arm, setting, seed, steps, needs)
        if record is not None:
            log(f"{name}: reused from {journal.path.name}")
        else:
            start = time.perf_counter()
            cfg_run = arm_config(base, arm, setting, seed, dim, steps)
            model, curve, best = train_arm(cfg_run, rows, dim, len(tokenizer), steps,
                                           lambda m: evaluate(m, val, tokenizer, max_len, cfg)["rsum"],
                                           args.curve_every)
            record = {"arm": arm, **setting.fields(), "seed": seed, "steps": steps, "val_rsum": curve[-1][1],
                      "curve": curve, "test": evaluate(model, test, tokenizer, max_len, cfg),
                      "params": int(model.num_parameters())}
            # The test split at the best validation point too: what `raydistill run` exports with a validation
            # split, and where a budget past an arm's best (one that overfits) would understate it.
            record["best_step"] = best_step(curve)
            if record["best_step"] == steps:
                record["test_best"] = record["test"]
            else:
                model.load_state_dict(best)
                record["test_best"] = evaluate(model, test, tokenizer, max_len, cfg)
            record["seconds"] = time.perf_counter() - start
            record["mlflow_run_id"] = _track(Tracker, tracking_uri, record)
            journal.add(record)
            log(f"{name}: val RSUM {record['val_rsum']:.1f}, test RSUM {record['test']['rsum']:.1f}; at the best "
                f"validation step ({record['best_step']}) {record['test_best']['rsum']:.1f} "
                f"({record['seconds']:.0f} s)")
        runs.append({k: v for k, v in record.items() if k != "identity"})
        return runs[-1]

    def result(measured: dict[str, dict[str, Any]], converged: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The result object of the arms measured so far (with --merge, and the file's other arms)."""
        arms, all_runs = dict(measured), list(runs)
        if previous is not None:
            kept = {row["arm"]: {k: v for k, v in row.items() if k != "arm"}
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
        if converged:
            figures["converged"] = {"steps": args.long_steps, **converged}
            if len(converged) == 2:
                figures["converged"]["gain_rsum"] = converged["distilled"]["rsum"] - converged["baseline"]["rsum"]
                figures["converged"]["gain_rsum_at_best"] = (converged["distilled"]["at_best"]["rsum"]
                                                             - converged["baseline"]["at_best"]["rsum"])
        figures["ablation"] = [{"arm": name, **values} for name, values in arms.items()]
        figures["runs"] = all_runs
        config = {k: v for k, v in vars(args).items()
                  if k not in ("out", "tag", "merge", "rerun", "journal", "tracking_uri")} | {
            "arms": list(arms), "student": cfg.student.preset, "teacher_dim": dim, "select_on": SELECT_ON,
            "report_on": "test", "tracking_experiment": EXPERIMENT}
        return common.result("quality", config, **figures)

    measured: dict[str, dict[str, Any]] = {}
    chosen: dict[str, Setting] = {}
    for arm in [a for a in SEARCHED if a in args.arms]:
        chosen[arm], best_runs, by_setting = search(arm, grid, args.seeds, args.finalists,
                                                    lambda a, setting, seed: run(a, setting, seed, args.steps))
        measured[arm] = summarize(best_runs, SELECT_ON) | {"val_rsum_by_setting": by_setting}
        log(f"{arm}: {chosen[arm].label()}, test RSUM {measured[arm]['rsum']:.1f} ± {measured[arm]['rsum_std']:.1f}")
        common.write_result(result(measured, {}), args.out, args.tag)  # each finished step is kept
    converged: dict[str, dict[str, Any]] = {}
    if args.long_steps:
        for arm, name in (("dsmd", "distilled"), ("baseline", "baseline")):
            if arm in chosen:
                long_runs = [run(arm, chosen[arm], seed, args.long_steps, needs=("test_best",))
                             for seed in range(args.seeds)]
                converged[name] = summarize(long_runs, f"the arm's setting at {args.steps} steps")
                common.write_result(result(measured, converged), args.out, args.tag)
    ablations = [a for a in args.arms if a not in SEARCHED]
    if ablations:
        if "dsmd" not in chosen:
            raise SystemExit("the ablation arms train at DSMD's setting: add dsmd to --arms (its runs are reused "
                             "from the journal)")
        for arm in ablations:
            measured[arm] = summarize([run(arm, chosen["dsmd"], seed, args.steps) for seed in range(args.seeds)],
                                      ABLATION_SELECT_ON)
            common.write_result(result(measured, converged), args.out, args.tag)

    from benchmarks.report import quality_table

    out = result(measured, converged)
    print(quality_table(out))
    if "gain_rsum" in out:
        print(f"DSMD - baseline: {out['gain_rsum']:+.1f} RSUM at {args.steps} steps (mean over {args.seeds} seeds)")
    if "gain_rsum" in out.get("converged", {}):
        print(f"DSMD - baseline: {out['converged']['gain_rsum']:+.1f} RSUM at {args.long_steps} steps, "
              f"{out['converged']['gain_rsum_at_best']:+.1f} at each run's best validation step")
    common.write_result(out, args.out, args.tag)
    curves = quality_curves(out)
    if curves:
        from raydistill.plots import plot_rsum_curves

        path = common.result_path("quality", args.out, args.tag).with_suffix(".png")
        log(f"wrote {plot_rsum_curves(curves, path, f'Validation RSUM, mean over {args.seeds} seeds')}")
    return out


def quality_curves(result: dict[str, Any]) -> dict[str, list[list[float]]]:
    """The validation-RSUM curves (mean over seeds) of DSMD and the baseline at each budget, for the plot."""
    rows = [(f"{name}, {row['steps']} steps", row) for name, row in
            (("DSMD", result.get("distilled")), ("baseline", result.get("baseline")),
             ("DSMD", result.get("converged", {}).get("distilled")),
             ("baseline", result.get("converged", {}).get("baseline"))) if row]
    return {label: row["val_curve"] for label, row in rows if row.get("val_curve")}


SEARCHED = ("dsmd", "baseline")  # the arms that get the whole search; the ablations train at dsmd's setting
SELECT_ON = "mean val_rsum over seeds"
ABLATION_SELECT_ON = "dsmd's setting"
EXPERIMENT = "raydistill-quality-benchmark"
MERGE_KEYS = ("teacher", "lrs", "beta2s", "warmups", "seeds", "finalists", "steps", "long_steps", "batch_size",
              "images")


def _track(tracker_cls: Any, uri: str, record: dict[str, Any]) -> str | None:
    """Log one trained run to MLflow: its settings, validation curve and test recall; returns its run id."""
    from raydistill.paths import raydistill_home

    name = f"{record['arm']}-lr{record['lr']:g}-b{record['beta2']:g}-w{record['warmup']:g}-s{record['seed']}"
    tags = {"benchmark": "quality", "arm": record["arm"], "steps": record["steps"], "seed": record["seed"]}
    with tracker_cls(uri, EXPERIMENT, run_name=f"{name}-{record['steps']}", tags=tags,
                     local_dir=raydistill_home() / "benchmarks" / "tracking") as tracker:
        tracker.log_params({k: record[k] for k in ("arm", "lr", "beta2", "warmup", "seed", "steps")})
        for step, rsum in record["curve"]:
            tracker.log_metrics({"val_rsum": rsum}, step=int(step))
        tracker.log_metrics({f"test_{k}": v for k, v in record["test"].items()}, step=record["steps"])
        tracker.log_metrics({"test_best_rsum": record["test_best"]["rsum"]}, step=record["best_step"])
        return tracker.run_id


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
