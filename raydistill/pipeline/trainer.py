"""One rank's training state and optimizer step: the student, the objective, the balancer, AdamW, the schedule.

:class:`Trainer` is what a Ray Train worker (``train_loop``) and the benchmarks without Ray drive: it builds
the student and the objective from the config, takes one step on a caption-level batch, and saves or
restores everything needed to resume exactly (student, optimizer, scheduler, objective with its
teacher-embedding queues, balancer, step, epoch, position in the epoch, the CPU and CUDA RNGs).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from raydistill.config import Config

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


def lr_lambda(schedule: str, total: int, warmup: int, step_decay_at: float):
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine, step or constant."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return 0.1 if step >= int(step_decay_at * total) else 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _rng_state() -> dict[str, Any]:
    """Every random generator a step draws from: torch's CPU one, Python's, NumPy's, and CUDA's when present."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    state["numpy"] = torch.from_numpy(np.random.get_state()[1].astype(np.int64))
    state["numpy_pos"] = int(np.random.get_state()[2])
    if torch.cuda.is_available():
        # Dropout in a model on the GPU draws from the CUDA generators: an exact resume continues them too.
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``_rng_state`` saved; a state without CUDA generators leaves those as they are."""
    # Trainer.restore maps the checkpoint onto the training device; the generators take CPU byte tensors.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].cpu().numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        # A checkpoint written where more GPUs were visible restores the generators this process has.
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write`` on a temporary name beside ``path``, then rename it; on failure remove the temporary file.

    Raises:
        OSError: naming ``path`` and the reason (torch reports a full disk as a RuntimeError; both are caught).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write the training checkpoint {path}: {err}") from err


def _sync_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients of parameters outside DDP (balancer, temperature) so ranks stay identical."""
    from raydistill.method.distributed import all_reduce_mean, is_distributed

    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            p.grad.copy_(all_reduce_mean(p.grad))


class Trainer:
    """One rank's training state and step; used by :func:`train_loop` (and by benchmarks without Ray).

    Args:
        cfg: the run's typed config (``raydistill.config.Config``).
        embed_dim: output dimension (the teacher's, or ``student.embed_dim``).
        vocab_size: the tokenizer's vocabulary size.
        planned_steps: total optimizer steps.
        device: where to train.
        wrap_model: optional function wrapping the student for training (e.g. DDP's ``prepare_model``).

    Attributes:
        step: Batches trained on, skipped fp16 steps included (the position in the data).
        skipped_steps: fp16 steps whose update the gradient scaler skipped (inf/NaN gradients): they
            moved neither the learning-rate schedule, the balancer nor the teacher-embedding queues.
    """

    def __init__(self, cfg: Config, embed_dim: int, vocab_size: int, planned_steps: int, device: torch.device,
                 wrap_model=None) -> None:
        from raydistill.method import balancers, losses
        from raydistill.models.student import build_student, student_overrides

        self.cfg = cfg
        self.device = device
        self.planned_steps = planned_steps
        train, distill, student = cfg.train, cfg.distill, cfg.student
        torch.manual_seed(train.seed)
        model = build_student(
            student.preset,
            embed_dim=embed_dim,
            vocab_size=vocab_size,
            vision_weights=student.vision_weights,
            text_weights=student.text_weights,
            **student_overrides(student.model_dump()),
        ).to(device)
        self.raw_model = model
        self.model = wrap_model(model) if wrap_model else model
        self.distill = distill.objective == "dsmd"
        if self.distill:
            self.objective = losses.DSMDObjective(
                dim=embed_dim,
                queue_size=distill.queue_size,
                temperature=distill.temperature,
                margin=distill.margin,
                max_violation=distill.max_violation,
                mask_same_image=distill.mask_same_image,
                terms=tuple(distill.terms),
                seed=train.seed,
            ).to(device)
            self.balancer = balancers.make_balancer(
                cfg.balancer.kind, names=list(distill.terms), **cfg.balancer.params
            ).to(device)
        else:
            self.objective = losses.GroundTruthContrastive(
                init_temperature=distill.gt_temperature, learnable=distill.gt_learnable_temperature
            ).to(device)
            self.balancer = balancers.make_balancer("fixed", names=["contrastive_gt"]).to(device)
        self.extra_params = [p for p in list(self.objective.parameters()) + list(self.balancer.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.model.parameters() if p.requires_grad]},
             {"params": self.extra_params, "weight_decay": 0.0}],
            lr=train.lr,
            betas=(0.9, train.adam_beta2),
            weight_decay=train.weight_decay,
        )
        warmup = int(train.warmup_fraction * planned_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(train.schedule, planned_steps, warmup, train.step_decay_at)
        )
        amp = train.amp
        if amp == "auto":
            amp = "bf16" if device.type == "cuda" else "off"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.step = 0
        self.skipped_steps = 0
        self.epoch = 0
        # The step at which the current epoch began: a resumed worker skips the batches of this epoch that
        # were trained on before the checkpoint (step - epoch_start_step), so epochs keep their length.
        self.epoch_start_step = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.raw_model.state_dict(),
            "objective": self.objective.state_dict(),
            "balancer": self.balancer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_start_step": self.epoch_start_step,
            "skipped_steps": self.skipped_steps,
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.balancer.load_state_dict(state["balancer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        # Checkpoints written before this field existed: skip nothing on resume.
        self.epoch_start_step = int(state.get("epoch_start_step", self.step))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        _set_rng_state(state["rng"])

    def save(self, directory: Path) -> None:
        """Write the full training state into ``directory`` (temporary names, then rename).

        A write that fails (disk full, folder gone or read-only) leaves the previous files untouched and no
        temporary file behind.

        Raises:
            OSError: naming the file that could not be written and why.
        """
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(directory / STATE_FILE, lambda tmp: torch.save(self.state_dict(), tmp))
        _write_atomically(directory / HISTORY_FILE, lambda tmp: tmp.write_text(json.dumps(self.history)))

    def restore(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        self.load_state_dict(state)
        history = directory / HISTORY_FILE
        self.history = json.loads(history.read_text()) if history.is_file() else []

    # ------------------------------------------------------------------------------- step
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on a caption-level batch; returns losses, weights and the learning rate.

        Under fp16 the gradient scaler skips the update when the gradients hold inf or NaN; such a step
        counts as a batch (``step``) and in ``skipped_steps`` (returned as ``amp/skipped_steps``), and
        leaves the schedule, the balancer's state and the queues as they were.
        """
        self.model.train()
        pixels = self.raw_model.preprocess_images(batch["pixels"]).to(self.device, non_blocking=True)
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        image_ids = batch["image_key"].to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            s_img, s_txt = self.model(pixels, input_ids, attention_mask)
        s_img, s_txt = s_img.float(), s_txt.float()
        if self.distill:
            t_img = batch["t_img"].to(self.device).float()
            t_txt = batch["t_txt"].to(self.device).float()
            terms = self.objective(s_img, s_txt, t_img, t_txt, image_ids)
        else:
            terms = self.objective(s_img, s_txt, image_ids)
        # The balancer updates its state (previous losses, step) as it weighs: keep a copy to put back
        # if the scaler skips this update.
        balancer_before = copy.deepcopy(self.balancer.state_dict()) if self.scaler is not None else None
        total, weights = self.balancer(terms)
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = None
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        _sync_grads(self.extra_params)
        clip = self.cfg.train.grad_clip
        if clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        skipped = False
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips optimizer.step() when the gradients hold inf/NaN
            self.scaler.update()
            # The standard test for that skip: update() lowers the scale after one, and only then.
            skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        if skipped:
            self.balancer.load_state_dict(balancer_before)
            self.skipped_steps += 1
        else:
            self.scheduler.step()
            if self.distill:
                self.objective.enqueue(t_img, t_txt, image_ids)
        self.step += 1
        out = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        out.update({f"weight/{k}": float(v) for k, v in weights.items()})
        out["loss/total"] = float(total.detach())
        out["lr"] = self.scheduler.get_last_lr()[0]
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        if self.scaler is not None:
            out["amp/skipped_steps"] = float(self.skipped_steps)
        return out


def latest_checkpoint(root: Path) -> Path | None:
    """The newest ``checkpoint_*`` folder under ``root`` whose training state loads (None if there is none)."""
    if not root.is_dir():
        return None
    for candidate in sorted(root.glob("checkpoint_*"), reverse=True):
        state = candidate / STATE_FILE
        if not state.is_file():
            continue
        try:
            torch.load(state, map_location="cpu", weights_only=True)
        except Exception:  # a copy cut short: try the previous one
            continue
        return candidate
    return None
