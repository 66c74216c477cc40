"""`raydistill run` and `raydistill embed`, top to bottom: data -> teacher -> cache/stream -> Train -> eval -> MLflow.

:func:`run_experiment` is the whole of one training run; a reader can follow it from the config to the last
metric. :func:`embed` fills (or resumes) the embedding cache without training.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raydistill.config import Config, ConfigError, config_from_dict, dump_config
from raydistill.pipeline import datasets as dsets
from raydistill.pipeline.cache import CacheError, EmbeddingCache, make_fingerprint, rows_from_cache_batch
from raydistill.pipeline.counters import Counters
from raydistill.pipeline.evaluate import EvalSet, build_eval_set, evaluate_student, evaluate_teacher
from raydistill.pipeline.progress import log

RUN_RESULT = "result.json"
RUN_CONFIG = "config.yaml"


# ------------------------------------------------------------------------------------------------ ray
LOCAL_RAY_ENV = {
    # Nothing preempts the nodes of a local instance: skip Ray Train's preemption watcher, an actor process per
    # training run (and per restart) that costs seconds of CPU on a small machine.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def prepare_local_ray_env() -> None:
    """Set :data:`LOCAL_RAY_ENV` (where the user has not) before a local instance starts: its processes inherit
    the environment of the driver that starts it."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(cfg: Config) -> None:
    """Connect to the configured cluster, or start a small local instance."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 2))
        prepare_local_ray_env()
        ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=cfg.ray.num_gpus,
            object_store_memory=cfg.ray.object_store_mb * 2**20 if cfg.ray.object_store_mb else None,
            include_dashboard=cfg.ray.dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )
        log(f"started a local Ray instance with {cpus} logical CPUs")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = cfg.ray.no_progress_timeout_s


def warm_imports() -> None:
    """Import what the driver will need (the student's timm and transformers, MLflow): seconds of CPU that
    overlap a local Ray instance's start when run in a thread beside ``init_ray``."""
    import mlflow  # noqa: F401

    import raydistill.models.student  # noqa: F401


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


# ------------------------------------------------------------------------------------------------ teacher
def teacher_spec(cfg: Config) -> dict[str, Any]:
    """The dict given to ``load_teacher`` in the teacher actors (the demo teacher resolved to its files)."""
    t = cfg.teacher
    if t.kind == "demo":
        from raydistill.demo_assets import ensure_demo_teacher

        return {"kind": "raydistill", "checkpoint": str(ensure_demo_teacher()), "dtype": t.dtype,
                "device": t.device, "batch_size": t.infer_batch_size}
    spec = {"kind": t.kind, "checkpoint": t.checkpoint, "tokenizer": t.tokenizer, "dtype": t.dtype,
            "device": t.device, "batch_size": t.infer_batch_size}
    if t.size:
        spec["size"] = t.size
    if t.arch:
        spec["arch"] = t.arch
    if t.max_len:
        spec["max_len"] = t.max_len
    return {k: v for k, v in spec.items() if v is not None}


def teacher_in_driver(cfg: Config) -> bool:
    """Whether the driver loads the teacher itself (``teacher.in_driver`` and a pool with no GPU or placement)."""
    pool = cfg.teacher.pool
    return cfg.teacher.in_driver and not pool.num_gpus and not pool.resources and not pool.label_selector


def probe_teacher(cfg: Config, spec: dict[str, Any]) -> dict[str, Any]:
    """Load the teacher once where its actors will run and return its dimension and fingerprint."""
    pool = cfg.teacher.pool

    @ray.remote
    def _probe(spec: dict[str, Any]) -> dict[str, Any]:
        from raydistill.models.teachers import load_teacher

        teacher = load_teacher(spec)
        return {"dim": int(teacher.dim), "fingerprint": teacher.fingerprint, "image_size": getattr(teacher, "image_size", None)}

    options: dict[str, Any] = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    if pool.resources:
        options["resources"] = pool.resources
    if pool.label_selector:
        options["label_selector"] = pool.label_selector
    return ray.get(_probe.options(**options).remote(spec))


def cache_for(cfg: Config, fingerprint: dict[str, Any]) -> EmbeddingCache:
    """The run's cache: ``cache.dir`` or ``<output_dir>/cache/<fingerprint>``."""
    uri = cfg.cache.dir or str(Path(cfg.output_dir) / "cache" / fingerprint["hash"][:16])
    return EmbeddingCache(uri)


class TeacherSide:
    """What a distillation run knows about its teacher: spec, dimension, fingerprint and cache.

    ``local`` is the teacher loaded in the driver (``teacher_in_driver``), used to embed small evaluation
    splits without starting an actor pool; None when the teacher runs only in its actors.
    """

    def __init__(self, cfg: Config, records: dict[str, list[dict[str, Any]]]) -> None:
        """``records``: every split of the source (the dataset identity covers all of them)."""
        from raydistill.data.sources import dataset_fingerprint

        self.spec = teacher_spec(cfg)
        self.local = None
        if teacher_in_driver(cfg):
            from raydistill.models.teachers import load_teacher

            log(f"loading the teacher ({self.spec['kind']}: {self.spec.get('checkpoint')}) in the driver")
            self.local = load_teacher(self.spec)
            probe = {"dim": int(self.local.dim), "fingerprint": self.local.fingerprint}
        else:
            log(f"loading the teacher ({self.spec['kind']}: {self.spec.get('checkpoint')}) where its actors run, "
                "to read its dimension")
            probe = probe_teacher(cfg, self.spec)
        self.dim = probe["dim"]
        used = [r for split in records.values() for r in split]
        self.fingerprint = make_fingerprint(
            teacher={"kind": self.spec["kind"], "fingerprint": probe["fingerprint"], "dtype": self.spec.get("dtype")},
            preprocessing={"decode_size": cfg.data.decode_size},
            dataset=dataset_fingerprint(used),
        )
        self.cache = cache_for(cfg, self.fingerprint)


def embed_split(cfg: Config, side: TeacherSide, split: str, records: list[dict[str, Any]], counters: Counters,
                collect: bool = False) -> list[dict[str, Any]] | None:
    """Run the teacher over one split (resuming: cached images are hits) and finalise it in the cache."""
    rows = embed_splits(cfg, side, {split: records}, counters, collect)
    return rows[split] if rows is not None else None


def embed_splits(cfg: Config, side: TeacherSide, splits: dict[str, list[dict[str, Any]]], counters: Counters,
                 collect: bool = False) -> dict[str, list[dict[str, Any]]] | None:
    """Run the teacher over several splits in one pass (one actor pool) and finalise each in the cache.

    Cached images are hits (a partial cache resumes). With ``collect`` every image's row comes back, grouped
    by split; otherwise only the missing images are embedded and nothing is returned.
    """
    cache = side.cache
    todo: list[dict[str, Any]] = []
    for split, records in splits.items():
        done = cache.done_ids(split)
        expected = {r["image_id"] for r in records}
        missing = [r for r in records if r["image_id"] not in done]
        todo.extend(missing)
        log(f"teacher pass over split {split!r}: {len(records)} images, {len(done & expected)} already cached, "
            f"{len(missing)} to embed")
    collected = None
    if collect:
        everything = [r for records in splits.values() for r in records]
        if side.local is not None and len(everything) <= cfg.eval.local_max_images:
            log(f"embedding {len(everything)} evaluation images with the teacher in the driver")
            rows = embed_locally(everything, cfg, side, counters)
        else:
            rows = dsets.with_teacher(dsets.decoded(dsets.records_dataset(everything), cfg, counters), cfg,
                                      side.spec, side.dim, cache, counters).take_all()
        collected = {split: [] for split in splits}
        for row in rows:
            collected[str(row["split"])].append(row)
    elif todo:
        ds = dsets.with_teacher(dsets.decoded(dsets.records_dataset(todo), cfg, counters), cfg, side.spec,
                                side.dim, cache, counters)
        ds.materialize()
    for split, records in splits.items():
        good = {r["image_id"] for r in records} - _bad_ids(cfg, records, cache, split)
        stats = cache.finalize(split, good)
        log(f"cache {cache.uri}: split {split!r} complete: {stats['images']} images, {stats['captions']} captions"
            + (f", {stats['duplicates_removed']} duplicate rows removed" if stats["duplicates_removed"] else ""))
    return collected


def embed_locally(records: list[dict[str, Any]], cfg: Config, side: TeacherSide,
                  counters: Counters) -> list[dict[str, Any]]:
    """Decode and embed image records in the driver with the teacher it loaded: the actors' ``TeacherEmbedder``
    (cache hits first, the same counters, the same cache parts), batch by batch as the pool would."""
    from raydistill.pipeline.teacher_stage import TeacherEmbedder

    decoded = dsets.decode_locally(dsets.column_batch([dsets.slim(r) for r in records]), cfg, counters)
    embedder = TeacherEmbedder(side.spec, side.dim, side.cache.uri, cfg.cache.write_through, counters,
                               fault_injection=False)
    embedder.teacher = side.local
    size = cfg.teacher.pool.batch_size
    rows: list[dict[str, Any]] = []
    for start in range(0, len(decoded), size):
        chunk = decoded[start:start + size]
        batch = dsets.column_batch(chunk)
        batch["image"] = np.stack([r["image"] for r in chunk])  # [n, S, S, 3] uint8, as Ray Data batches it
        out = embedder(batch)
        rows.extend({k: v[i] for k, v in out.items()} for i in range(len(out["image_id"])))
    return rows


def _bad_ids(cfg: Config, records: list[dict[str, Any]], cache: EmbeddingCache, split: str) -> set[str]:
    """Images the decoder skipped (they can never be in the cache); only allowed with on_bad_image=skip."""
    if cfg.data.on_bad_image != "skip":
        return set()
    return {r["image_id"] for r in records} - cache.done_ids(split)


# ------------------------------------------------------------------------------------------------ tokenizer
def resolve_tokenizer(cfg: Config, records: dict[str, list[dict[str, Any]]], run_dir: Path):
    """The student's tokenizer: the configured one, the run's saved one (resume), or WordPiece built offline."""
    from raydistill.models.tokenizers import build_wordpiece_tokenizer, load_tokenizer, tokenizer_from_vocab

    saved = run_dir / "tokenizer"
    if saved.is_dir():
        return load_tokenizer(saved)
    if cfg.student.tokenizer:
        path = Path(cfg.student.tokenizer)
        tok = tokenizer_from_vocab(path) if path.suffix == ".txt" else load_tokenizer(cfg.student.tokenizer)
    else:
        captions = [c for r in records[cfg.data.train_split] for c in r["captions"]]
        log(f"building a WordPiece vocabulary ({cfg.student.vocab_size}) from {len(captions)} training captions")
        tok = build_wordpiece_tokenizer(captions, vocab_size=cfg.student.vocab_size)
    tmp = run_dir / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    os.replace(tmp, saved)
    return tok


def student_max_len(cfg: Config) -> int:
    from raydistill.models.student import get_preset

    return cfg.student.max_len or get_preset(cfg.student.preset).max_len


# ------------------------------------------------------------------------------------------------ eval data
def eval_set(cfg: Config, split: str, records: list[dict[str, Any]], side: TeacherSide | None, counters: Counters,
             tokenizer: Any) -> EvalSet:
    """Decode a split once (and, distilling, embed it with the teacher via the cache) for evaluation."""
    return eval_sets(cfg, {split: records}, side, counters, tokenizer)[split]


def eval_sets(cfg: Config, splits: dict[str, list[dict[str, Any]]], side: TeacherSide | None, counters: Counters,
              tokenizer: Any) -> dict[str, EvalSet]:
    """Evaluation sets of several splits; the splits the cache lacks are embedded in one teacher pass."""
    rows: dict[str, list[dict[str, Any]]] = {}
    local_max = cfg.eval.local_max_images
    if side is None:
        for split, records in splits.items():
            if len(records) <= local_max:
                rows[split] = dsets.decode_locally(dsets.column_batch([dsets.slim(r) for r in records]), cfg, counters)
            else:
                rows[split] = dsets.decoded(dsets.records_dataset(records), cfg, counters).take_all()
    else:
        complete = side.cache.complete_splits()
        for split in [s for s in splits if s in complete]:
            if complete[split]["images"] <= local_max:
                cached = rows_from_cache_batch(dsets.column_batch(side.cache.read_split(split).to_pydict()))
                rows[split] = dsets.decode_locally(cached, cfg, counters)
            else:
                rows[split] = dsets.decoded(dsets.from_cache(side.cache, split), cfg, counters).take_all()
        missing = {s: r for s, r in splits.items() if s not in complete}
        if missing:
            rows.update(embed_splits(cfg, side, missing, counters, collect=True))
    return {split: build_eval_set(rows[split], tokenizer, student_max_len(cfg)) for split in splits}


# ------------------------------------------------------------------------------------------------ run
def find_run_dir(resume: str, output_dir: str | None) -> Path:
    """A run folder given by path, or by name under ``<output_dir>/runs`` (default ./raydistill_runs/runs)."""
    path = Path(resume)
    if not (path / RUN_CONFIG).is_file():
        path = Path(output_dir or "raydistill_runs") / "runs" / resume
    if not (path / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"--resume {resume}: no run folder holding {RUN_CONFIG} (tried {resume} and {path})")
    return path.resolve()


def new_run_dir(cfg: Config, resume: str | None) -> tuple[str, Path]:
    """The run's name and folder: a fresh ``<name>-<time>``, or the resumed run's."""
    runs = Path(cfg.output_dir) / "runs"
    if resume:
        path = find_run_dir(resume, cfg.output_dir)
        return path.name, path
    name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = runs / name
    k = 1
    while path.exists():
        path = runs / f"{name}.{k}"
        k += 1
    path.mkdir(parents=True)
    return path.name, path


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run was started with."""
    import yaml

    raw = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    return config_from_dict(raw, origin=str(run_dir / RUN_CONFIG))


def planned_steps(cfg: Config, n_train_captions: int) -> int:
    """Total optimizer steps: ``train.steps``, or epochs x full global batches per epoch."""
    if cfg.train.steps:
        return cfg.train.steps
    per_epoch = n_train_captions // (cfg.train.batch_size * cfg.train.num_workers)
    if per_epoch == 0:
        raise ValueError(
            f"the training split has {n_train_captions} captions, fewer than one global batch of "
            f"{cfg.train.batch_size} x {cfg.train.num_workers} workers; lower train.batch_size"
        )
    return cfg.train.epochs * per_epoch


def train_storage(cfg: Config) -> str:
    """Where Ray Train keeps the run's checkpoints: ``train.storage_path`` or ``<output_dir>/ray_train``."""
    return cfg.train.storage_path or str(Path(cfg.output_dir) / "ray_train")


def require_writable(folder: str, key: str) -> None:
    """Fail fast, naming the config key, when a local output folder cannot be written.

    Writes and removes a probe file (permission bits alone say nothing for root, read-only mounts or a full
    disk). Object-store URIs are left to the run: probing them would need credentials here.

    Raises:
        ConfigError: the folder cannot be created or written, with the reason.
    """
    if "://" in folder:
        return
    path = Path(folder)
    probe = path / f".raydistill-write-probe-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{key}={folder}: cannot write there ({err.strerror or err}); point {key} at a writable folder"
        ) from None


def ingest_options(cfg: Config) -> Any:
    """Ray Data options of the training stream: with ``train.shuffle_buffer=0``, a fixed row order.

    Without a shuffle buffer a run is exactly reproducible (one worker): rows reach the worker in record
    order (``preserve_order``), and a resumed worker skips the batches of its epoch trained on before the
    checkpoint, so a run restarted after a failure ends in the same state as one never interrupted. None:
    Train's defaults (the driver's ``DataContext``), where blocks flow in whatever order they finish.
    """
    if cfg.train.shuffle_buffer:
        return None
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


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
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill.pipeline.export import export_student
    from raydistill.pipeline.train_loop import train_loop
    from raydistill.tracking import Tracker, flatten_config, resolve_tracking_uri

    # Before anything is written or started: a run must be able to save its outputs and checkpoints.
    require_writable(cfg.output_dir, "output_dir")
    require_writable(train_storage(cfg), "train.storage_path")
    run_name, run_dir = new_run_dir(cfg, resume)
    if resume:
        cfg = load_run_config(run_dir)
    else:
        (run_dir / RUN_CONFIG).write_text(dump_config(cfg))
    log(f"run {run_name} in {run_dir}")
    print(dump_config(cfg), file=sys.stderr, flush=True)
    warm = threading.Thread(target=warm_imports, name="raydistill-warm-imports", daemon=True)
    warm.start()  # while a local Ray instance starts, which is mostly waiting on its processes
    init_ray(cfg)
    warm.join()

    all_records = dsets.read_records(cfg)
    splits = [cfg.data.train_split, cfg.data.test_split]
    if cfg.train.eval_every and cfg.data.val_split:
        splits.append(cfg.data.val_split)
    records = {s: all_records[s] for s in dict.fromkeys(splits)}
    counters = Counters().start()
    tokenizer = resolve_tokenizer(cfg, records, run_dir)

    side = TeacherSide(cfg, all_records) if cfg.uses_teacher else None
    if side is not None:
        if cfg.cache.mode == "cache":
            side.cache.require_complete(side.fingerprint, [cfg.data.train_split, cfg.data.test_split])
        else:
            side.cache.open(side.fingerprint, side.dim)
        log(f"embedding cache: {side.cache.uri} ({cfg.cache.mode} mode)")
    embed_dim = side.dim if side is not None else cfg.student.embed_dim

    tracking_uri = resolve_tracking_uri(cfg.tracking.uri, Path(cfg.output_dir))
    tracker = Tracker(tracking_uri, cfg.tracking.experiment, run_name=run_name, tags=tags,
                      parent_run_id=parent_run_id, local_dir=run_dir / "tracking",
                      enabled=cfg.tracking.enabled, run_id=_saved_run_id(run_dir))
    (run_dir / "mlflow_run_id").write_text(tracker.run_id or "")
    if not resume:
        tracker.log_params(flatten_config(cfg.model_dump(mode="json")))
        tracker.log_artifact(run_dir / RUN_CONFIG)

    wanted = [cfg.data.test_split] + ([cfg.data.val_split] if cfg.train.eval_every and cfg.data.val_split else [])
    sets = eval_sets(cfg, {s: records[s] for s in dict.fromkeys(wanted)}, side, counters, tokenizer)
    test = sets[cfg.data.test_split]
    val = sets[cfg.data.val_split] if len(wanted) > 1 else None

    train_records = records[cfg.data.train_split]
    n_train_captions = sum(len(r["captions"]) for r in train_records)
    steps = planned_steps(cfg, n_train_captions)
    if side is not None and cfg.cache.mode == "cache":
        image_rows = dsets.from_cache(side.cache, cfg.data.train_split)
        image_rows = dsets.decoded(image_rows, cfg, counters)
    elif side is not None:
        image_rows = dsets.decoded(dsets.records_dataset(train_records), cfg, counters)
        cache = side.cache if cfg.cache.write_through else None
        image_rows = dsets.with_teacher(image_rows, cfg, side.spec, side.dim, cache, counters)
    else:
        image_rows = dsets.decoded(dsets.records_dataset(train_records), cfg, counters)
    train_ds = dsets.training_rows(image_rows, tokenizer, student_max_len(cfg), with_teacher=side is not None)
    if cfg.train.materialize:
        log(f"materialising {n_train_captions} training rows in the object store (train.materialize): "
            "one pass of decoding and teacher, then every epoch reads memory")
        start = time.perf_counter()
        train_ds = train_ds.materialize()
        log(f"training rows ready in {time.perf_counter() - start:.1f} s ({train_ds.size_bytes() / 2**20:.0f} MiB)")
        if cfg.train.shuffle_buffer:
            train_ds = train_ds.randomize_block_order(seed=cfg.train.seed)  # on top of the local shuffle

    storage = train_storage(cfg)
    use_gpu = cfg.train.use_gpu == "yes" or (cfg.train.use_gpu == "auto" and cluster_has_gpus())
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.resources_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "embed_dim": embed_dim,
            "vocab_size": len(tokenizer),
            "planned_steps": steps,
            "mlflow": {"uri": tracking_uri, "experiment": cfg.tracking.experiment, "run_id": tracker.run_id,
                       "local_dir": str(run_dir / "tracking")} if tracker.run_id else None,
            "val": ray.put(val) if val is not None else None,
            "kill_worker_at": os.environ.get("RAYDISTILL_KILL_WORKER_AT"),
            "checkpoint_root": None if "://" in storage else f"{storage}/{run_name}",
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            label_selector=cfg.train.label_selector or None,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=train_callbacks or None,
        ),
        datasets={"train": train_ds},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest_options(cfg)),
    )
    log(f"training {cfg.student.preset} student for {steps} steps on {cfg.train.num_workers} worker(s)"
        f"{' (GPU)' if use_gpu else ''}, objective {cfg.distill.objective}")
    start = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - start
    if result.error is not None:
        tracker.finish("FAILED")
        raise result.error
    out = result.return_value or {}
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")

    train_cache = None
    if side is not None and cfg.cache.mode == "stream" and cfg.cache.write_through:
        try:
            bad = _bad_ids(cfg, train_records, side.cache, cfg.data.train_split)
            train_cache = side.cache.finalize(cfg.data.train_split, {r["image_id"] for r in train_records} - bad)
        except CacheError as err:
            log(f"the training split is only partly cached (training ended before a full pass): {err}")

    student_dir = run_dir / "student"
    with result.checkpoint.as_directory() as d:
        model, history = export_student(Path(d), cfg, embed_dim, tokenizer, student_dir,
                                        extra={"run": run_name, "teacher": side.spec if side else None,
                                               "objective": cfg.distill.objective})
    import torch

    student_metrics = evaluate_student(model, test, torch.device("cpu"), cfg.eval.model_dump())
    teacher_metrics = evaluate_teacher(test, cfg.eval.chunk_size) if side is not None else None
    totals = counters.get()

    summary = {
        "run_id": tracker.run_id,
        "run_name": run_name,
        "run_dir": str(run_dir),
        "mlflow_tracking_uri": tracking_uri,
        "steps": int(out.get("steps", 0)),
        "planned_steps": steps,
        "resumed_from_step": out.get("resumed_from"),
        "checkpoint": result.checkpoint.path,
        "student_dir": str(student_dir),
        "student_params": int(model.num_parameters()),
        "metrics": {"student": student_metrics, "teacher": teacher_metrics},
        "teacher_images_embedded": int(totals.get("teacher_images_embedded", 0)),
        "teacher_captions_embedded": int(totals.get("teacher_captions_embedded", 0)),
        "cache_hits": int(totals.get("cache_hits", 0)),
        "bad_images": int(totals.get("bad_images", 0)),
        "dataset_images": None,
        "dataset_captions": None,
        "train_seconds": round(train_seconds, 2),
        "cache_dir": side.cache.uri if side is not None else None,
    }
    summary.update(_dataset_counts(cfg, side, test, val, train_cache, train_records, totals))
    summary["history"] = [h for h in history if "val_rsum" in h]
    _log_results(tracker, summary, history, run_dir, student_dir)
    tracker.finish("FINISHED")
    _atomic_json(run_dir / RUN_RESULT, summary)
    log(f"done: student RSUM {student_metrics['rsum']:.1f}"
        + (f", teacher RSUM {teacher_metrics['rsum']:.1f}" if teacher_metrics else "")
        + f" on {test.n_images} test images / {test.n_captions} captions")
    return summary


def _saved_run_id(run_dir: Path) -> str | None:
    path = run_dir / "mlflow_run_id"
    return (path.read_text().strip() or None) if path.is_file() else None


def _dataset_counts(cfg: Config, side: TeacherSide | None, test: EvalSet, val: EvalSet | None,
                    train_cache: dict[str, int] | None, train_records: list[dict[str, Any]],
                    totals: dict[str, float]) -> dict[str, int]:
    """Images and captions the pipeline itself saw: eval sets as decoded, the train split as cached."""
    images = test.n_images + (val.n_images if val is not None else 0)
    captions = test.n_captions + (val.n_captions if val is not None else 0)
    if train_cache is not None:
        images += train_cache["images"]
        captions += train_cache["captions"]
    elif side is not None and cfg.cache.mode == "cache":
        done = side.cache.complete_splits()[cfg.data.train_split]
        images += done["images"]
        captions += done["captions"]
    else:
        # No cache pass to count from: the decoder's count of the first pass over the training split.
        images += len(train_records) - int(totals.get("bad_images", 0))
        captions += sum(len(r["captions"]) for r in train_records)
    return {"dataset_images": images, "dataset_captions": captions}


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _log_results(tracker: Any, summary: dict[str, Any], history: list[dict[str, float]], run_dir: Path,
                 student_dir: Path) -> None:
    from raydistill.plots import plot_balancer_weights

    metrics = {f"test/{k}": v for k, v in summary["metrics"]["student"].items()}
    if summary["metrics"]["teacher"]:
        metrics.update({f"teacher_test/{k}": v for k, v in summary["metrics"]["teacher"].items()})
    for key in ("teacher_images_embedded", "teacher_captions_embedded", "dataset_images", "dataset_captions",
                "student_params", "train_seconds", "bad_images", "cache_hits"):
        metrics[key] = float(summary[key] or 0)
    tracker.log_metrics(metrics, step=summary["steps"])
    table = run_dir / "recall_table.json"
    _atomic_json(table, summary["metrics"])
    tracker.log_artifact(table)
    weights = [h for h in history if any(k.startswith("weight/") for k in h)]
    if weights:
        plot = run_dir / "balancer_weights.png"
        plot_balancer_weights(
            [{"step": h["step"], **{k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("weight/")}} for h in weights],
            plot,
        )
        tracker.log_artifact(plot)
    tracker.log_artifact(student_dir, artifact_path="student")


# ------------------------------------------------------------------------------------------------ embed
def embed(cfg: Config) -> dict[str, Any]:
    """Fill (or resume) the embedding cache for the train and test splits; never trains."""
    init_ray(cfg)
    all_records = dsets.read_records(cfg)
    splits = list(dict.fromkeys([cfg.data.train_split, cfg.data.test_split]
                                + ([cfg.data.val_split] if cfg.data.val_split in all_records else [])))
    records = {s: all_records[s] for s in splits}
    counters = Counters().start()
    side = TeacherSide(cfg, all_records)
    side.cache.open(side.fingerprint, side.dim)
    embed_splits(cfg, side, records, counters)
    stats = {split: side.cache.complete_splits()[split] for split in splits}
    totals = counters.get()
    return {
        "cache_dir": side.cache.uri,
        "fingerprint": side.fingerprint["hash"],
        "splits": stats,
        "teacher_images_embedded": int(totals.get("teacher_images_embedded", 0)),
        "teacher_captions_embedded": int(totals.get("teacher_captions_embedded", 0)),
        "bad_images": int(totals.get("bad_images", 0)),
        "dataset_images": sum(s["images"] for s in stats.values()),
        "dataset_captions": sum(s["captions"] for s in stats.values()),
    }
