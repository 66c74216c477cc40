"""The ``hf_clip`` teacher: a Hugging Face dual encoder (CLIP, SigLIP, and any model alike).

Any transformers model with ``get_image_features`` / ``get_text_features`` works (``CLIPModel``,
``SiglipModel``, ``Siglip2Model``, ...): it is loaded with ``AutoModel.from_pretrained`` from a local
directory (``save_pretrained`` output) or a hub name, with the image processor and tokenizer saved
beside it (``AutoImageProcessor`` / ``AutoTokenizer``; ``tokenizer`` in the spec points elsewhere when
needed). Preprocessing is therefore the model's own.

Texts are padded to a fixed length (``max_len``, default the tokenizer's ``model_max_length``, or the
text tower's position count when the tokenizer sets none): SigLIP was trained on texts padded to 64
tokens and pools the last position, so fixed-length padding is what its authors prescribe, and for
CLIP (which pools at the end-of-text token under an attention mask) it changes nothing. Whatever the
tokenizer returns among ``input_ids`` / ``attention_mask`` is passed on, as in the models' documented
usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydistill.models.teachers.base import (
    Teacher,
    TeacherLoadError,
    TeacherSpec,
    hash_path,
    looks_like_path,
    probe_dim,
    resolve_device,
    resolve_dtype,
    square_side,
    teacher_fingerprint,
)

_TEXT_INPUTS = ("input_ids", "attention_mask")
# transformers' "no limit" sentinel for model_max_length is a huge int.
_NO_LIMIT = 1_000_000


def _source(value: str, key: str) -> tuple[str, bool]:
    """``(value, is_local)``; a value that looks like a path must exist."""
    if looks_like_path(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise TeacherLoadError(f"teacher.{key}: {path} does not exist")
        return str(path), True
    return value, False


def _features(output: Any) -> torch.Tensor:
    """transformers 4 returns a tensor, transformers 5 an output whose ``pooler_output`` it is."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _text_length(tokenizer: Any, config: Any, requested: int | None) -> int:
    if requested is not None:
        return requested
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        return limit
    positions = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    if isinstance(positions, int):
        return positions
    raise TeacherLoadError("teacher.max_len: the tokenizer and model give no text length; set teacher.max_len")


def _check_loading(loading: Mapping[str, Any], source: str) -> None:
    """Refuse weights that left parameters missing or of the wrong shape.

    transformers 5 re-initialises such parameters at random with only a printed report; a teacher
    with random layers would silently produce useless embeddings.
    """
    missing = list(loading.get("missing_keys") or [])
    mismatched = [
        f"{key}: checkpoint {tuple(a)} vs model {tuple(b)}" for key, a, b in loading.get("mismatched_keys") or []
    ]
    problems = [f"{len(items)} {label}: {items[:8]}" for label, items in
                (("missing keys", missing), ("shape mismatches", mismatched)) if items]
    if problems:
        raise TeacherLoadError(
            f"teacher.checkpoint: the weights in {source} do not fit the model its config.json describes; "
            + "; ".join(problems)
        )


def _check_tokenizer(tokenizer: Any, source: str, key: str) -> None:
    """Refuse a tokenizer that knows no words.

    From transformers 5 on, ``AutoTokenizer`` on a directory without tokenizer files silently builds
    an empty tokenizer of the model's class, which would turn every caption into ``<unk>``.
    """
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise TeacherLoadError(
            f"teacher.{key}: the tokenizer loaded from {source} knows no words (a vocabulary of {len(tokenizer)} "
            "tokens); does the directory hold the tokenizer files (tokenizer.json, vocab.json, spiece.model, ...)?"
        )


_PROBE_TEXT = "a photo of a dog"


def _image_side(config: Any, image_processor: Any, source: str) -> int:
    """The square input side: the vision config's ``image_size``, else the processor's output size."""
    size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if size is None:
        # crop_size / size are dicts in transformers 4 and SizeDict objects in 5.
        box = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
        field = (lambda key: box.get(key)) if isinstance(box, Mapping) else (lambda key: getattr(box, key, None))
        size = (field("height"), field("width")) if field("height") else field("shortest_edge")
    return square_side(size, source)


def _identity(source: str, is_local: bool, revision: str | None) -> str:
    """A content hash for local files, the hub name and revision for remote ones."""
    return hash_path(source) if is_local else f"hub:{source}@{revision or 'unknown-revision'}"


def load_hf_clip_teacher(spec: TeacherSpec) -> Teacher:
    """Load a Hugging Face CLIP / SigLIP-style dual encoder with its processor and tokenizer.

    Args:
        spec: An ``hf_clip`` spec: ``checkpoint`` (directory or hub name), optional ``tokenizer``
            (directory or hub name), ``max_len``, ``dtype``, ``device``, ``batch_size``.

    Returns:
        The teacher; ``dim`` is measured by embedding one image and one caption.

    Raises:
        TeacherLoadError: a missing path, files transformers cannot load, or a model without
            ``get_image_features`` / ``get_text_features``.
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    source, is_local = _source(str(spec.checkpoint), "checkpoint")
    token_key = "tokenizer" if spec.tokenizer else "checkpoint"
    token_source, token_local = _source(str(spec.tokenizer), "tokenizer") if spec.tokenizer else (source, is_local)
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    # Any failure inside transformers' loaders (bad JSON, a truncated safetensors file, an unknown
    # model type) is re-raised as one error that names the source.
    try:
        # Mismatched shapes are let through here only to be reported, key by key, by _check_loading.
        model, loading = AutoModel.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as error:
        raise TeacherLoadError(
            f"teacher.checkpoint: cannot load a transformers model from {source}: {error}"
        ) from error
    _check_loading(loading, source)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise TeacherLoadError(
            f"teacher.checkpoint: {source} holds a {type(model).__name__}, which is not an image-text dual "
            "encoder (no get_image_features / get_text_features)"
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(source)
    except Exception as error:
        raise TeacherLoadError(
            f"teacher.checkpoint: no image processor can be loaded from {source}: {error}"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(token_source)
    except Exception as error:
        raise TeacherLoadError(
            f"teacher.{token_key}: no tokenizer can be loaded from {token_source}: {error}"
        ) from error
    _check_tokenizer(tokenizer, token_source, token_key)

    max_len = _text_length(tokenizer, model.config, spec.max_len)
    image_size = _image_side(model.config, image_processor, source)
    model.to(device=device, dtype=dtype).eval()

    def encode_images(images: np.ndarray) -> torch.Tensor:
        pixels = image_processor(images=list(images), return_tensors="pt",
                                 input_data_format="channels_last")["pixel_values"]
        return _features(model.get_image_features(pixel_values=pixels.to(device=device, dtype=dtype)))

    def encode_texts(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        inputs = {name: tokens[name].to(device) for name in _TEXT_INPUTS if name in tokens}
        return _features(model.get_text_features(**inputs))

    dim = probe_dim(encode_images, encode_texts, image_size, source)
    fingerprint = teacher_fingerprint(
        "hf_clip",
        {"model": type(model).__name__, "image_processor": type(image_processor).__name__,
         "tokenizer": type(tokenizer).__name__, "max_len": max_len, "dtype": spec.dtype},
        [_identity(source, is_local, getattr(model.config, "_commit_hash", None))]
        + ([_identity(token_source, token_local, None)] if spec.tokenizer else []),
    )
    return Teacher(
        kind="hf_clip", dim=dim, image_size=image_size, fingerprint=fingerprint, batch_size=spec.batch_size,
        device=device, dtype=dtype, encode_images=encode_images, encode_texts=encode_texts, max_len=max_len,
        model=model,
    )
