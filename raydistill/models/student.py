"""The student dual encoder: its config and size presets, building, tower weights, save and load.

A ``DualEncoder`` is a timm ViT image tower (CLS token) and a transformers encoder text tower (BERT
pooler output, the CLS hidden state, or the mean of the token states), each followed by a linear head to the teacher's embedding
size ``d``; both outputs are L2-normalised (shared/method/DSMD.md, "Student"). The towers start from
random weights or from pretrained ones: a timm checkpoint file or timm pretrained name for the image
tower, a Hugging Face folder or hub name for the text tower (hub names come from the local Hugging
Face cache when there is no network). The text pooling follows the text weights: BERT's pooler with
pretrained weights (the reference), the CLS hidden state without (``resolve_text_pooling``). The
same class also serves as the CLIP-architecture teacher that the embedded demo fits, and any bigger
dual encoder this project trains: the teacher adapter ``raydistill`` reads what ``save_dual_encoder``
writes.

Saved format (a directory, written atomically)::

    config.json        {"format": "raydistill.dual_encoder", "version": 1,
                        "student": StudentConfig.to_dict(), "extra": {...}}
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

import copy
import dataclasses
import json
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from timm.models import vision_transformer as timm_vit
from torch import nn
from transformers import AutoConfig, AutoModel

from raydistill.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, preprocess_images
from raydistill.models.tokenizers import _is_hub_name, load_tokenizer

FORMAT_NAME = "raydistill.dual_encoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"

TEXT_POOLINGS = ("pooler", "cls", "mean")
#: ``text_pooling`` value that ``build_student`` resolves to one of ``TEXT_POOLINGS`` (``resolve_text_pooling``).
AUTO_POOLING = "auto"
# timm arguments the DualEncoder fixes itself: the tower must end at the CLS feature.
_RESERVED_VISION_KWARGS = ("num_classes", "global_pool", "pretrained")


@dataclass(frozen=True)
class StudentConfig:
    """Architecture and input settings of a dual encoder (JSON-serialisable).

    Attributes:
        vision: timm model name of the ViT image tower, e.g. ``"vit_base_patch16_224"``.
        vision_kwargs: Extra ``timm.create_model`` arguments (``patch_size``, ``embed_dim``, ``depth``,
            ``num_heads``, ...) that override the named model's, for custom small ViTs.
        text: A transformers config for an encoder-only text model, as a dict with ``model_type``
            (e.g. ``{"model_type": "bert", "hidden_size": 256, ...}``); ``vocab_size`` is set from the
            field below.
        text_pooling: ``"pooler"`` (BERT's pooler output, the reference), ``"cls"`` (the CLS hidden
            state) or ``"mean"`` (the mean of the real tokens' final states; with either of these the
            pooler is removed so that it holds no unused parameters), or ``"auto"`` (the default):
            ``"pooler"`` when the text tower gets pretrained weights, ``"cls"`` when it starts random
            (see ``resolve_text_pooling``). A built model's config holds the resolved value.
        image_size: Side of the square input image.
        resize_size: Shorter side is resized to this before the centre crop (256 for a 224 crop).
        max_len: Token length captions are padded/truncated to (30 in the reference).
        embed_dim: Output dimension ``d`` of both heads: the teacher's embedding size.
        vocab_size: Size of the tokenizer's vocabulary (rows of the token embedding).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
        interpolation: Resize filter, ``"bilinear"`` or ``"bicubic"``.
    """

    vision: str = "vit_base_patch16_224"
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=lambda: {"model_type": "bert"})
    text_pooling: str = AUTO_POOLING
    image_size: int = 224
    resize_size: int | None = 256
    max_len: int = 30
    embed_dim: int = 768
    vocab_size: int = 30522
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs compare equal after a round trip.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "vision_kwargs", dict(self.vision_kwargs))
        object.__setattr__(self, "text", dict(self.text))
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"student.{name} must be a positive int, got {value!r}")

        for name in ("image_size", "max_len", "embed_dim", "vocab_size"):
            positive_int(name)
        if not isinstance(self.vision, str) or not self.vision:
            raise ValueError(f"student.vision must be a timm model name, got {self.vision!r}")
        reserved = sorted(set(self.vision_kwargs) & set(_RESERVED_VISION_KWARGS))
        if reserved:
            raise ValueError(f"student.vision_kwargs may not set {reserved}: the DualEncoder fixes them")
        img_size = self.vision_kwargs.get("img_size", self.image_size)
        if img_size != self.image_size:
            raise ValueError(
                f"student.vision_kwargs.img_size ({img_size}) differs from student.image_size "
                f"({self.image_size}); set image_size only"
            )
        if not isinstance(self.text.get("model_type"), str):
            raise ValueError(
                f"student.text must be a transformers config dict with a 'model_type' (e.g. 'bert'), "
                f"got {self.text!r}"
            )
        if "vocab_size" in self.text and self.text["vocab_size"] != self.vocab_size:
            raise ValueError(
                f"student.text.vocab_size ({self.text['vocab_size']}) differs from student.vocab_size "
                f"({self.vocab_size}); set vocab_size only"
            )
        if self.text_pooling not in (*TEXT_POOLINGS, AUTO_POOLING):
            raise ValueError(
                f"student.text_pooling must be one of {(*TEXT_POOLINGS, AUTO_POOLING)}, got {self.text_pooling!r}"
            )
        if self.resize_size is not None and (
            not isinstance(self.resize_size, int) or self.resize_size < self.image_size
        ):
            raise ValueError(
                f"student.resize_size must be an int >= image_size ({self.image_size}) or None, "
                f"got {self.resize_size!r}"
            )
        if self.max_len < 2:
            raise ValueError(f"student.max_len must be >= 2 (room for [CLS] and [SEP]), got {self.max_len}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"student.mean/std need 3 values with std > 0, got {self.mean} / {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"student.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict of every field."""
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudentConfig:
        """Inverse of ``to_dict``; missing fields take their defaults.

        Raises:
            ValueError: an unknown key, or an invalid value.
        """
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown student config key(s) {unknown}; allowed: {allowed}")
        return cls(**copy.deepcopy(dict(data)))


def _bert(hidden: int, layers: int, heads: int, max_positions: int) -> dict[str, Any]:
    """A BERT text-tower config with the usual 4x feed-forward width."""
    return {
        "model_type": "bert",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": max_positions,
    }


def _small_vit(patch: int, width: int, depth: int, heads: int) -> dict[str, Any]:
    """timm kwargs turning ``vit_tiny_patch16_224`` into a custom ViT (the name only picks the class)."""
    return {"patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": heads}


# Size presets. embed_dim and vocab_size come from the teacher and the tokenizer at build time.
# The embedded demo's images are generated at 48 px with shapes up to the border, so its presets
# resize straight to the crop size (cropping would cut off the spatial relations the captions name).
# Parameter counts with d = 256 and a caption vocabulary of 100 tokens: demo ≈ 0.65 M, demo_teacher
# ≈ 5.0 M (7.7x larger); with 1,000 tokens 0.74 M and 5.3 M.
PRESETS: dict[str, StudentConfig] = {
    "test": StudentConfig(
        vision="vit_tiny_patch16_224",
        vision_kwargs=_small_vit(patch=16, width=32, depth=1, heads=2),
        text=_bert(hidden=32, layers=1, heads=2, max_positions=32) | {"intermediate_size": 64},
        image_size=64,
        resize_size=64,
    ),
    "demo": StudentConfig(
        vision="vit_tiny_patch16_224",
        vision_kwargs=_small_vit(patch=8, width=96, depth=3, heads=3),
        text=_bert(hidden=96, layers=2, heads=3, max_positions=32),
        image_size=48,
        resize_size=48,
    ),
    "demo_teacher": StudentConfig(
        vision="vit_tiny_patch16_224",
        vision_kwargs=_small_vit(patch=8, width=256, depth=4, heads=4),
        text=_bert(hidden=256, layers=2, heads=4, max_positions=32),
        image_size=48,
        resize_size=48,
    ),
    # ViT-Ti/16 + BERT-mini (4 layers, 256 hidden).
    "tiny": StudentConfig(vision="vit_tiny_patch16_224", text=_bert(256, 4, 4, 512)),
    # ViT-S/16 + BERT-small (4 layers, 512 hidden).
    "small": StudentConfig(vision="vit_small_patch16_224", text=_bert(512, 4, 8, 512)),
    # The reference student: ViT-B/16 + BERT-base (~197 M parameters with d = 768).
    "base": StudentConfig(vision="vit_base_patch16_224", text=_bert(768, 12, 12, 512)),
}


def preset_names() -> list[str]:
    """Names of the size presets, smallest first."""
    return list(PRESETS)


def get_preset(name: str) -> StudentConfig:
    """A copy of the preset ``name`` (with the placeholder embed_dim and vocab_size).

    Raises:
        ValueError: an unknown name; the message lists the allowed ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown student preset {name!r}; allowed: {preset_names()}")
    return copy.deepcopy(PRESETS[name])


def resolve_text_pooling(text_pooling: str, pretrained_text: bool) -> str:
    """The text pooling a student uses: an explicit one of ``TEXT_POOLINGS`` as given; ``"auto"`` by the weights.

    BERT's pooler (dense + tanh over the CLS state) is trained by BERT's next-sentence objective: with
    pretrained text weights it is part of what the reference student starts from (DSMD.md), so ``auto``
    keeps it. Without them it would be one more untrained layer, with a saturating non-linearity,
    between the CLS state and the head that the head alone can learn, so ``auto`` uses the CLS hidden
    state. Distilled and baseline students follow the same rule, so both arms stay the same network.

    Args:
        text_pooling: ``"auto"`` or one of ``TEXT_POOLINGS``.
        pretrained_text: Whether the text tower is loaded from pretrained weights.

    Returns:
        One of ``TEXT_POOLINGS``.

    Raises:
        ValueError: an unknown value.
    """
    if text_pooling == AUTO_POOLING:
        return "pooler" if pretrained_text else "cls"
    if text_pooling not in TEXT_POOLINGS:
        raise ValueError(
            f"student.text_pooling must be one of {(*TEXT_POOLINGS, AUTO_POOLING)}, got {text_pooling!r}"
        )
    return text_pooling


def student_overrides(section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``build_student`` overrides a run's ``student:`` config section sets, with the pooling resolved.

    Wherever a run's student is built (the training workers, the export of their checkpoint), build it
    with these, so that the network trained, exported and reloaded is the same one.

    Args:
        section: The ``student:`` section as a dict (``Config.student.model_dump()``): ``max_len``,
            ``text_pooling`` and ``text_weights`` are read; absent keys take their defaults.

    Returns:
        ``{"text_pooling": ...}`` plus ``{"max_len": ...}`` when the section sets it.
    """
    pretrained_text = bool(section.get("text_weights"))
    overrides: dict[str, Any] = {
        "text_pooling": resolve_text_pooling(section.get("text_pooling") or AUTO_POOLING, pretrained_text)
    }
    if section.get("max_len"):
        overrides["max_len"] = section["max_len"]
    return overrides


def _build_vision_tower(config: StudentConfig) -> nn.Module:
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


def _build_text_tower(config: StudentConfig) -> nn.Module:
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
        config: The ``StudentConfig`` it was built from.
        vision: The timm ViT (no classifier; returns the CLS feature).
        text: The transformers encoder.
        image_proj: ``Linear(vision hidden, embed_dim)``.
        text_proj: ``Linear(text hidden, embed_dim)``.
    """

    def __init__(self, config: StudentConfig) -> None:
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
# Pretrained tower weights: local files, or names that timm and transformers load themselves


@dataclass(frozen=True)
class WeightsReport:
    """What loading tower weights did.

    Attributes:
        source: The file or directory read, or the timm / Hugging Face name loaded.
        loaded: Number of tensors copied into the model.
        missing: Model keys the checkpoint lacked (left as initialised).
        unexpected: Checkpoint keys the model has no place for (not loaded).
        ignored: Checkpoint keys dropped on purpose (classification heads, an unused pooler).
    """

    source: Path | str
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch state-dict file (``weights_only``)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        # UnpicklingError: not a torch file, or one holding objects weights_only refuses to load.
        raise ValueError(f"could not read weights file {path}: {error}") from error
    # Training checkpoints (timm's train script and others) nest the weights.
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        shown = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"weights file {path} holds no state dict of tensors (found {shown})")
    return data


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP / torch.compile / wrapper prefixes shared by every key."""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod.", "model."):
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def _select_submodule(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The ``prefix`` part of a whole saved DualEncoder (recognised by its head keys)."""
    if "image_proj.weight" in state and "text_proj.weight" in state:
        return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def _load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: Path | str,
    ignored: list[str],
    strict: bool,
    what: str,
) -> WeightsReport:
    """Shape-check, key-check, then copy ``state`` into ``module``; nothing is copied on error."""
    own = module.state_dict()
    mismatched = [
        f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{source} does not fit the {what}: {len(mismatched)} tensor(s) differ in shape, e.g. "
            + "; ".join(mismatched[:5])
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source} does not match the {what}: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]} (pass strict=False to load the rest)"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return WeightsReport(
        source=source,
        loaded=len(state) - len(unexpected),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        ignored=tuple(sorted(ignored)),
    )


def _is_timm_name(path: str | Path) -> bool:
    """Whether ``path`` names timm pretrained weights rather than a file: a string that is no existing
    path and is a timm model name (``vit_base_patch16_224.augreg_in21k``) or an ``hf-hub:`` name."""
    if not isinstance(path, str) or Path(path).expanduser().exists():
        return False
    return path.startswith("hf-hub:") or timm.is_model(path)


def _offline_hint(setting: str, repo: str, local: str) -> str:
    """What to do when a hub name cannot be loaded: the same advice for both towers."""
    return (
        f"Without network the files must already be in the Hugging Face cache (under $HF_HOME, default "
        f"~/.cache/huggingface): fetch them once where there is network (`hf download {repo}`, or any run "
        f"with the same {setting}) and set HF_HUB_OFFLINE=1 to skip the download attempts; "
        f"or set {setting} to {local}."
    )


def _timm_pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """The image-tower state of timm's pretrained ``name``, loaded by timm (cache first when offline)."""
    try:
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id or name
    except (RuntimeError, AttributeError):  # unknown tag, or no pretrained config at all
        repo = name
    try:
        # num_classes=0: timm drops the classifier (ImageNet-21k's 21,843 classes), which has no place here.
        donor = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as error:  # timm's download path raises OSError, RuntimeError, hub and HTTP errors alike
        raise ValueError(
            f"student.vision_weights {name!r}: timm could not load these pretrained weights "
            f"({type(error).__name__}: {error}). "
            + _offline_hint("student.vision_weights", repo, "a local timm checkpoint file (.safetensors / .pth)")
        ) from error
    return donor.state_dict()


def load_vision_weights(model: DualEncoder, path: str | Path, strict: bool = True) -> WeightsReport:
    """Load a timm ViT checkpoint, or timm's pretrained weights by name, into the image tower.

    A string that is no existing path and is a timm model name with its pretrained tag (e.g.
    ``"vit_base_patch16_224.augreg_in21k"``, the ImageNet-21k ViT-B/16 of DSMD.md) or an
    ``"hf-hub:org/name"`` is loaded by timm itself (``timm.create_model(name, pretrained=True)``):
    from the Hugging Face cache when it is there, else downloaded.

    Files: ``.safetensors`` or torch state-dict files (``.pth``, ``.pt``, ``.bin``; loaded with
    ``weights_only=True``), plain or nested under ``state_dict`` / ``model``, with ``module.`` /
    ``_orig_mod.`` / ``model.`` prefixes, or a whole saved DualEncoder's ``model.safetensors``. timm's
    own ViT checkpoint filter runs first: it resamples position embeddings (and patch embeddings)
    to this model's image and patch size, and maps the other layouts timm knows (open_clip's, for
    one) onto a ViT of matching architecture. Classification-head keys are ignored.

    Args:
        model: The dual encoder to fill.
        path: The checkpoint file, or a timm pretrained name (a string).
        strict: Fail when keys are missing or unexpected (after ignoring the head); when False,
            load what matches and report the rest.

    Returns:
        A ``WeightsReport``.

    Raises:
        FileNotFoundError: no such file (and not a timm name).
        ValueError: unreadable file, a name timm cannot load (offline and not cached, unknown tag),
            shape mismatches, or (strict) missing/unexpected keys.
    """
    source: Path | str
    if _is_timm_name(path):
        source = str(path)
        state = _timm_pretrained_state(source)
    else:
        source = Path(path)
        state = _select_submodule(_strip_wrappers(_read_state_dict(source)), "vision.")
    if isinstance(model.vision, timm_vit.VisionTransformer):
        state = timm_vit.checkpoint_filter_fn(state, model.vision)
    own = model.vision.state_dict()
    # The tower has no classifier (num_classes=0): a checkpoint's head has nowhere to go.
    ignored = [k for k in state if k.startswith(("head.", "head_dist.")) and k not in own]
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    return _load_into(model.vision, state, source, ignored, strict, f"vision tower {model.config.vision!r}")


def _local_text_model(source: Path, expected_type: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model in a ``save_pretrained`` directory, after checking its ``model_type``."""
    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"text weights: {config_path} not found (expected a save_pretrained directory, or a "
            "Hugging Face hub name such as bert-base-uncased)"
        )
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if model_type != expected_type:
        raise ValueError(f"{source} holds a {model_type!r} model; the student's text tower is {expected_type!r}")
    try:
        return AutoModel.from_pretrained(str(source), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"could not load the text model in {source}: {error}") from error


def _hub_text_model(name: str, expected_type: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model a Hugging Face hub name gives (cache first when offline), after checking its type."""
    hint = _offline_hint("student.text_weights", name, "a local save_pretrained folder")
    try:
        hf_config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"student.text_weights {name!r} is no local folder, and transformers could not load it by name "
            f"({type(error).__name__}: {error}). {hint}"
        ) from error
    if hf_config.model_type != expected_type:
        raise ValueError(
            f"{name} holds a {hf_config.model_type!r} model; the student's text tower is {expected_type!r}"
        )
    try:
        return AutoModel.from_pretrained(name, config=hf_config, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"could not load the text model {name!r}: {error}. {hint}") from error


def load_text_weights(model: DualEncoder, hf_dir: str | Path, strict: bool = True) -> WeightsReport:
    """Load a Hugging Face model (a ``save_pretrained`` directory or a hub name) into the text tower.

    A string that is no existing path and looks like a hub name (``"bert-base-uncased"``,
    ``"google/bert_uncased_L-4_H-512_A-8"``) is loaded by transformers itself
    (``AutoModel.from_pretrained``): from the Hugging Face cache when it is there, else downloaded.
    The model may be the bare encoder (``BertModel``) or one with a task head (``BertForMaskedLM``...);
    transformers strips the head and the ``bert.`` prefix. Its ``model_type`` and tensor shapes must
    match the student's text config (``vocab_size`` included). Pooler weights are ignored when the
    student uses ``text_pooling="cls"``; a checkpoint without a pooler is a missing-key error for a
    pooler student (its pooler would stay random).

    Args:
        model: The dual encoder to fill.
        hf_dir: Directory with ``config.json`` and the weights, or a hub name (a string).
        strict: Fail when keys are missing or unexpected; when False, load what matches.

    Returns:
        A ``WeightsReport``.

    Raises:
        FileNotFoundError: no such directory (and not a hub name), or no ``config.json`` in it.
        ValueError: another model type, unreadable weights, a name transformers cannot load (offline
            and not cached, unknown name), shape mismatches, or (strict) missing/unexpected keys.
    """
    expected_type = model.config.text["model_type"]
    source: Path | str
    # The tokenizer loader's test for a hub name: a name means the same in student.tokenizer and here.
    if isinstance(hf_dir, str) and not Path(hf_dir).expanduser().exists() and _is_hub_name(hf_dir):
        source = hf_dir
        pretrained, info = _hub_text_model(hf_dir, expected_type)
    else:
        source = Path(hf_dir)
        pretrained, info = _local_text_model(source, expected_type)
    state = pretrained.state_dict()
    # Keys transformers had to initialise itself are not in the checkpoint: report them as missing.
    for key in info.get("missing_keys", ()):
        state.pop(key, None)
    # Task heads (e.g. the masked-LM head) that transformers dropped while loading the bare encoder.
    ignored = list(info.get("unexpected_keys", ()))
    if getattr(model.text, "pooler", None) is None:
        ignored += [k for k in state if k.startswith("pooler.")]
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    return _load_into(model.text, state, source, ignored, strict, f"text tower ({expected_type})")


# ---------------------------------------------------------------------------------------------------
# Building


def _resolve_config(preset_or_config: str | StudentConfig | Mapping[str, Any]) -> StudentConfig:
    if isinstance(preset_or_config, StudentConfig):
        return preset_or_config
    if isinstance(preset_or_config, str):
        return get_preset(preset_or_config)
    if isinstance(preset_or_config, Mapping):
        return StudentConfig.from_dict(preset_or_config)
    raise ValueError(
        f"student must be a preset name {preset_names()}, a StudentConfig or a dict, "
        f"got {type(preset_or_config).__name__}"
    )


def build_student(
    preset_or_config: str | StudentConfig | Mapping[str, Any],
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
        preset_or_config: A preset name (see ``preset_names()``), a ``StudentConfig`` or its dict.
        embed_dim: Output dimension: the teacher's embedding size.
        vocab_size: The tokenizer's vocabulary size.
        vision_weights: Optional image-tower weights: a timm checkpoint file or a timm pretrained
            name such as ``"vit_base_patch16_224.augreg_in21k"`` (``load_vision_weights``).
        text_weights: Optional text-tower weights: a Hugging Face model directory or a hub name such
            as ``"bert-base-uncased"`` (``load_text_weights``).
        **overrides: Any other ``StudentConfig`` field, e.g. ``image_size=384`` or ``text_pooling="cls"``.

    Returns:
        The model, randomly initialised apart from the given tower weights, in training mode.

    Raises:
        FileNotFoundError: a weights path that does not exist (and is not a hub name).
        ValueError: unknown preset or field, invalid value, weights that do not fit, or a hub name
            that cannot be loaded (the message says what to set).
    """
    config = _resolve_config(preset_or_config)
    allowed = [f.name for f in dataclasses.fields(StudentConfig)]
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


def _replace_directory(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` to ``target``, replacing an existing one."""
    if not target.exists():
        os.replace(new, target)
        return
    # A directory cannot be os.replace'd over a non-empty one: move the old one aside first.
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


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
        _replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_saved_config(path: str | Path) -> tuple[StudentConfig, dict[str, Any]]:
    """The ``StudentConfig`` and ``extra`` of a saved dual encoder, without loading weights.

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
        config = StudentConfig.from_dict(student)
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
