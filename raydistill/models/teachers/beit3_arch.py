"""The BEiT-3 retrieval model (Multiway Transformer + retrieval heads), written for inference.

BEiT-3 (Wang et al., "Image as a Foreign Language", 2022) is one Transformer whose attention is shared
by images and text while every other weight (projections, layer norms, feed-forward) exists twice: an
``A`` copy for vision tokens and a ``B`` copy for language tokens. The official code builds it from
torchscale's ``BEiT3`` (``torchscale.model.BEiT3``) and wraps it in ``BEiT3ForRetrieval``
(unilm ``beit3/modeling_finetune.py``). torchscale cannot be a dependency here (its release pins
timm 0.6 and fairscale 0.4), so this module re-implements the same computation with module and
parameter names identical to those classes, so that the official checkpoints
(``beit3_{base,large}_patch16_{224,384}_{coco,f30k}_retrieval.pth``, ``beit3_*_itc_patch16_224.pth``)
load with ``strict=True``.

What the official configuration fixes, and this module follows (torchscale ``EncoderConfig`` as set by
unilm ``_get_base_config`` / ``_get_large_config``):

- pre-LayerNorm layers with "sub-LN" (``subln=True``): an extra LayerNorm on the attention output
  before ``out_proj`` (``inner_attn_ln``) and on the FFN hidden layer before ``fc2``
  (``ffn_layernorm``); LayerNorm eps 1e-5; a final LayerNorm (``normalize_output=True``);
- no embedding scale (``no_scale_embedding=True``), no embedding LayerNorm, no relative position
  bias, no output projection (``no_output_layer=True``), exact (erf) GELU computed in float32;
- attention scaled by ``head_dim ** -0.5``, softmax in float32, padded text keys masked out;
- learned absolute positions from a two-way embedding: ``A`` for the image sequence
  (``num_patches + 1`` tokens, the [CLS] first), ``B`` for text (``max_source_positions`` rows);
  positions are counted from 2 for both, as in fairseq, so the ``A`` table has
  ``num_patches + 3`` rows and text can be at most ``max_source_positions - 2`` tokens long;
- padded text positions are zeroed after the embeddings are summed.

Retrieval only ever encodes one modality at a time, so instead of torchscale's mutable
"split position" each multiway module is told which copy to use (``A`` for vision, ``B`` for text);
the fused image+text path of the other BEiT-3 tasks is not needed and not implemented. The
``mask_token`` of the vision embedding is kept (it is in every checkpoint) but unused.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Modality = Literal["vision", "text"]

# Absolute positions start at 2 (fairseq's convention, kept by torchscale's BEiT3).
POSITION_OFFSET = 2


@dataclass(frozen=True)
class BEiT3Config:
    """BEiT-3 architecture, with torchscale ``EncoderConfig`` field names.

    Attributes:
        img_size: Input side in pixels (224 for the ITC checkpoints, 384 for the fine-tuned retrieval ones).
        patch_size: Patch side in pixels.
        in_chans: Image channels.
        vocab_size: Text embedding rows (64010 in the official models; the XLM-R SentencePiece
            vocabulary plus its 2 extra ids fits in it).
        encoder_embed_dim: Hidden size, also the retrieval embedding size.
        encoder_layers: Transformer layers.
        encoder_attention_heads: Attention heads.
        encoder_ffn_embed_dim: Feed-forward hidden size.
        max_source_positions: Rows of the text position table.
        layernorm_eps: LayerNorm epsilon.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    encoder_embed_dim: int = 768
    encoder_layers: int = 12
    encoder_attention_heads: int = 12
    encoder_ffn_embed_dim: int = 3072
    max_source_positions: int = 1024
    layernorm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "layernorm_eps":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"teacher.arch.layernorm_eps must be a positive number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"teacher.arch.{f.name} must be a positive int, got {value!r}")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"teacher.arch.encoder_embed_dim ({self.encoder_embed_dim}) must be divisible by "
                f"encoder_attention_heads ({self.encoder_attention_heads})"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"teacher.arch.img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        """Image patches per side, squared."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def max_text_len(self) -> int:
        """Longest text (special tokens included) the position table can hold."""
        return self.max_source_positions - POSITION_OFFSET


# The official presets (unilm beit3/modeling_utils.py); img_size is set per checkpoint.
PRESETS: dict[str, dict[str, int]] = {
    "base": {"encoder_embed_dim": 768, "encoder_layers": 12, "encoder_attention_heads": 12,
             "encoder_ffn_embed_dim": 3072},
    "large": {"encoder_embed_dim": 1024, "encoder_layers": 24, "encoder_attention_heads": 16,
              "encoder_ffn_embed_dim": 4096},
}
ARCH_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BEiT3Config))


def make_config(size: str | None = None, overrides: dict[str, Any] | None = None) -> BEiT3Config:
    """A BEiT-3 config from a preset name and/or explicit fields.

    Args:
        size: ``"base"``, ``"large"`` or None (defaults are BEiT-3 base).
        overrides: ``EncoderConfig`` field names -> values, applied over the preset.

    Returns:
        The config.

    Raises:
        ValueError: an unknown preset or field name (the allowed ones are listed), or a bad value.
    """
    if size is not None and size not in PRESETS:
        raise ValueError(f"teacher.size: unknown BEiT-3 size {size!r}; allowed: {list(PRESETS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(ARCH_FIELDS))
    if unknown:
        raise ValueError(f"teacher.arch.{unknown[0]}: unknown BEiT-3 field; allowed: {list(ARCH_FIELDS)}")
    return replace(BEiT3Config(), **(PRESETS[size] if size else {}), **overrides)


class Multiway(nn.Module):
    """Two copies of a module: ``A`` applied to vision tokens, ``B`` to text tokens."""

    def __init__(self, vision: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.A = vision
        self.B = text

    def forward(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        return self.A(x) if modality == "vision" else self.B(x)


def _multiway_linear(dim_in: int, dim_out: int) -> Multiway:
    return Multiway(nn.Linear(dim_in, dim_out), nn.Linear(dim_in, dim_out))


def _multiway_norm(dim: int, eps: float) -> Multiway:
    return Multiway(nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps))


class VisionEmbedding(nn.Module):
    """Patchify with a strided convolution and prepend the [CLS] token."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.img_size = config.img_size
        self.proj = nn.Conv2d(config.in_chans, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # masked-image pretraining only
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"BEiT-3 expects {self.img_size}x{self.img_size} pixels, got {tuple(pixels.shape[-2:])}"
            )
        patches = self.proj(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1)


class MultiheadAttention(nn.Module):
    """Self-attention with multiway projections and the sub-LN before the output projection."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.num_heads = config.encoder_attention_heads
        self.k_proj = _multiway_linear(dim, dim)
        self.v_proj = _multiway_linear(dim, dim)
        self.q_proj = _multiway_linear(dim, dim)
        self.out_proj = _multiway_linear(dim, dim)
        self.inner_attn_ln = _multiway_norm(dim, config.layernorm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, modality: Modality, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        q = self._heads(self.q_proj(x, modality))
        k = self._heads(self.k_proj(x, modality))
        v = self._heads(self.v_proj(x, modality))
        keep = None
        if key_padding_mask is not None:
            keep = ~key_padding_mask.bool()[:, None, None, :]  # True where a key may be attended
        # scale defaults to head_dim ** -0.5, torchscale's `scaling`.
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        attn = attn.transpose(1, 2).reshape(x.shape)
        return self.out_proj(self.inner_attn_ln(attn, modality), modality)


class FeedForwardNetwork(nn.Module):
    """fc1 -> GELU (in float32) -> sub-LN -> fc2."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.encoder_embed_dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, config.encoder_embed_dim)
        self.ffn_layernorm = nn.LayerNorm(config.encoder_ffn_embed_dim, eps=config.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        hidden = F.gelu(hidden.float()).type_as(hidden)
        return self.fc2(self.ffn_layernorm(hidden))


class EncoderLayer(nn.Module):
    """One pre-LN Transformer layer with multiway norms and feed-forward."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(config)
        self.self_attn_layer_norm = _multiway_norm(config.encoder_embed_dim, config.layernorm_eps)
        self.ffn = Multiway(FeedForwardNetwork(config), FeedForwardNetwork(config))
        self.final_layer_norm = _multiway_norm(config.encoder_embed_dim, config.layernorm_eps)

    def forward(self, x: torch.Tensor, modality: Modality, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, modality), modality, key_padding_mask)
        return x + self.ffn(self.final_layer_norm(x, modality), modality)


class Encoder(nn.Module):
    """Positions, the layer stack and the final LayerNorm."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.embed_positions = Multiway(
            nn.Embedding(config.num_patches + 1 + POSITION_OFFSET, dim),
            nn.Embedding(config.max_source_positions, dim),
        )
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = _multiway_norm(dim, config.layernorm_eps)

    def forward(self, tokens: torch.Tensor, modality: Modality, padding_mask: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(POSITION_OFFSET, tokens.shape[1] + POSITION_OFFSET, device=tokens.device)
        x = tokens + self.embed_positions(positions, modality).unsqueeze(0)
        if padding_mask is not None:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        for layer in self.layers:
            x = layer(x, modality, padding_mask)
        return self.layer_norm(x, modality)


class BEiT3(nn.Module):
    """The shared backbone: text and vision embeddings feeding one multiway encoder."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.text_embed = nn.Embedding(config.vocab_size, config.encoder_embed_dim)
        self.vision_embed = VisionEmbedding(config)
        self.encoder = Encoder(config)

    def forward_vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, 1 + num_patches, D]`` of normalised pixels ``[B, 3, S, S]``."""
        return self.encoder(self.vision_embed(pixels), "vision", None)

    def forward_text(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, D]`` of token ids ``[B, L]``; ``padding_mask`` is 1 at padding."""
        return self.encoder(self.text_embed(input_ids), "text", padding_mask)


class BEiT3Retrieval(nn.Module):
    """BEiT-3 as a dual encoder: [CLS] output -> ``vision_head`` / ``language_head`` -> L2 norm.

    Parameter names match unilm's ``BEiT3ForRetrieval``: ``beit3.*``, ``vision_head.weight``,
    ``language_head.weight`` and ``logit_scale`` (the contrastive temperature, unused here).
    """

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.config = config
        dim = config.encoder_embed_dim
        self.beit3 = BEiT3(config)
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, D]`` of pixels normalised with mean = std = 0.5."""
        cls = self.beit3.forward_vision(pixels)[:, 0]
        return F.normalize(self.vision_head(cls), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, D]``; ``padding_mask`` is 1 at padding positions."""
        cls = self.beit3.forward_text(input_ids, padding_mask)[:, 0]
        return F.normalize(self.language_head(cls), dim=-1)
