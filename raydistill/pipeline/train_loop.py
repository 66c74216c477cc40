"""The Ray Train worker loop: DSMD (or ground-truth contrastive) training of the student on one rank.

Each worker reads its shard of the caption-level rows (``pixels``, ``input_ids``, ``attention_mask``,
``image_key``, ``sample_key`` and, when distilling, ``t_img`` / ``t_txt``), runs the objective, the balancer
and AdamW, and every ``checkpoint_every`` steps reports a checkpoint holding everything needed to resume
exactly: student, optimizer, scheduler, objective (the teacher-embedding queues), balancer, step, epoch,
RNG and the logged history. Training length is counted in optimizer steps, so a run restarted from a
checkpoint (after a worker failure, or ``raydistill run --resume``) ends at the planned step.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydistill.pipeline.progress import log
from raydistill.pipeline.trainer import Trainer, latest_checkpoint

def _maybe_inject_fault(step: int, kill_spec: str | None = None) -> None:
    """Fault injection for recovery tests and drills, each once (a marker file records that it happened).

    ``kill_spec`` is ``RAYDISTILL_KILL_WORKER_AT`` as the driver saw it (handed over in the loop config, so
    it works even when the Ray instance was started without the variable).

    - ``RAYDISTILL_KILL_WORKER_AT=<step>:<marker file>``: at that step the worker process dies abruptly
      (``os._exit``); the restarted worker group carries on from the last checkpoint.
    - ``RAYDISTILL_STALL_WORKER_AT=<step>:<marker file>``: at that step the worker stops making progress,
      with the checkpoints so far on disk: the drill kills the driver (or the machine) there, then resumes.
    """
    for variable, action in (("RAYDISTILL_KILL_WORKER_AT", "killed"), ("RAYDISTILL_STALL_WORKER_AT", "stalled")):
        spec = (kill_spec if action == "killed" else None) or os.environ.get(variable)
        if not spec:
            continue
        at, marker = spec.split(":", 1)
        if step != int(at) or os.path.exists(marker):
            continue
        Path(marker).write_text(f"{action} at step {step}\n")
        if action == "killed":
            os._exit(1)
        time.sleep(3600)


def _step_checkpoint(candidates: list[Path]) -> tuple[int, Path] | None:
    """The candidate folder whose training state has the highest step (None when none loads)."""
    best = None
    for folder in candidates:
        try:
            step = int(torch.load(folder / "state.pt", map_location="cpu", weights_only=True)["step"])
        except Exception:  # noqa: BLE001 - a copy cut short: not a candidate
            continue
        if best is None or step > best[0]:
            best = (step, folder)
    return best


def worker_shard(ds: Any, rank: int, world: int) -> Any:
    """This rank's part of the epoch's dataset (``ds``: the epoch's dataset on rank 0, None on the others).

    Rank 0 splits it with ``streaming_split`` and hands each rank its iterator, with one worker too: Ray Data's
    streaming executor then runs in its split coordinator, an actor of its own, rather than in this process.
    Iterated here directly, its scheduling loop ran as a thread beside training and held the interpreter lock
    for up to half the time, more the larger the dataset (more read and decode tasks to schedule).
    """
    splits = ds.streaming_split(world, equal=True) if rank == 0 else None
    if world == 1:
        return splits[0]
    import ray.train.collective

    return ray.train.collective.broadcast_from_rank_zero(splits)[rank]


def epoch_batches(source: Any, rank: int, seed: int, epoch: int, batch_size: int,
                  window: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of training batches for this rank from ``source`` (its :func:`worker_shard`), in an order that
    depends only on the data, seed and epoch.

    Caption rows are mixed within windows of ``window`` rows by a permutation seeded by (seed, epoch, rank,
    window number). Ray Data's own local shuffle buffer depends on where its blocks happen to end, which
    differs between a run and its resumption; a window of rows does not. The last incomplete batch is dropped.
    """
    window = max(batch_size, -(-window // batch_size) * batch_size) if window else batch_size
    carry: dict[str, np.ndarray] | None = None
    for k, rows in enumerate(source.iter_batches(batch_size=window, batch_format="numpy")):
        if window > batch_size:
            order = np.random.default_rng([seed, epoch, rank, k]).permutation(len(rows["pixels"]))
            rows = {key: value[order] for key, value in rows.items()}
        if carry is not None:
            rows = {key: np.concatenate([carry[key], rows[key]]) for key in rows}
        n = len(rows["pixels"])
        for start in range(0, n - batch_size + 1, batch_size):
            # Rows not permuted are Ray's read-only zero-copy arrays: a tensor must own writable memory.
            yield {key: torch.from_numpy(np.require(value[start:start + batch_size], requirements="CW"))
                   for key, value in rows.items()}
        rest = n % batch_size
        carry = {key: value[n - rest:] for key, value in rows.items()} if rest else None


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The function each Ray Train worker runs: :func:`train_worker`, with the user's mistakes returned rather
    than raised.

    Ray Train restarts the worker group after any error (``train.max_failures``), which helps when a worker or
    a node was lost and only costs time when the data itself is wrong (too many bad images, a bad manifest row,
    a full disk): such an error comes back as ``{"user_error": message}`` and ends the run at once.
    """
    import errno

    from raydistill.errors import find_os_error, find_user_error

    try:
        return train_worker(config)
    except Exception as err:  # noqa: BLE001 - sorted below
        user = find_user_error(err)
        if user is not None:
            return {"user_error": str(user)}
        full = find_os_error(err, (errno.ENOSPC, errno.EDQUOT, errno.EROFS))
        if full is not None:
            return {"disk_error": {"errno": full.errno, "strerror": full.strerror, "filename": full.filename}}
        raise


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Train worker's training (``TorchTrainer(train_loop, train_loop_config=...)``).

    ``config`` holds ``plan`` (the run's :class:`~raydistill.pipeline.plans.DataPlan`: typed config, teacher,
    cache, tokenizer), ``embed_dim``, ``planned_steps``, ``mlflow`` (tracking URI, experiment, run id or None)
    and ``checkpoint_root`` (the run's checkpoint folder, when local). Each epoch's dataset is built here when
    the epoch starts: the teacher stream (epoch 0), the cache (later epochs) or the source (no teacher).
    """
    import ray.train
    import ray.train.torch

    from raydistill.pipeline.evaluate import dataset_batches, embed_split, student_metrics
    from raydistill.pipeline.dashboard import LiveMetrics
    from raydistill.pipeline.plans import (
        configure_data_context, eval_dataset, eval_rows, finalize_split, train_epoch_dataset)

    plan = config["plan"]
    typed = plan.cfg
    configure_data_context(typed)
    train = typed.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved.
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    random.seed(train.seed + rank)
    np.random.seed(train.seed + rank)

    trainer = Trainer(typed, config["embed_dim"], len(plan.tokenizer), config["planned_steps"], device,
                      wrap_model=ray.train.torch.prepare_model if world > 1 else None)
    # The newest complete checkpoint: Ray Train's own, or a newer one on disk that its controller never
    # registered (a worker or driver killed right after writing it).
    candidates = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            candidates.append(Path(d))
            if config.get("checkpoint_root"):
                found = latest_checkpoint(Path(config["checkpoint_root"]))
                candidates += [found] if found is not None else []
            best = _step_checkpoint(candidates)
            trainer.restore(best[1])
    elif config.get("checkpoint_root") and latest_checkpoint(Path(config["checkpoint_root"])) is not None:
        trainer.restore(latest_checkpoint(Path(config["checkpoint_root"])))
    resumed_from = trainer.step if trainer.step else None
    if rank == 0 and resumed_from:
        log(f"resumed from step {trainer.step} (epoch {trainer.epoch}, {trainer.step - trainer.epoch_start_step} "
            "batches into it)")

    tracker = None
    if rank == 0 and config.get("mlflow"):
        from raydistill.tracking import Tracker

        m = config["mlflow"]
        tracker = Tracker(m["uri"], m["experiment"], run_id=m["run_id"], local_dir=Path(m["local_dir"]))
    live = LiveMetrics(run=typed.name) if rank == 0 else None
    val_split = typed.data.val_split if train.eval_every and rank == 0 else None
    # The validation split's rows, read once at the first evaluation: each evaluation decodes the same rows,
    # and a new read of the cache lists its files again (Ray Data starts footer-reading actors for every read).
    val_rows = None
    planned = trainer.planned_steps
    batch_size = train.batch_size
    window_start, window_samples, window_steps = time.perf_counter(), 0, 0
    last_val: float | None = None
    # Per-step metrics wait here until the next checkpoint is reported: a run resumed from that checkpoint
    # trains the later steps again, and MLflow must hold each step once.
    unsent: list[tuple[dict[str, float], int]] = []

    def report(with_checkpoint: bool, metrics: dict[str, float]) -> None:
        metrics = dict(metrics, step=trainer.step, epoch=trainer.epoch)
        if with_checkpoint:
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    trainer.save(Path(d))
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=ckpt)
            if tracker is not None:
                for values, step in unsent:
                    tracker.log_metrics(values, step=step)
                unsent.clear()
                tracker.flush()
        else:
            ray.train.report(metrics)

    while trainer.step < planned:
        epoch = trainer.epoch
        ds = train_epoch_dataset(plan, epoch) if rank == 0 else None
        batches = epoch_batches(worker_shard(ds, rank, world), rank, train.seed, epoch, batch_size,
                                train.shuffle_buffer)
        seen_any = False
        # A resumed worker reads its epoch again from the start, in the same order: pass over the batches
        # trained on before the checkpoint, and the run goes on as if never interrupted.
        to_skip = trainer.step - trainer.epoch_start_step
        for batch in batches:
            seen_any = True
            if to_skip > 0:
                to_skip -= 1
                continue
            out = trainer.train_step(batch)
            _maybe_inject_fault(trainer.step, config.get("kill_worker_at"))
            window_samples += batch_size
            window_steps += 1
            unsent.append(({k: v for k, v in out.items()}, trainer.step))
            metrics: dict[str, float] = {}
            if trainer.step % train.log_every == 0 or trainer.step == planned:
                elapsed = time.perf_counter() - window_start
                metrics = dict(out, step=trainer.step)
                metrics["samples_per_s"] = window_samples * world / max(elapsed, 1e-9)
                metrics["step_time_s"] = elapsed / max(1, window_steps)
                window_start, window_samples, window_steps = time.perf_counter(), 0, 0
                trainer.history.append(
                    {k: v for k, v in out.items() if k.startswith(("weight/", "loss/"))} | {"step": trainer.step})
            checkpoint_now = trainer.step % train.checkpoint_every == 0 or trainer.step == planned
            # Every checkpoint carries its own validation RSUM: Ray Train keeps the best ones by it.
            if val_split and (trainer.step % train.eval_every == 0 or checkpoint_now):
                if val_rows is None:
                    val_rows = eval_rows(plan, val_split).materialize()
                emb = embed_split(dataset_batches(eval_dataset(plan, val_split, val_rows), typed.eval.batch_size),
                                  trainer.raw_model, plan.tokenizer, plan.max_len, device)
                last_val = student_metrics(emb, typed.eval.chunk_size)["rsum"]
                trainer.history.append({"step": trainer.step, "val_rsum": last_val})
                metrics["val_rsum"] = last_val
            if rank == 0:
                progress = {"train/step": trainer.step, "train/epoch": trainer.epoch, "train/loss": out["loss/total"]}
                if "samples_per_s" in metrics:
                    progress["train/samples_per_s"] = metrics["samples_per_s"]
                plan.counters.set_soon(progress)
            if rank == 0 and metrics:
                unsent.append(({k: v for k, v in metrics.items() if k in ("samples_per_s", "step_time_s", "val_rsum")},
                               trainer.step))
                live.record(metrics)
                log(f"step {trainer.step}/{planned} loss {out['loss/total']:.4g} "
                    f"lr {out['lr']:.2e} {metrics.get('samples_per_s', 0):.0f} samples/s")
            if checkpoint_now:
                report(True, metrics or {"loss/total": out["loss/total"]})
            elif metrics:
                report(False, metrics)
            if trainer.step >= planned:
                break
        if not seen_any:
            raise RuntimeError(
                f"the training split gave no full batch of {batch_size} samples per worker; "
                "lower train.batch_size or use more data"
            )
        if trainer.step < planned:
            if rank == 0 and epoch == 0 and plan.train_from == "stream" and typed.cache.write_through:
                # The first pass wrote every training image to the cache: check it, then later epochs read it.
                finalize_split(plan, typed.data.train_split, first_pass=True)
            trainer.epoch += 1
            trainer.epoch_start_step = trainer.step
    if tracker is not None:
        tracker.flush()
    return {"steps": trainer.step, "resumed_from": resumed_from, "history": trainer.history, "val_rsum": last_val}
