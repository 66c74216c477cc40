"""The student's architecture as data: :class:`DualEncoderConfig`, the size presets, and the text pooling rule.

A preset is a short named config (``test``, ``demo``, ``demo_teacher``, ``tiny``, ``small``, ``base``), so a Tune
search space is a list of names. ``embed_dim`` (the teacher's) and ``vocab_size`` (the tokenizer's) are filled
in when the model is built (:func:`raydistill.models.student.build_student`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from raydistill.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS

TEXT_POOLINGS = ("pooler", "cls", "mean")
#: ``text_pooling`` value that ``build_student`` resolves to one of ``TEXT_POOLINGS`` (``resolve_text_pooling``).
AUTO_POOLING = "auto"
# timm arguments the DualEncoder fixes itself: the tower must end at the CLS feature.
_RESERVED_VISION_KWARGS = ("num_classes", "global_pool", "pretrained")


@dataclass(frozen=True)
class DualEncoderConfig:
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
    def from_dict(cls, data: Mapping[str, Any]) -> DualEncoderConfig:
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
PRESETS: dict[str, DualEncoderConfig] = {
    "test": DualEncoderConfig(
        vision="vit_tiny_patch16_224",
        vision_kwargs=_small_vit(patch=16, width=32, depth=1, heads=2),
        text=_bert(hidden=32, layers=1, heads=2, max_positions=32) | {"intermediate_size": 64},
        image_size=64,
        resize_size=64,
    ),
    "demo": DualEncoderConfig(
        vision="vit_tiny_patch16_224",
        vision_kwargs=_small_vit(patch=8, width=96, depth=3, heads=3),
        text=_bert(hidden=96, layers=2, heads=3, max_positions=32),
        image_size=48,
        resize_size=48,
    ),
    "demo_teacher": DualEncoderConfig(
        vision="vit_tiny_patch16_224",
        vision_kwargs=_small_vit(patch=8, width=256, depth=4, heads=4),
        text=_bert(hidden=256, layers=2, heads=4, max_positions=32),
        image_size=48,
        resize_size=48,
    ),
    # ViT-Ti/16 + BERT-mini (4 layers, 256 hidden).
    "tiny": DualEncoderConfig(vision="vit_tiny_patch16_224", text=_bert(256, 4, 4, 512)),
    # ViT-S/16 + BERT-small (4 layers, 512 hidden).
    "small": DualEncoderConfig(vision="vit_small_patch16_224", text=_bert(512, 4, 8, 512)),
    # The reference student: ViT-B/16 + BERT-base (~197 M parameters with d = 768).
    "base": DualEncoderConfig(vision="vit_base_patch16_224", text=_bert(768, 12, 12, 512)),
}


def preset_names() -> list[str]:
    """Names of the size presets, smallest first."""
    return list(PRESETS)


def get_preset(name: str) -> DualEncoderConfig:
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




#: The name this config had before: kept for code that imports it.
StudentConfig = DualEncoderConfig
