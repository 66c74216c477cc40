"""The student dual encoder: building it, save and load (its config and presets: ``architecture.py``;
its pretrained towers: ``towers.py``).

A ``DualEncoder`` is a timm ViT image tower (CLS token) and a transformers encoder text tower (BERT
pooler output, the CLS hidden state, or the mean of the token states), each followed by a linear
head to the teacher's embedding size ``d``; both outputs are L2-normalised (the method's "Student").
The towers start from random weights or from pretrained ones: a timm checkpoint file or timm
pretrained name for the image tower, a Hugging Face folder or hub name for the text tower (hub names
come from the local Hugging Face cache when there is no network). The text pooling follows the text
weights: BERT's pooler with pretrained weights (the reference), the CLS hidden state without
(``resolve_text_pooling``). The same class also serves as the CLIP-architecture teacher that the
embedded demo fits, and any bigger dual encoder this project trains: the teacher adapter
``raydistill`` reads what ``save_dual_encoder`` writes.

Saved format (a directory, written atomically)::

    config.json        {"format": "raydistill.dual_encoder", "version": 1,
                        "student": DualEncoderConfig.to_dict(), "extra": {...}}
    model.safetensors  the state dict (safetensors)
    tokenizer/         the tokenizer's save_pretrained() output, when one was given

Typical use::

    model = build_student("small", embed_dim=768, vocab_size=tokenizer.vocab_size,
                          vision_weights="vit_small_patch16_224.augreg_in21k",
                          text_weights="google/bert_uncased_L-4_H-512_A-8")
    img = model.encode_image(model.preprocess_images(uint8_images))
    save_dual_encoder(model, "out/student", tokenizer=tokenizer, extra={"step": 1000})
    model, tokenizer, extra = load_dual_encoder("out/student")
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModel

from raydistill.models.preprocess import preprocess_images
from raydistill.models.tokenizers import load_tokenizer
# Re-exported: the student module is where callers have always found these.
from raydistill.models.architecture import (  # noqa: F401
    AUTO_POOLING,
    PRESETS,
    TEXT_POOLINGS,
    DualEncoderConfig,
    StudentConfig,
    get_preset,
    preset_names,
    resolve_text_pooling,
    student_overrides,
)
from raydistill.models.towers import WeightsReport, load_text_weights, load_vision_weights  # noqa: F401
from raydistill.paths import publish_dir

FORMAT_NAME = "raydistill.dual_encoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"

def _build_vision_tower(config: DualEncoderConfig) -> nn.Module:
    kwargs = {"img_size": config.image_size, **config.vision_kwargs}
    try:
        return timm.create_model(
            config.vision, pretrained=False, num_classes=0, global_pool="token", **kwargs
        )
    except RuntimeError as error:  # timm's "Unknown model (...)"
        raise ValueError(f"student.vision {config.vision!r} is not a timm model: {error}") from error
    except TypeError as error:
        raise ValueError(
            f"student.vision_kwargs {config.vision_kwargs} do not fit timm model {config.vision!r}: {error}"
        ) from error


def _build_text_tower(config: DualEncoderConfig) -> nn.Module:
    spec = dict(config.text)
    model_type = spec.pop("model_type")
    spec.pop("vocab_size", None)  # equal to config.vocab_size (validated); passed below
    try:
        hf_config = AutoConfig.for_model(model_type, **spec, vocab_size=config.vocab_size)
    except ValueError as error:
        raise ValueError(
            f"student.text.model_type {model_type!r} is not a transformers model type"
        ) from error
    model = AutoModel.from_config(hf_config)
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is not None and positions < config.max_len:
        raise ValueError(
            f"student.text.max_position_embeddings ({positions}) is smaller than student.max_len "
            f"({config.max_len})"
        )
    if config.text_pooling != "pooler" and getattr(model, "pooler", None) is not None:
        # An unused pooler would hold parameters without gradients, which DDP rejects.
        model.pooler = None
    return model


def _describe(value: Any) -> str:
    """Shape and dtype of a tensor (or the type of anything else) for error messages."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def _init_head(head: nn.Linear) -> nn.Linear:
    # The reference's head initialisation (DSMD.md): Xavier-normal with gain 1.414, zero bias.
    nn.init.xavier_normal_(head.weight, gain=1.414)
    nn.init.zeros_(head.bias)
    return head


class DualEncoder(nn.Module):
    """Image and text towers with linear heads to a shared, L2-normalised embedding space.

    Args:
        config: The architecture; build one from a preset with ``build_student``.

    Attributes:
        config: The ``DualEncoderConfig`` it was built from.
        vision: The timm ViT (no classifier; returns the CLS feature).
        text: The transformers encoder.
        image_proj: ``Linear(vision hidden, embed_dim)``.
        text_proj: ``Linear(text hidden, embed_dim)``.
    """

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        # Both towers start random here (weights are loaded afterwards, by build_student), so "auto"
        # means the CLS state; the resolved value is what save_dual_encoder writes.
        config = dataclasses.replace(config, text_pooling=resolve_text_pooling(config.text_pooling, False))
        self.config = config
        self.vision = _build_vision_tower(config)
        self.text = _build_text_tower(config)
        vision_hidden = getattr(self.vision, "head_hidden_size", self.vision.num_features)
        self.image_proj = _init_head(nn.Linear(vision_hidden, config.embed_dim))
        self.text_proj = _init_head(nn.Linear(self.text.config.hidden_size, config.embed_dim))
        # Encoders without a pooler (e.g. DistilBERT) fall back to the CLS hidden state.
        self.uses_pooler = config.text_pooling == "pooler" and getattr(self.text, "pooler", None) is not None

    @property
    def embed_dim(self) -> int:
        """Dimension of the output embeddings."""
        return self.config.embed_dim

    def _device(self) -> torch.device:
        return self.image_proj.weight.device

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed images.

        Args:
            pixels: float ``[B, 3, S, S]`` with ``S = config.image_size`` (see ``preprocess_images``).

        Returns:
            ``[B, embed_dim]``, unit L2 norm per row.
        """
        size = self.config.image_size
        if (
            not isinstance(pixels, torch.Tensor)
            or not pixels.is_floating_point()
            or pixels.ndim != 4
            or tuple(pixels.shape[1:]) != (3, size, size)
        ):
            raise ValueError(
                f"encode_image expects float pixels [B, 3, {size}, {size}], got {_describe(pixels)}; "
                "turn uint8 images into that with model.preprocess_images"
            )
        features = self.vision(pixels)
        return F.normalize(self.image_proj(features), dim=-1)

    def _token_tensor(self, values: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
        tensor = torch.as_tensor(values, device=self._device()) if isinstance(values, np.ndarray) else values
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.is_floating_point():
            raise ValueError(f"encode_text expects integer {name} [B, L], got {_describe(tensor)}")
        return tensor.long()

    def encode_text(
        self, input_ids: torch.Tensor | np.ndarray, attention_mask: torch.Tensor | np.ndarray
    ) -> torch.Tensor:
        """Embed tokenised texts (see ``raydistill.models.tokenizers.encode_texts``).

        Args:
            input_ids: integer ``[B, L]`` token ids.
            attention_mask: ``[B, L]``, 1 for real tokens, 0 for padding.

        Returns:
            ``[B, embed_dim]``, unit L2 norm per row.
        """
        input_ids = self._token_tensor(input_ids, "input_ids")
        attention_mask = self._token_tensor(attention_mask, "attention_mask")
        if input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask "
                f"{tuple(attention_mask.shape)} differ in shape"
            )
        # An out-of-range id otherwise surfaces as an opaque indexing error deep inside the encoder.
        if input_ids.numel() and int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(
                f"token id {int(input_ids.max())} >= student vocab_size {self.config.vocab_size}: "
                "the tokenizer does not match the model"
            )
        output = self.text(input_ids=input_ids, attention_mask=attention_mask)
        if self.uses_pooler:
            pooled = output.pooler_output
        elif self.config.text_pooling == "mean":
            # Padding positions carry states too: average over the real tokens only.
            weights = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
            pooled = (output.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = output.last_hidden_state[:, 0]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor | np.ndarray,
        attention_mask: torch.Tensor | np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of images and a batch of texts: ``(image_emb, text_emb)``."""
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all, or only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def preprocess_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` RGB images -> float ``[N, 3, S, S]`` with this model's settings."""
        c = self.config
        return preprocess_images(
            images,
            image_size=c.image_size,
            resize_size=c.resize_size,
            mean=c.mean,
            std=c.std,
            interpolation=c.interpolation,
        )


# ---------------------------------------------------------------------------------------------------
# Building


def _resolve_config(preset_or_config: str | DualEncoderConfig | Mapping[str, Any]) -> DualEncoderConfig:
    if isinstance(preset_or_config, DualEncoderConfig):
        return preset_or_config
    if isinstance(preset_or_config, str):
        return get_preset(preset_or_config)
    if isinstance(preset_or_config, Mapping):
        return DualEncoderConfig.from_dict(preset_or_config)
    raise ValueError(
        f"student must be a preset name {preset_names()}, a DualEncoderConfig or a dict, "
        f"got {type(preset_or_config).__name__}"
    )


def build_student(
    preset_or_config: str | DualEncoderConfig | Mapping[str, Any],
    embed_dim: int,
    vocab_size: int,
    *,
    vision_weights: str | Path | None = None,
    text_weights: str | Path | None = None,
    **overrides: Any,
) -> DualEncoder:
    """Build a dual encoder from a preset or config, with pretrained tower weights if given.

    Nothing is downloaded unless a tower's weights are given as a hub name that is not in the local
    Hugging Face cache. ``text_pooling="auto"`` (the presets' value) becomes ``"pooler"`` when
    ``text_weights`` is given and ``"cls"`` when it is not (``resolve_text_pooling``); an explicit
    value is kept. The model's config holds the resolved value, so a saved model reloads identically.

    Args:
        preset_or_config: A preset name (see ``preset_names()``), a ``DualEncoderConfig`` or its dict.
        embed_dim: Output dimension: the teacher's embedding size.
        vocab_size: The tokenizer's vocabulary size.
        vision_weights: Optional image-tower weights: a timm checkpoint file or a timm pretrained
            name such as ``"vit_base_patch16_224.augreg_in21k"`` (``load_vision_weights``).
        text_weights: Optional text-tower weights: a Hugging Face model directory or a hub name such
            as ``"bert-base-uncased"`` (``load_text_weights``).
        **overrides: Any other ``DualEncoderConfig`` field, e.g. ``image_size=384`` or ``text_pooling="cls"``.

    Returns:
        The model, randomly initialised apart from the given tower weights, in training mode.

    Raises:
        FileNotFoundError: a weights path that does not exist (and is not a hub name).
        ValueError: unknown preset or field, invalid value, weights that do not fit, or a hub name
            that cannot be loaded (the message says what to set).
    """
    config = _resolve_config(preset_or_config)
    allowed = [f.name for f in dataclasses.fields(DualEncoderConfig)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown student setting(s) {unknown}; allowed: {allowed}")
    config = dataclasses.replace(config, embed_dim=embed_dim, vocab_size=vocab_size, **overrides)
    pooling = resolve_text_pooling(config.text_pooling, pretrained_text=text_weights is not None)
    model = DualEncoder(dataclasses.replace(config, text_pooling=pooling))
    if vision_weights is not None:
        load_vision_weights(model, vision_weights)
    if text_weights is not None:
        load_text_weights(model, text_weights)
    return model


# ---------------------------------------------------------------------------------------------------
# Saving and loading the whole model


def save_dual_encoder(
    model: DualEncoder,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model (and its tokenizer) to ``out_dir`` atomically, replacing what was there.

    Everything is written into a temporary sibling directory that is renamed into place at the end,
    so a reader never sees a half-written model.

    Args:
        model: The dual encoder.
        out_dir: Target directory.
        tokenizer: Optional transformers tokenizer, saved under ``tokenizer/``.
        extra: Optional JSON-serialisable metadata (e.g. the teacher's name, metrics), returned by
            ``load_dual_encoder``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: ``extra`` is not JSON-serialisable, or ``out_dir`` is an existing file.
    """
    if not isinstance(model, DualEncoder):
        raise ValueError(
            f"save_dual_encoder needs a DualEncoder, got {type(model).__name__} "
            "(unwrap DDP with .module, torch.compile with ._orig_mod)"
        )
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save a dual encoder to {target}: it is an existing file")
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "student": model.config.to_dict(),
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(payload, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"save_dual_encoder: extra must be JSON-serialisable: {error}") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_saved_config(path: str | Path) -> tuple[DualEncoderConfig, dict[str, Any]]:
    """The ``DualEncoderConfig`` and ``extra`` of a saved dual encoder, without loading weights.

    Raises:
        FileNotFoundError: no directory or no ``config.json``.
        ValueError: invalid JSON, another format, a newer version, or an invalid config.
    """
    root = Path(path)
    config_path = root / CONFIG_FILE
    if not root.is_dir():
        raise FileNotFoundError(f"no saved dual encoder at {root} (expected a directory with {CONFIG_FILE})")
    if not config_path.is_file():
        raise FileNotFoundError(f"saved dual encoder lacks {config_path}")
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{config_path}: format is {found!r}, expected {FORMAT_NAME!r}")
    version = payload.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format version {version!r} is not supported "
            f"(this raydistill reads <= {FORMAT_VERSION})"
        )
    if not isinstance(payload.get("student"), dict):
        raise ValueError(f"{config_path}: missing the 'student' config")
    student = dict(payload["student"])
    # "auto" became the default after version 1 files were written; those always carry their
    # pooling, and one without the key meant the default of the time, the pooler.
    student.setdefault("text_pooling", "pooler")
    try:
        config = DualEncoderConfig.from_dict(student)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: invalid student config: {error}") from error
    extra = payload.get("extra") or {}
    return config, dict(extra)


def load_dual_encoder(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[DualEncoder, Any | None, dict[str, Any]]:
    """Load what ``save_dual_encoder`` wrote.

    Args:
        path: The saved directory.
        device: Where to put the model.

    Returns:
        ``(model, tokenizer or None, extra)``; the model is in eval mode.

    Raises:
        FileNotFoundError: a missing directory or file (named in the message).
        ValueError: a malformed file, or weights that do not match the config.
    """
    root = Path(path)
    config, extra = read_saved_config(root)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"saved dual encoder lacks {weights}")
    model = DualEncoder(config)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"could not load {weights} into the model described by {root / CONFIG_FILE}: {error}"
        ) from error
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match {root / CONFIG_FILE}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    tokenizer_dir = root / TOKENIZER_DIR
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
    return model.to(device).eval(), tokenizer, extra
