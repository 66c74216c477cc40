"""Turn a training checkpoint into a standalone student (safetensors + JSON config + tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from raydistill.config import Config
from raydistill.pipeline.trainer import HISTORY_FILE, STATE_FILE


def build_student_for(cfg: Config, embed_dim: int, vocab_size: int):
    """The run's student architecture, randomly initialised (weights come from a checkpoint)."""
    from raydistill.models.student import build_student, student_overrides

    # The same overrides as the training workers (pooling resolved): the exported network is the trained one.
    return build_student(cfg.student.preset, embed_dim=embed_dim, vocab_size=vocab_size,
                         **student_overrides(cfg.student.model_dump()))


def export_student(checkpoint_dir: Path, cfg: Config, embed_dim: int, tokenizer: Any, out_dir: Path,
                   extra: dict[str, Any] | None = None) -> tuple[Any, list[dict[str, float]]]:
    """Load the student from a Train checkpoint folder and save it with ``save_dual_encoder``.

    Returns:
        The loaded student (eval mode, CPU) and the training history stored with the checkpoint.
    """
    from raydistill.models.student import save_dual_encoder

    state = torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=True)
    model = build_student_for(cfg, embed_dim, len(tokenizer))
    model.load_state_dict(state["model"])
    model.eval()
    save_dual_encoder(model, out_dir, tokenizer=tokenizer, extra={**(extra or {}), "step": int(state["step"])})
    history_path = checkpoint_dir / HISTORY_FILE
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    return model, history
