"""`raydistill run` and `raydistill embed`, top to bottom: data -> teacher -> cache/stream -> Train -> eval -> MLflow.

:func:`run_experiment` is the whole of one training run; a reader can follow it from the config to the last
metric, stage by stage as the README's data-flow diagram draws them. :func:`embed` fills (or resumes) the
embedding cache without training. The driver holds no per-image state: sources are read, decoded and embedded
in Ray tasks and actors; the driver keeps counts, the cache's key and the evaluation split's embeddings.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from raydistill.config import Config, dump_config
from raydistill.errors import UserError
from raydistill.pipeline import local_instance
from raydistill.pipeline.counters import BAD_FILES_ARTIFACT, Counters
from raydistill.pipeline.plans import DataPlan, TeacherSide, embed_splits, eval_dataset, student_decode_size
from raydistill.pipeline.progress import counted, log, watch
from raydistill.pipeline.ray_env import cluster_has_gpus, init_ray, quiet_libraries, warm_imports
from raydistill.pipeline.run_folder import (
    CURRENT_RUN,
    RUN_CONFIG,
    RUN_RESULT,
    load_run_config,
    new_run_dir,
    planned_steps,
    require_writable,
    train_storage,
)
from raydistill.paths import is_uri, publish_dir, write_text_atomically

#: Images whose captions train a WordPiece vocabulary when ``student.tokenizer`` is null.
TOKENIZER_SAMPLE_IMAGES = 50_000


# ------------------------------------------------------------------------------------------------ data
def needed_splits(cfg: Config) -> list[str]:
    """The splits a run reads: train, test, and validation when ``train.eval_every`` is set."""
    splits = [cfg.data.train_split, cfg.data.test_split]
    if cfg.train.eval_every and cfg.data.val_split:
        splits.append(cfg.data.val_split)
    return list(dict.fromkeys(splits))


def check_before_ray(cfg: Config) -> None:
    """What is cheap to check before a local instance starts or a run folder is made: outputs are writable and
    the data's files exist with the right schema in their first rows.

    Raises:
        UserError: naming the key or file.
    """
    from raydistill.data.source import check_source

    require_writable(cfg.output_dir, "output_dir")
    require_writable(train_storage(cfg), "train.storage_path")
    check_source(cfg)


def source_counts(cfg: Config, splits: list[str]) -> dict[str, dict[str, int]]:
    """Images, captions and the id hash of each split, counted by Ray tasks over the source."""
    from raydistill.data.source import count_splits

    if not splits:
        return {}
    counts = count_splits(cfg, splits)
    for split, c in counts.items():
        log(f"split {split!r}: {c['images']} images, {c['captions']} captions")
    return counts


def resolve_tokenizer(cfg: Config, run_dir: Path, side: TeacherSide | None) -> Any:
    """The student's tokenizer: the run's saved one (resume), the configured one, or WordPiece learned from
    the captions of the first :data:`TOKENIZER_SAMPLE_IMAGES` training images."""
    from raydistill.data.source import source_dataset
    from raydistill.models.tokenizers import build_wordpiece_tokenizer, load_tokenizer, tokenizer_from_vocab

    saved = run_dir / "tokenizer"
    if saved.is_dir():
        return load_tokenizer(saved)
    if cfg.student.tokenizer:
        path = Path(cfg.student.tokenizer)
        tok = tokenizer_from_vocab(path) if path.suffix == ".txt" else load_tokenizer(cfg.student.tokenizer)
    else:
        split = cfg.data.train_split
        if side is not None and split in side.cache.complete_splits():
            rows = side.cache.split_dataset(split, columns=["captions"])
        else:
            rows = source_dataset(cfg, [split]).select_columns(["captions"])
        rows = rows.limit(TOKENIZER_SAMPLE_IMAGES)
        log(f"building a WordPiece vocabulary ({cfg.student.vocab_size}) from the training captions")
        texts = (str(c) for batch in rows.iter_batches(batch_format="numpy") for caps in batch["captions"] for c in caps)
        tok = build_wordpiece_tokenizer(texts, vocab_size=cfg.student.vocab_size)
    tmp = run_dir / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    publish_dir(tmp, saved)
    return tok


def prepare_data(cfg: Config, run_dir: Path, counters: Counters) -> tuple[DataPlan, dict[str, Any]]:
    """Everything before training: the source's counts, the teacher and its cache (evaluation splits embedded,
    a partly cached training split completed), the tokenizer, and where epoch 0 reads from.

    Returns:
        The run's :class:`DataPlan`, and the training split's ``images`` / ``captions`` counts.
    """
    from raydistill.data.source import source_identity
    from raydistill.models.architecture import get_preset
    from raydistill.pipeline.teacher_side import open_teacher_side

    splits = needed_splits(cfg)
    side = open_teacher_side(cfg, source_identity(cfg)) if cfg.uses_teacher else None
    complete = side.cache.complete_splits() if side is not None else {}
    expected = source_counts(cfg, [s for s in splits if s not in complete])
    tokenizer = resolve_tokenizer(cfg, run_dir, side)
    plan = DataPlan(cfg=cfg, teacher=side, tokenizer=tokenizer,
                    max_len=cfg.student.max_len or get_preset(cfg.student.preset).max_len,
                    student_size=student_decode_size(cfg), counters=counters, train_from="source", expected=expected)
    train = cfg.data.train_split
    if side is not None:
        eval_splits = [s for s in splits if s != train]
        embed_splits(plan, eval_splits)
        if train in side.cache.complete_splits():
            plan.train_from = "cache"
        elif cfg.cache.write_through and side.cache.has_rows(train):
            log(f"the cache holds part of split {train!r}: completing it before training")
            embed_splits(plan, [train])
            plan.train_from = "cache"
        else:
            plan.train_from = "stream"
    train_counts = side.cache.complete_splits()[train] if plan.train_from == "cache" else expected[train]
    return plan, train_counts


# ------------------------------------------------------------------------------------------------ train
def fit(cfg: Config, plan: DataPlan, run_name: str, run_dir: Path, tracker: Any, steps: int,
        train_callbacks: list[Any] | None) -> Any:
    """Train the student with Ray Train (each worker builds its epochs' datasets); return Train's result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill.pipeline.train_loop import train_loop

    storage = train_storage(cfg)
    use_gpu = cfg.train.use_gpu == "yes" or (cfg.train.use_gpu == "auto" and cluster_has_gpus())
    embed_dim = plan.teacher.dim if plan.teacher is not None else cfg.student.embed_dim
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "plan": plan,
            "embed_dim": embed_dim,
            "planned_steps": steps,
            "mlflow": {"uri": tracker.tracking_uri, "experiment": cfg.tracking.experiment, "run_id": tracker.run_id,
                       "local_dir": str(run_dir / "tracking")} if tracker.run_id else None,
            "kill_worker_at": os.environ.get("RAYDISTILL_KILL_WORKER_AT"),
            "checkpoint_root": None if is_uri(storage) else f"{storage}/{run_name}",
        },
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **cfg.train.resources_per_worker},
                                     label_selector=cfg.train.label_selector or None),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                                **best_checkpoint_scoring(cfg)),
                             callbacks=train_callbacks or None),
    )
    log(f"training {cfg.student.preset} student for {steps} steps on {cfg.train.num_workers} worker(s)"
        f"{' (GPU)' if use_gpu else ''}, objective {cfg.distill.objective}, epoch 0 from the {plan.train_from}")

    def state(totals: dict[str, Any]) -> str:
        if "train/loss" not in totals:
            return "starting"
        return f"epoch {int(totals['train/epoch'])}, loss {totals['train/loss']:.4g}, " \
               f"{totals.get('train/samples_per_s', 0):.0f} samples/s"

    with watch("training", steps, counted(plan.counters, "train/step", state)):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = result.return_value or {}
    if "user_error" in out:
        raise UserError(out["user_error"])
    if "disk_error" in out:
        e = out["disk_error"]
        raise OSError(e["errno"], e["strerror"], e["filename"])
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result


def best_checkpoint_scoring(cfg: Config) -> dict[str, str]:
    """With a validation split, Ray Train ranks checkpoints by validation RSUM (every checkpoint is validated)
    and keeps the best ones (and always the latest, to resume from)."""
    if cfg.train.eval_every and cfg.data.val_split:
        return {"checkpoint_score_attribute": "val_rsum", "checkpoint_score_order": "max"}
    return {}


def chosen_checkpoint(cfg: Config, result: Any) -> tuple[Any, int | None]:
    """The checkpoint to export: the best by validation RSUM (and its step), or the last."""
    if best_checkpoint_scoring(cfg) and result.best_checkpoints:
        checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1].get("val_rsum", float("-inf")))
        return checkpoint, int(metrics["step"])
    return result.checkpoint, None


def finalize_train_cache(plan: DataPlan) -> dict[str, int] | None:
    """After a stream run with write-through: the training split's cache completed (None if only partly)."""
    from raydistill.pipeline.cache import CacheError
    from raydistill.pipeline.plans import finalize_split

    side, split = plan.teacher, plan.cfg.data.train_split
    if side is None or plan.train_from != "stream" or not plan.cfg.cache.write_through:
        return None
    if split in side.cache.complete_splits():
        return side.cache.complete_splits()[split]
    try:
        return finalize_split(plan, split, first_pass=True)
    except CacheError as err:
        log(f"the training split is only partly cached (training ended before a full pass): {err}")
        return None


# ------------------------------------------------------------------------------------------------ run
def run_experiment(cfg: Config, resume: str | None = None, tags: dict[str, str] | None = None,
                   parent_run_id: str | None = None, train_callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train one student end to end and return the run's summary (the `--json` object).

    Args:
        cfg: the validated config.
        resume: a run name or folder to continue from its last checkpoint.
        tags: MLflow tags of the run.
        parent_run_id: MLflow parent run (a Tune sweep).
        train_callbacks: ``ray.train.UserCallback`` objects for the Train ``RunConfig`` (e.g. Tune's
            ``TuneReportCallback``, which forwards every reported metric, ``val_rsum`` included, to Tune).
    """
    from raydistill.pipeline.evaluate import student_metrics, teacher_metrics
    from raydistill.pipeline.export import export_student

    check_before_ray(cfg)
    run_name, run_dir = new_run_dir(cfg, resume)
    if resume:
        cfg = load_run_config(run_dir)
    else:
        write_text_atomically(run_dir / RUN_CONFIG, dump_config(cfg))
    CURRENT_RUN.update(run_dir=str(run_dir), run_id=None)
    log(f"run {run_name} in {run_dir} (resolved config: {run_dir / RUN_CONFIG})")
    warm = threading.Thread(target=warm_imports, name="raydistill-warm-imports", daemon=True)
    warm.start()  # while a local Ray instance starts, which is mostly waiting on its processes
    init_ray(cfg)
    warm.join()
    quiet_libraries()  # again: MLflow, imported beside Ray's start, sets its loggers up on import
    counters = Counters().start()

    plan, train_counts = prepare_data(cfg, run_dir, counters)
    local_instance.record()  # again, now that the instance's agents and workers have started
    tracker = open_tracker(cfg, run_dir, run_name, tags, parent_run_id, resume)
    CURRENT_RUN["run_id"] = tracker.run_id
    with tracker:
        steps = planned_steps(cfg, train_counts["captions"])
        start = time.perf_counter()
        result = fit(cfg, plan, run_name, run_dir, tracker, steps, train_callbacks)
        train_seconds = time.perf_counter() - start
        train_cache = finalize_train_cache(plan)

        embed_dim = plan.teacher.dim if plan.teacher is not None else cfg.student.embed_dim
        checkpoint, best_step = chosen_checkpoint(cfg, result)
        if best_step is not None:
            log(f"exporting the checkpoint with the best validation RSUM: step {best_step}")
        with checkpoint.as_directory() as d:
            model, history = export_student(Path(d), cfg, embed_dim, plan.tokenizer, run_dir / "student",
                                            extra={"run": run_name, "objective": cfg.distill.objective,
                                                   "teacher": plan.teacher.spec.as_dict() if plan.teacher else None})
        emb = evaluate_split(plan, cfg.data.test_split, model)
        metrics = {"student": student_metrics(emb, cfg.eval.chunk_size),
                   "teacher": teacher_metrics(emb, cfg.eval.chunk_size) if plan.teacher is not None else None}
        out = result.return_value or {}
        summary = run_summary(cfg, plan, run_name, run_dir, tracker, result, out, steps, model, metrics,
                              train_seconds, train_counts, train_cache, counters)
        summary["best_step"] = best_step
        # The whole run's history (the exported checkpoint's ends at its own step when it is the best one).
        history = out.get("history") or history
        summary["history"] = [h for h in history if "val_rsum" in h]
        log_results(tracker, summary, history, run_dir, counters)
    # The MLflow run exists by now even if the store was down when the run started (created on replay).
    write_text_atomically(run_dir / "mlflow_run_id", tracker.run_id or "")
    summary["run_id"] = tracker.run_id
    write_text_atomically(run_dir / RUN_RESULT, json.dumps(summary, indent=2, default=str))
    log(f"done: student RSUM {metrics['student']['rsum']:.1f}"
        + (f", teacher RSUM {metrics['teacher']['rsum']:.1f}" if metrics["teacher"] else "")
        + f" on {emb.n_images} test images / {emb.n_captions} captions")
    return summary


def evaluate_split(plan: DataPlan, split: str, model: Any) -> Any:
    """The split's student (and teacher) embeddings, with the progress of the pass shown."""
    import torch

    from raydistill.pipeline.evaluate import dataset_batches, embed_split

    cfg = plan.cfg
    total = (plan.teacher.cache.complete_splits().get(split) if plan.teacher is not None else None) or \
        plan.expected.get(split, {})
    seen = {"images": 0}

    def batches() -> Any:
        for batch in dataset_batches(eval_dataset(plan, split), cfg.eval.batch_size):
            seen["images"] += len(batch["captions"])
            yield batch

    with watch(f"evaluating on {split!r}", total.get("images"), lambda: (seen["images"], "")):
        return embed_split(batches(), model, plan.tokenizer, plan.max_len, torch.device("cpu"))


def open_tracker(cfg: Config, run_dir: Path, run_name: str, tags: dict[str, str] | None,
                 parent_run_id: str | None, resume: str | None) -> Any:
    """The run's MLflow run (the resumed run's own, when resuming), with the config logged once."""
    from raydistill.tracking import Tracker, flatten_config, resolve_tracking_uri

    saved = run_dir / "mlflow_run_id"
    run_id = (saved.read_text().strip() or None) if saved.is_file() else None
    tracker = Tracker(resolve_tracking_uri(cfg.tracking.uri, Path(cfg.output_dir)), cfg.tracking.experiment,
                      run_name=run_name, tags=tags, parent_run_id=parent_run_id, local_dir=run_dir / "tracking",
                      enabled=cfg.tracking.enabled, run_id=run_id)
    write_text_atomically(saved, tracker.run_id or "")
    if not resume:
        tracker.log_params(flatten_config(cfg.model_dump(mode="json")))
        tracker.log_artifact(run_dir / RUN_CONFIG)
    return tracker


def run_summary(cfg: Config, plan: DataPlan, run_name: str, run_dir: Path, tracker: Any, result: Any,
                out: dict[str, Any], steps: int, model: Any, metrics: dict[str, Any], train_seconds: float,
                train_counts: dict[str, int], train_cache: dict[str, int] | None,
                counters: Counters) -> dict[str, Any]:
    """The run's `--json` object: every number in it measured by the pipeline itself."""
    totals = counters.get()
    bad = int(totals.get("bad_images", 0))
    images = captions = 0
    for split in dict.fromkeys([cfg.data.test_split] + ([cfg.data.val_split] if cfg.train.eval_every else [])):
        if plan.teacher is not None:
            done = plan.teacher.cache.complete_splits()[split]
        else:
            done = plan.expected[split]
        images, captions = images + done["images"], captions + done["captions"]
    train = train_cache or train_counts
    images += train["images"] - (bad if train is train_counts and plan.train_from != "cache" else 0)
    captions += train["captions"]
    return {
        "run_id": tracker.run_id,
        "run_name": run_name,
        "run_dir": str(run_dir),
        "mlflow_tracking_uri": tracker.tracking_uri,
        "steps": int(out.get("steps", 0)),
        "planned_steps": steps,
        "resumed_from_step": out.get("resumed_from"),
        "checkpoint": result.checkpoint.path,
        "student_dir": str(run_dir / "student"),
        "student_params": int(model.num_parameters()),
        "metrics": metrics,
        "teacher_images_embedded": int(totals.get("teacher_images_embedded", 0)),
        "teacher_captions_embedded": int(totals.get("teacher_captions_embedded", 0)),
        "bad_images": bad,
        "dataset_images": images,
        "dataset_captions": captions,
        "train_seconds": round(train_seconds, 2),
        "cache_dir": plan.teacher.cache.uri if plan.teacher is not None else None,
    }


def log_results(tracker: Any, summary: dict[str, Any], history: list[dict[str, float]], run_dir: Path,
                counters: Counters) -> None:
    """The run's final metrics, recall table, balancer plot, bad-image list and student, to MLflow."""
    from raydistill.plots import plot_balancer_weights

    metrics = {f"test/{k}": v for k, v in summary["metrics"]["student"].items()}
    if summary["metrics"]["teacher"]:
        metrics.update({f"teacher_test/{k}": v for k, v in summary["metrics"]["teacher"].items()})
    for key in ("teacher_images_embedded", "teacher_captions_embedded", "dataset_images", "dataset_captions",
                "student_params", "train_seconds", "bad_images"):
        metrics[key] = float(summary[key] or 0)
    tracker.log_metrics(metrics, step=summary["steps"])
    table = run_dir / "recall_table.json"
    write_text_atomically(table, json.dumps(summary["metrics"], indent=2))
    tracker.log_artifact(table)
    bad_files = counters.bad_files()
    if bad_files:
        listing = run_dir / BAD_FILES_ARTIFACT
        write_text_atomically(listing, "".join(f"{name}\t{reason}\n" for name, reason in bad_files))
        tracker.log_artifact(listing)
    weights = [h for h in history if any(k.startswith("weight/") for k in h)]
    if weights:
        plot = run_dir / "balancer_weights.png"
        plot_balancer_weights(
            [{"step": h["step"], **{k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("weight/")}}
             for h in weights], plot)
        tracker.log_artifact(plot)
    tracker.log_artifact(run_dir / "student", artifact_path="student")


# ------------------------------------------------------------------------------------------------ embed
def embed(cfg: Config) -> dict[str, Any]:
    """Fill (or resume) the embedding cache for the train, test (and validation, if present) splits."""
    from raydistill.data.source import check_source, count_splits, source_identity
    from raydistill.pipeline.teacher_side import open_teacher_side

    check_source(cfg)
    init_ray(cfg)
    counters = Counters().start()
    splits = list(dict.fromkeys([cfg.data.train_split, cfg.data.test_split]
                                + ([cfg.data.val_split] if cfg.data.val_split else [])))
    side = open_teacher_side(cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"mode": "stream"})}),
                             source_identity(cfg))
    complete = side.cache.complete_splits()
    todo = [s for s in splits if s not in complete]
    expected = count_splits(cfg, todo, required=[s for s in todo if s != cfg.data.val_split]) if todo else {}
    if cfg.data.val_split in expected and expected[cfg.data.val_split]["images"] == 0:
        log(f"no split {cfg.data.val_split!r} in the data: it is not cached")
        splits.remove(cfg.data.val_split)
    plan = DataPlan(cfg=cfg, teacher=side, tokenizer=None, max_len=0, student_size=0, counters=counters,
                    train_from="stream", expected=expected)
    stats = embed_splits(plan, splits)
    totals = counters.get()
    return {
        "cache_dir": side.cache.uri,
        "fingerprint": side.key["hash"],
        "splits": {split: {"images": s["images"], "captions": s["captions"]} for split, s in stats.items()},
        "teacher_images_embedded": int(totals.get("teacher_images_embedded", 0)),
        "teacher_captions_embedded": int(totals.get("teacher_captions_embedded", 0)),
        "bad_images": int(totals.get("bad_images", 0)),
        "dataset_images": sum(s["images"] for s in stats.values()),
        "dataset_captions": sum(s["captions"] for s in stats.values()),
    }
