"""Models: the student dual encoder (``student``), its architecture and presets (``architecture``), its pretrained
towers (``towers``), tokenizers, image preprocessing.

Teacher adapters live in ``raydistill.models.teachers``.

The names below are imported on first use (PEP 562): a Ray Data task that only tokenises captions imports
``raydistill.models.tokenizers`` without paying for importing the student's timm and torch in every worker
process.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "raydistill.models.preprocess": ("CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "preprocess_images"),
    "raydistill.models.architecture": ("PRESETS", "DualEncoderConfig", "StudentConfig", "get_preset", "preset_names"),
    "raydistill.models.student": ("DualEncoder", "build_student", "load_dual_encoder", "read_saved_config",
                                  "save_dual_encoder"),
    "raydistill.models.towers": ("WeightsReport", "load_text_weights", "load_vision_weights"),
    "raydistill.models.tokenizers": ("build_wordpiece_tokenizer", "encode_texts", "load_tokenizer",
                                     "tokenizer_from_vocab"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'raydistill.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
