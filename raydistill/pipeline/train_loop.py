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


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The function each Ray Train worker runs (``TorchTrainer(train_loop, train_loop_config=...)``).

    ``config`` holds ``cfg`` (the resolved config dict), ``embed_dim``, ``vocab_size``, ``planned_steps``,
    ``mlflow`` (tracking URI, experiment, run id or None), and optionally ``val`` (a Ray object ref of the
    validation arrays) for periodic validation RSUM.
    """
    import ray.train
    import ray.train.torch

    from raydistill.pipeline.evaluate import evaluate_student
    from raydistill.pipeline.live_metrics import LiveMetrics

    cfg = config["cfg"]
    train = cfg["train"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved.
    torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    seed = train["seed"]
    random.seed(seed + rank)
    np.random.seed(seed + rank)

    trainer = Trainer(
        cfg, config["embed_dim"], config["vocab_size"], config["planned_steps"], device,
        wrap_model=ray.train.torch.prepare_model if ctx.get_world_size() > 1 else None,
    )
    checkpoint = ray.train.get_checkpoint()
    resumed_from = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.restore(Path(d))
        resumed_from = trainer.step
    elif config.get("checkpoint_root") and latest_checkpoint(Path(config["checkpoint_root"])) is not None:
        # A worker that died right after reporting can leave a persisted checkpoint that the controller never
        # registered; recover from the newest complete one rather than starting over.
        trainer.restore(latest_checkpoint(Path(config["checkpoint_root"])))
        resumed_from = trainer.step
        if rank == 0:
            log(f"resumed from step {trainer.step} (epoch {trainer.epoch})")

    tracker = None
    if rank == 0 and config.get("mlflow"):
        from raydistill.tracking import Tracker

        m = config["mlflow"]
        tracker = Tracker(m["uri"], m["experiment"], run_id=m["run_id"], local_dir=Path(m["local_dir"]),
                          flush_every=20)
    live = LiveMetrics(run=cfg["name"]) if rank == 0 else None

    val = ray.get(config["val"]) if config.get("val") is not None and rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    planned = trainer.planned_steps
    batch_size = train["batch_size"]
    log_every, ckpt_every, eval_every = train["log_every"], train["checkpoint_every"], train.get("eval_every")
    window_start, window_samples, window_steps = time.perf_counter(), 0, 0
    last_val: float | None = None

    def report(with_checkpoint: bool, metrics: dict[str, float]) -> None:
        metrics = dict(metrics, step=trainer.step, epoch=trainer.epoch)
        if with_checkpoint:
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    trainer.save(Path(d))
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)

    while trainer.step < planned:
        batches = shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=train["shuffle_buffer"] or None,
            local_shuffle_seed=seed + 1000 * trainer.epoch + rank if train["shuffle_buffer"] else None,
            device="cpu",
        )
        seen_any = False
        # A resumed worker re-reads its epoch from the beginning: pass over the batches trained on before the
        # checkpoint. With train.shuffle_buffer=0 the order is fixed, so these are exactly those batches and
        # the run continues as if never interrupted; with shuffling the epoch at least keeps its length.
        to_skip = trainer.step - trainer.epoch_start_step
        for batch in batches:
            seen_any = True
            if to_skip > 0:
                to_skip -= 1
                continue
            out = trainer.train_step(batch)
            _maybe_inject_fault(trainer.step, config.get("kill_worker_at"))
            window_samples += batch_size
            out["step"] = trainer.step
            window_steps += 1
            if tracker is not None:
                # Every step's losses and weights; the tracker batches the writes (flush_every).
                tracker.log_metrics({k: v for k, v in out.items() if k != "step"}, step=trainer.step)
            metrics: dict[str, float] = {}
            if trainer.step % log_every == 0 or trainer.step == planned:
                elapsed = time.perf_counter() - window_start
                metrics = dict(out)
                metrics["samples_per_s"] = window_samples * ctx.get_world_size() / max(elapsed, 1e-9)
                metrics["step_time_s"] = elapsed / max(1, window_steps)
                window_start, window_samples, window_steps = time.perf_counter(), 0, 0
                trainer.history.append(
                    {k: v for k, v in out.items() if k.startswith(("weight/", "loss/")) or k == "step"}
                )
            if eval_every and val is not None and trainer.step % eval_every == 0:
                last_val = evaluate_student(trainer.raw_model, val, device, cfg["eval"])["rsum"]
                trainer.history.append({"step": trainer.step, "val_rsum": last_val})
                metrics["val_rsum"] = last_val
            if rank == 0 and metrics:
                if tracker is not None:
                    extra = {k: v for k, v in metrics.items() if k in ("samples_per_s", "step_time_s", "val_rsum")}
                    tracker.log_metrics(extra, step=trainer.step)
                live.record(metrics)
                log(f"step {trainer.step}/{planned} loss {out['loss/total']:.4g} "
                    f"lr {out['lr']:.2e} {metrics.get('samples_per_s', 0):.0f} samples/s")
            if trainer.step % ckpt_every == 0 or trainer.step == planned:
                if tracker is not None:
                    # Everything up to a checkpoint is in MLflow before it: a restart re-logs only later steps.
                    tracker.flush()
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
            trainer.epoch += 1
            trainer.epoch_start_step = trainer.step
    if tracker is not None:
        tracker.flush()
    return {"steps": trainer.step, "resumed_from": resumed_from, "history": trainer.history, "val_rsum": last_val}
