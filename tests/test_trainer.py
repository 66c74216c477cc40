"""The Trainer's step and checkpoint state, without Ray: fp16 steps the gradient scaler skips, AdamW's betas,
and the RNG state a checkpoint carries (CUDA's included where there is CUDA)."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e2e_helpers import assert_same_state
from raydistill.config import config_from_dict
from raydistill.pipeline import trainer as trainer_module
from raydistill.pipeline.trainer import STATE_FILE, Trainer

DIM, VOCAB, BATCH = 16, 60, 8


def _trainer(**train: Any) -> Trainer:
    cfg = config_from_dict({"student": {"preset": "test"}, "distill": {"queue_size": 16},
                            "train": {"batch_size": BATCH, **train}})
    return Trainer(cfg, embed_dim=DIM, vocab_size=VOCAB, planned_steps=10,
                   device=torch.device("cpu"))


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """A caption-level batch as the workers get it: uint8 images, tokens, image keys, teacher embeddings."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (BATCH, 12), generator=g)
    return {
        "pixels": torch.randint(0, 256, (BATCH, 64, 64, 3), generator=g, dtype=torch.uint8),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "image_key": torch.arange(BATCH) // 2 + 100 * seed,  # two captions per image
        "t_img": F.normalize(torch.randn(BATCH, DIM, generator=g), dim=-1),
        "t_txt": F.normalize(torch.randn(BATCH, DIM, generator=g), dim=-1),
    }


def _snapshot(trainer: Trainer) -> dict[str, Any]:
    """Everything a skipped step must leave as it was."""
    return copy.deepcopy({
        "model": trainer.raw_model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "objective": trainer.objective.state_dict(),  # the teacher-embedding queues and their pointers
        "balancer": trainer.balancer.state_dict(),
    })


def test_adam_beta2_comes_from_the_config() -> None:
    assert _trainer().optimizer.defaults["betas"] == (0.9, 0.999)  # the default: AdamW's own
    assert all(group["betas"] == (0.9, 0.98) for group in _trainer(adam_beta2=0.98).optimizer.param_groups)


def test_an_fp16_step_the_scaler_skips_moves_nothing_but_the_batch_count() -> None:
    torch.manual_seed(0)
    trainer = _trainer(amp="fp16", warmup_fraction=0.5)  # warm-up: every scheduler step changes the rate
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler.is_enabled()  # on CPU too
    # GradScaler's first scale (2^16) overflows this student's fp16 gradients; the skips that follow are
    # forced below, so start from a scale that fits.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    first = trainer.train_step(_batch(0))
    assert first["amp/skipped_steps"] == 0 and trainer.skipped_steps == 0
    assert trainer.scheduler.last_epoch == 1 and trainer.balancer.step == 1

    # Gradients that overflow fp16: the scaler finds inf/NaN and skips optimizer.step().
    before, scale, lr = _snapshot(trainer), trainer.scaler.get_scale(), trainer.optimizer.param_groups[0]["lr"]
    weight = trainer.raw_model.text_proj.weight
    hook = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    skipped = trainer.train_step(_batch(1))
    hook.remove()
    assert trainer.scaler.get_scale() == scale / 2  # the scaler backed off, the sign of a skipped step
    assert skipped["amp/skipped_steps"] == 1 and trainer.skipped_steps == 1
    assert trainer.step == 2  # the batch was consumed: the position in the data moves on
    assert_same_state(_snapshot(trainer), before, "state")  # model, AdamW, schedule, queues, balancer
    assert trainer.optimizer.param_groups[0]["lr"] == lr and skipped["lr"] == first["lr"]

    # The next good step carries on from where the last good one left off.
    good = trainer.train_step(_batch(2))
    assert good["amp/skipped_steps"] == 1 and trainer.step == 3
    assert trainer.scheduler.last_epoch == 2 and trainer.balancer.step == 2
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 2  # two AdamW updates
    assert not torch.equal(trainer.raw_model.text_proj.weight, before["model"]["text_proj.weight"])
    assert trainer.state_dict()["skipped_steps"] == 1


def test_without_fp16_there_is_no_scaler_and_no_skip_count() -> None:
    trainer = _trainer()
    out = trainer.train_step(_batch(0))
    assert trainer.scaler is None and "amp/skipped_steps" not in out
    assert trainer.scheduler.last_epoch == 1


def test_checkpoints_carry_the_cuda_rng_state_only_where_there_is_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = _trainer()
    trainer.save(tmp_path / "cpu")
    state = torch.load(tmp_path / "cpu" / STATE_FILE, weights_only=True)
    assert "cuda" not in state["rng"] and state["skipped_steps"] == 0

    # Where CUDA is available: every visible GPU's generator state is saved (two GPUs, simulated here).
    gpu_states = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in gpu_states])
    trainer.save(tmp_path / "gpu")
    saved = torch.load(tmp_path / "gpu" / STATE_FILE, weights_only=True)["rng"]["cuda"]
    assert len(saved) == 2 and all(torch.equal(a, b) for a, b in zip(saved, gpu_states))

    # Restoring on a process that sees one GPU sets that one; a state without the key sets none.
    restored: list[tuple[torch.Tensor, int]] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    trainer.restore(tmp_path / "gpu")
    assert len(restored) == 1 and torch.equal(restored[0][0], gpu_states[0]) and restored[0][1] == 0
    trainer.restore(tmp_path / "cpu")
    assert len(restored) == 1


def test_restoring_the_rng_state_continues_every_generator() -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = trainer_module._rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(4)  # move every generator on
    trainer_module._set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]
