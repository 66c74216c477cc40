"""Models: the student dual encoder and its presets, tokenizers, image preprocessing.

Teacher adapters live in ``raydistill.models.teachers``.
"""

from raydistill.models.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess_images
from raydistill.models.student import (
    PRESETS,
    DualEncoder,
    StudentConfig,
    WeightsReport,
    build_student,
    get_preset,
    load_dual_encoder,
    load_text_weights,
    load_vision_weights,
    preset_names,
    read_saved_config,
    save_dual_encoder,
)
from raydistill.models.tokenizers import (
    build_wordpiece_tokenizer,
    encode_texts,
    load_tokenizer,
    tokenizer_from_vocab,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "DualEncoder",
    "StudentConfig",
    "WeightsReport",
    "build_student",
    "build_wordpiece_tokenizer",
    "encode_texts",
    "get_preset",
    "load_dual_encoder",
    "load_text_weights",
    "load_tokenizer",
    "load_vision_weights",
    "preprocess_images",
    "preset_names",
    "read_saved_config",
    "save_dual_encoder",
    "tokenizer_from_vocab",
]
