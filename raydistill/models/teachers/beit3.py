"""The ``beit3`` teacher: an official BEiT-3 retrieval checkpoint behind the ``Teacher`` interface.

Weights are the files unilm publishes (a torch file holding ``{"model": state_dict}``): the
fine-tuned ``beit3_{base,large}_patch16_384_{coco,f30k}_retrieval.pth`` or the image-text
contrastive ``beit3_{base,large}_itc_patch16_224.pth``. They are read with ``weights_only=True`` and
must match the architecture key for key (missing, unexpected and mis-shaped keys are reported with
the file's name). The input resolution is read from the checkpoint's image position table unless
``arch.img_size`` says otherwise.

Preprocessing is the official evaluation transform (unilm ``beit3/datasets.py``, ``build_transform``
with ``is_train=False``): resize to ``img_size`` x ``img_size`` with PIL's bicubic filter, scale to
[0, 1], normalise with mean = std = 0.5. Texts are tokenised by ``XLMRTokenizer`` into
``<s> tokens </s>`` padded to ``max_len`` (default 64, the official ``num_max_bpe_tokens``).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import asdict
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
    require_file,
    resolve_device,
    resolve_dtype,
    teacher_fingerprint,
)
from raydistill.models.teachers.beit3_arch import (
    POSITION_OFFSET,
    BEiT3Config,
    BEiT3Retrieval,
    make_config,
)
from raydistill.models.teachers.xlmr_tokenizer import XLMRTokenizer

DEFAULT_MAX_LEN = 64
IMAGE_MEAN = IMAGE_STD = 0.5
VISION_POSITIONS_KEY = "beit3.encoder.embed_positions.A.weight"
_LISTED_KEYS = 8  # keys quoted per category in a mismatch report


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a BEiT-3 checkpoint: ``{"model": sd}`` (or ``{"module": sd}``, or a bare state dict).

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``.

    Raises:
        TeacherLoadError: the file cannot be read, or holds no tensor state dict.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise TeacherLoadError(
            f"teacher.checkpoint: {path} cannot be read as a torch checkpoint ({type(error).__name__}: {error})"
        ) from error
    if isinstance(raw, Mapping):
        for key in ("model", "module"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        top = sorted(raw)[:_LISTED_KEYS] if isinstance(raw, Mapping) else type(raw).__name__
        raise TeacherLoadError(
            f"teacher.checkpoint: {path} holds no BEiT-3 state dict (expected {{'model': state_dict}}; "
            f"found {top})"
        )
    return dict(raw)


def infer_img_size(state: Mapping[str, torch.Tensor], patch_size: int) -> int | None:
    """Input side implied by the image position table (``num_patches + 3`` rows), or None."""
    table = state.get(VISION_POSITIONS_KEY)
    if table is None or table.ndim != 2:
        return None
    side = math.isqrt(max(table.shape[0] - 1 - POSITION_OFFSET, 0))
    if side < 1 or side * side != table.shape[0] - 1 - POSITION_OFFSET:
        return None
    return side * patch_size


def describe_checkpoint(state: Mapping[str, torch.Tensor]) -> str:
    """A short guess at a checkpoint's architecture, to make a mismatch report actionable."""
    text_embed = state.get("beit3.text_embed.weight")
    if text_embed is None or text_embed.ndim != 2:
        return "it does not look like a BEiT-3 retrieval checkpoint (no beit3.text_embed.weight)"
    layers = {int(k.split(".")[3]) for k in state if k.startswith("beit3.encoder.layers.")}
    parts = [f"encoder_embed_dim={text_embed.shape[1]}", f"encoder_layers={len(layers)}",
             f"vocab_size={text_embed.shape[0]}"]
    img_size = infer_img_size(state, 16)
    if img_size:
        parts.append(f"img_size={img_size} if patch_size=16")
    return "the checkpoint looks like " + ", ".join(parts)


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` requiring identical keys and shapes.

    Raises:
        TeacherLoadError: listing missing, unexpected and mis-shaped keys and naming ``path``.
    """
    expected = model.state_dict()
    # Listed in state-dict order, so the embeddings (which tell the width) come first.
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - _LISTED_KEYS} more)" if len(items) > _LISTED_KEYS else ""
            problems.append(f"{len(items)} {label}: {items[:_LISTED_KEYS]}{more}")
    if problems:
        raise TeacherLoadError(
            f"teacher.checkpoint: {path} does not match the BEiT-3 architecture {model.config}; "
            + "; ".join(problems) + f"; {describe_checkpoint(state)}"
        )
    model.load_state_dict(state, strict=True)


def resolve_config(spec: TeacherSpec, state: Mapping[str, torch.Tensor]) -> BEiT3Config:
    """The architecture from ``size`` / ``arch``, with the resolution read from the checkpoint."""
    overrides = dict(spec.arch or {})
    config = make_config(spec.size, overrides)
    if "img_size" not in overrides:
        inferred = infer_img_size(state, config.patch_size)
        if inferred is not None:
            config = make_config(spec.size, {**overrides, "img_size": inferred})
    return config


def preprocess(images: np.ndarray, img_size: int) -> torch.Tensor:
    """The official evaluation transform on uint8 ``[N, H, W, 3]`` -> float ``[N, 3, S, S]``.

    torchvision's ``Resize((S, S), interpolation=BICUBIC)`` on a PIL image is PIL's own bicubic
    resize, which is what is called here; an image already S x S is left as it is.
    """
    resized = np.stack([
        np.asarray(Image.fromarray(image).resize((img_size, img_size), Image.Resampling.BICUBIC))
        for image in images
    ])
    pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float().div(255.0)
    return (pixels - IMAGE_MEAN) / IMAGE_STD


def load_beit3_teacher(spec: TeacherSpec) -> Teacher:
    """Load an official BEiT-3 retrieval checkpoint and its SentencePiece tokenizer.

    Args:
        spec: A ``beit3`` spec: ``checkpoint``, ``tokenizer`` (``beit3.spm``), ``size`` and/or
            ``arch``, optional ``max_len``, ``dtype``, ``device``, ``batch_size``.

    Returns:
        The teacher; ``dim`` is ``encoder_embed_dim`` (768 base, 1024 large).

    Raises:
        TeacherLoadError: a missing or unreadable file, a checkpoint of another architecture, or
            a tokenizer whose ids do not fit the model's vocabulary.
        ValueError: an invalid size, arch field or max_len.
    """
    checkpoint = require_file(spec.checkpoint, "checkpoint", "BEiT-3 checkpoint")
    spm_path = require_file(spec.tokenizer, "tokenizer", "SentencePiece model (beit3.spm)")
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    try:
        tokenizer = XLMRTokenizer(spm_path)
    except ValueError as error:
        raise TeacherLoadError(f"teacher.tokenizer: {error}") from error

    state = read_state_dict(checkpoint)
    config = resolve_config(spec, state)
    model = BEiT3Retrieval(config)
    load_strict(model, state, checkpoint)
    del state
    if tokenizer.vocab_size > config.vocab_size:
        raise TeacherLoadError(
            f"teacher.tokenizer: {spm_path} produces ids up to {tokenizer.vocab_size - 1} but the checkpoint "
            f"{checkpoint} has only {config.vocab_size} text embeddings; is it the right beit3.spm?"
        )
    max_len = DEFAULT_MAX_LEN if spec.max_len is None else spec.max_len
    if max_len > config.max_text_len:
        raise ValueError(f"teacher.max_len: {max_len} exceeds the {config.max_text_len} text positions "
                         f"the model has")
    model.to(device=device, dtype=dtype).eval()

    def encode_images(images: np.ndarray) -> torch.Tensor:
        pixels = preprocess(images, config.img_size).to(device=device, dtype=dtype)
        return model.encode_image(pixels)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        ids, padding = tokenizer.encode(texts, max_len)
        return model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(padding).to(device))

    fingerprint = teacher_fingerprint(
        "beit3",
        {"arch": asdict(config), "max_len": max_len, "dtype": spec.dtype,
         "preprocess": f"pil-bicubic-{config.img_size}/mean0.5-std0.5"},
        [hash_path(checkpoint), hash_path(spm_path)],
    )
    return Teacher(
        kind="beit3", dim=config.encoder_embed_dim, image_size=config.img_size, fingerprint=fingerprint,
        batch_size=spec.batch_size, device=device, dtype=dtype, encode_images=encode_images,
        encode_texts=encode_texts, max_len=max_len, model=model,
    )

