"""Teacher adapters behind one interface: ``load_teacher(spec)`` -> ``Teacher``.

    teacher = load_teacher({"kind": "beit3", "size": "base",
                            "checkpoint": "beit3_base_patch16_384_f30k_retrieval.pth",
                            "tokenizer": "beit3.spm", "dtype": "bfloat16", "device": "auto"})
    teacher.embed_images(images_uint8_nhwc)    # float32 [N, teacher.dim], rows of unit norm
    teacher.embed_texts(["a dog on a beach"])  # float32 [1, teacher.dim]

Kinds (``TEACHER_KINDS``): ``beit3`` (the method's teacher, official retrieval checkpoints),
``hf_clip`` (transformers CLIP / SigLIP and alike), ``open_clip`` and ``raydistill`` (a dual encoder
trained by this project). Each adapter module is imported only when its kind is loaded, so a
missing optional library affects only its own kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from raydistill.models.teachers.base import (
    DTYPES,
    TEACHER_KINDS,
    Teacher,
    TeacherLoadError,
    TeacherSpec,
    teacher_fingerprint,
)

_LOADERS: dict[str, tuple[str, str]] = {
    "beit3": ("raydistill.models.teachers.beit3", "load_beit3_teacher"),
    "hf_clip": ("raydistill.models.teachers.hf_clip", "load_hf_clip_teacher"),
    "open_clip": ("raydistill.models.teachers.open_clip", "load_open_clip_teacher"),
    "raydistill": ("raydistill.models.teachers.raydistill_teacher", "load_raydistill_teacher"),
}


def load_teacher(spec: TeacherSpec | Mapping[str, Any]) -> Teacher:
    """Load a frozen teacher from its spec.

    Args:
        spec: A ``TeacherSpec`` or a mapping with its keys (``kind``, ``checkpoint``, ``tokenizer``,
            ``size``, ``arch``, ``dtype``, ``device``, ``batch_size``, ``max_len``).

    Returns:
        A ``Teacher`` with ``embed_images``, ``embed_texts``, ``dim``, ``image_size``, ``kind`` and
        ``fingerprint``.

    Raises:
        ValueError: an invalid spec (the message names the key and the allowed values).
        TeacherLoadError: (a ValueError) files that are missing or do not fit the kind.
    """
    if not isinstance(spec, TeacherSpec):
        spec = TeacherSpec.from_mapping(spec)
    module, function = _LOADERS[spec.kind]
    loader: Callable[[TeacherSpec], Teacher] = getattr(importlib.import_module(module), function)
    return loader(spec)


__all__ = [
    "DTYPES",
    "TEACHER_KINDS",
    "Teacher",
    "TeacherLoadError",
    "TeacherSpec",
    "load_teacher",
    "teacher_fingerprint",
]
