"""The ``open_clip`` teacher: any open_clip model (OpenAI CLIP, LAION, EVA-CLIP, SigLIP ports, ...).

The model comes from ``open_clip.create_model_and_transforms(arch, pretrained=checkpoint)`` and the
tokenizer from ``open_clip.get_tokenizer(arch)``, so preprocessing and tokenisation are open_clip's
own for that model (its evaluation transform, applied to PIL images).

- ``arch``: a model name open_clip knows (``"ViT-B-32"``, ``"EVA02-L-14"``), an open_clip schema name
  (``"hf-hub:org/repo"``, ``"local-dir:/path"``; these carry their weights, so ``checkpoint`` may be
  left out), or a model-config JSON file (registered with ``open_clip.add_model_config``; the file's
  stem is the model name).
- ``checkpoint``: a weights file (``.pt`` / ``.pth`` / ``.bin`` state dict, ``.safetensors``), read
  with ``weights_only=True`` and loaded strictly by open_clip, or a pretrained tag
  (``"laion2b_s34b_b79k"``), which open_clip downloads into its cache on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from raydistill.models.teachers.base import (
    Teacher,
    TeacherLoadError,
    TeacherSpec,
    hash_path,
    looks_like_path,
    probe_dim,
    resolve_device,
    resolve_dtype,
    teacher_fingerprint,
)

_SCHEMAS = ("hf-hub:", "local-dir:")


def _model_name(arch: str) -> str:
    """The open_clip model name for ``arch``, registering a model-config JSON file if given one."""
    import open_clip

    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise TeacherLoadError(f"teacher.arch: model-config file {path} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if not arch.startswith(_SCHEMAS) and arch not in open_clip.list_models():
        raise TeacherLoadError(
            f"teacher.arch: open_clip has no model {arch!r}; give one of open_clip.list_models(), "
            "an 'hf-hub:' / 'local-dir:' name, or a model-config JSON file"
        )
    return arch


def _weights(name: str, checkpoint: str | None) -> tuple[str | None, str]:
    """``(pretrained argument, weights identity)`` for the fingerprint."""
    import open_clip

    if checkpoint is None:
        if not name.startswith(_SCHEMAS):
            raise TeacherLoadError(f"teacher.checkpoint is required for open_clip model {name!r} "
                                   "(a weights file or a pretrained tag)")
        return None, f"open_clip:{name}"
    if looks_like_path(checkpoint):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise TeacherLoadError(f"teacher.checkpoint: open_clip weights file {path} does not exist")
        return str(path), hash_path(path)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if checkpoint not in tags:
        raise TeacherLoadError(
            f"teacher.checkpoint: {checkpoint!r} is neither an existing file nor a pretrained tag of "
            f"{name!r} (its tags: {tags})"
        )
    return checkpoint, f"open_clip:{name}:{checkpoint}"


def _side_of(preprocess: Any) -> int:
    """Side of the square tensor open_clip's transform makes (one tiny probe image)."""
    return int(preprocess(Image.new("RGB", (8, 8))).shape[-1])


def load_open_clip_teacher(spec: TeacherSpec) -> Teacher:
    """Load an open_clip model with its evaluation transform and tokenizer.

    Args:
        spec: An ``open_clip`` spec: ``arch``, ``checkpoint``, ``dtype``, ``device``, ``batch_size``.

    Returns:
        The teacher; ``dim`` is measured by embedding one image and one caption.

    Raises:
        TeacherLoadError: an unknown model, a missing file or tag, or weights that do not fit the
            model (open_clip's strict load), naming the file.
    """
    import open_clip

    name = _model_name(str(spec.arch))
    pretrained, identity = _weights(name, spec.checkpoint)
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    # open_clip fails in many ways on a bad file (an unpickling error, a strict-load RuntimeError, an
    # assert on a position table's width); all of them become one error naming the file and model.
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except Exception as error:
        raise TeacherLoadError(
            f"teacher.checkpoint: open_clip cannot load {pretrained or name} into model {name!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as error:
        raise TeacherLoadError(f"teacher.arch: open_clip has no tokenizer for {name!r}: {error}") from error
    model.to(device=device, dtype=dtype).eval()
    image_size = _side_of(preprocess)

    def encode_images(images: np.ndarray) -> torch.Tensor:
        pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images])
        return model.encode_image(pixels.to(device=device, dtype=dtype))

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    dim = probe_dim(encode_images, encode_texts, image_size, pretrained or name)
    model_cfg = open_clip.get_model_config(name) if not name.startswith(_SCHEMAS) else None
    fingerprint = teacher_fingerprint(
        "open_clip",
        {"model": name, "model_cfg": model_cfg, "preprocess": repr(preprocess), "dtype": spec.dtype},
        [identity],
    )
    return Teacher(
        kind="open_clip", dim=dim, image_size=image_size, fingerprint=fingerprint, batch_size=spec.batch_size,
        device=device, dtype=dtype, encode_images=encode_images, encode_texts=encode_texts, model=model,
    )
