"""The ``raydistill`` teacher: a dual encoder this project trained (the demo's fitted teacher).

The checkpoint is whatever ``raydistill.models.student.load_dual_encoder`` reads; the model brings its
own preprocessing (``preprocess_images``) and tokenizer, and texts are encoded to the model's
``config.max_len`` with ``raydistill.models.tokenizers.encode_texts``. Both modules are imported
when a teacher of this kind is loaded, so the other kinds do not depend on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raydistill.models.teachers.base import (
    Teacher,
    TeacherLoadError,
    TeacherSpec,
    hash_path,
    resolve_device,
    resolve_dtype,
    teacher_fingerprint,
)


def load_raydistill_teacher(spec: TeacherSpec) -> Teacher:
    """Load a raydistill dual encoder as a frozen teacher.

    Args:
        spec: A ``raydistill`` spec: ``checkpoint``, ``dtype``, ``device``, ``batch_size``.

    Returns:
        The teacher; ``dim`` is the model's ``config.embed_dim``.

    Raises:
        TeacherLoadError: the checkpoint is missing or ``load_dual_encoder`` refuses it.
    """
    from raydistill.models.student import load_dual_encoder
    from raydistill.models.tokenizers import encode_texts as tokenize

    checkpoint = Path(str(spec.checkpoint)).expanduser()
    if not checkpoint.exists():
        raise TeacherLoadError(f"teacher.checkpoint: raydistill checkpoint {checkpoint} does not exist")
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    try:
        model, tokenizer, _ = load_dual_encoder(checkpoint, device=str(device))
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        raise TeacherLoadError(f"teacher.checkpoint: cannot load a raydistill dual encoder from {checkpoint}: "
                               f"{error}") from error
    if tokenizer is None:
        raise TeacherLoadError(f"teacher.checkpoint: {checkpoint} was saved without its tokenizer "
                               "(no tokenizer/ folder); a teacher must embed captions")
    model.to(device=device, dtype=dtype).eval()
    max_len = int(model.config.max_len)
    image_size = int(model.preprocess_images(np.zeros((1, 8, 8, 3), dtype=np.uint8)).shape[-1])

    def encode_images(images: np.ndarray) -> torch.Tensor:
        pixels = torch.as_tensor(model.preprocess_images(images))
        return model.encode_image(pixels.to(device=device, dtype=dtype))

    def encode_texts(texts: list[str]) -> torch.Tensor:
        ids, mask = tokenize(tokenizer, texts, max_len)
        return model.encode_text(torch.as_tensor(ids).to(device), torch.as_tensor(mask).to(device))

    fingerprint = teacher_fingerprint(
        "raydistill", {"max_len": max_len, "image_size": image_size, "dtype": spec.dtype}, [hash_path(checkpoint)]
    )
    return Teacher(
        kind="raydistill", dim=int(model.config.embed_dim), image_size=image_size, fingerprint=fingerprint,
        batch_size=spec.batch_size, device=device, dtype=dtype, encode_images=encode_images,
        encode_texts=encode_texts, max_len=max_len, model=model,
    )
