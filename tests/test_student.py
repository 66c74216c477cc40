"""The student dual encoder: presets, outputs, text pooling, tower weights, save/load, and image preprocessing."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertModel, RobertaConfig, RobertaModel

from real_data import LANDSCAPE_JPEG, PORTRAIT_JPEG
from raydistill.models.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess_images
from raydistill.models.student import (
    PRESETS,
    DualEncoder,
    StudentConfig,
    build_student,
    get_preset,
    load_dual_encoder,
    load_text_weights,
    load_vision_weights,
    preset_names,
    read_saved_config,
    resolve_text_pooling,
    save_dual_encoder,
    student_overrides,
)
from raydistill.models.tokenizers import build_wordpiece_tokenizer, encode_texts

# ---------------------------------------------------------------------------------------------------
# Reference parameter counts, written out from the architectures (timm ViT, Hugging Face BERT).

# preset -> (image size, patch, ViT width, depth), (BERT hidden, layers, feed-forward, positions)
ARCHITECTURES = {
    "test": ((64, 16, 32, 1), (32, 1, 64, 32)),
    "demo": ((48, 8, 96, 3), (96, 2, 384, 32)),
    "demo_teacher": ((48, 8, 256, 4), (256, 2, 1024, 32)),
    "tiny": ((224, 16, 192, 12), (256, 4, 1024, 512)),
    "small": ((224, 16, 384, 12), (512, 4, 2048, 512)),
    "base": ((224, 16, 768, 12), (768, 12, 3072, 512)),
}


def vit_parameters(image: int, patch: int, width: int, depth: int) -> int:
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    patch_embed = linear(3 * patch * patch, width)
    tokens = width + ((image // patch) ** 2 + 1) * width  # CLS token + position embeddings
    block = 2 * 2 * width + linear(width, 3 * width) + linear(width, width)
    block += linear(width, 4 * width) + linear(4 * width, width)
    return patch_embed + tokens + depth * block + 2 * width  # final LayerNorm


def bert_parameters(hidden: int, layers: int, ffn: int, positions: int, vocab: int, pooler: bool) -> int:
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    embeddings = (vocab + positions + 2) * hidden + 2 * hidden  # word, position, 2 segment; LayerNorm
    layer = 4 * linear(hidden, hidden) + 2 * hidden + linear(hidden, ffn) + linear(ffn, hidden) + 2 * hidden
    return embeddings + layers * layer + (linear(hidden, hidden) if pooler else 0)


def expected_parameters(preset: str, embed_dim: int, vocab: int, pooler: bool) -> int:
    (image, patch, width, depth), (hidden, layers, ffn, positions) = ARCHITECTURES[preset]
    heads = (width * embed_dim + embed_dim) + (hidden * embed_dim + embed_dim)
    vision = vit_parameters(image, patch, width, depth)
    return vision + bert_parameters(hidden, layers, ffn, positions, vocab, pooler) + heads


def _inputs(model: DualEncoder, batch: int = 2, length: int = 7) -> tuple[torch.Tensor, ...]:
    """Random pixels, and token ids whose first row is padded after 4 tokens."""
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size)
    ids = torch.randint(5, model.config.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0
    ids[0, 4:] = 0
    return pixels, ids, mask


# ---------------------------------------------------------------------------------------------------
# Presets and building


def test_preset_names_and_unknown_preset() -> None:
    assert preset_names() == ["test", "demo", "demo_teacher", "tiny", "small", "base"]
    with pytest.raises(ValueError, match=r"unknown student preset 'huge'; allowed: \['test', 'demo'"):
        build_student("huge", embed_dim=8, vocab_size=10)
    with pytest.raises(ValueError, match="unknown student setting"):
        build_student("test", embed_dim=8, vocab_size=10, depth=3)
    # get_preset hands out copies: editing one does not change the table.
    copy = get_preset("test")
    copy.vision_kwargs["depth"] = 99
    assert PRESETS["test"].vision_kwargs["depth"] == 1


@pytest.mark.parametrize("preset", ["base", "small", "tiny"])
def test_large_presets_on_meta_device_have_the_reference_size(preset: str) -> None:
    # With pretrained BERT (the reference) the student keeps BERT's pooler; built random, it has none.
    with torch.device("meta"):
        model = build_student(preset, embed_dim=768, vocab_size=30522, text_pooling="pooler")
        random_text = build_student(preset, embed_dim=768, vocab_size=30522)
    assert model.num_parameters() == expected_parameters(preset, 768, 30522, pooler=True)
    assert random_text.num_parameters() == expected_parameters(preset, 768, 30522, pooler=False)
    if preset == "base":
        # The DSMD reference student: ViT-B/16 (86 M) + BERT-base (109 M) + heads, about 197 M.
        assert abs(model.num_parameters() - 197e6) < 1e6
        assert sum(p.numel() for p in model.vision.parameters()) == 85_798_656
        assert sum(p.numel() for p in model.text.parameters()) == 109_482_240


@pytest.mark.parametrize(
    ("preset", "embed_dim", "vocab"),
    [("test", 16, 50), ("demo", 256, 120), ("demo_teacher", 256, 120)],
)
def test_small_presets_build_and_embed(preset: str, embed_dim: int, vocab: int) -> None:
    model = build_student(preset, embed_dim=embed_dim, vocab_size=vocab).eval()
    assert model.num_parameters() == expected_parameters(preset, embed_dim, vocab, pooler=False)
    pixels, ids, mask = _inputs(model)
    with torch.no_grad():
        img, txt = model(pixels, ids, mask)
    assert img.shape == txt.shape == (2, embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        assert torch.equal(img, model.encode_image(pixels))
        assert torch.equal(txt, model.encode_text(ids, mask))


def test_build_from_config_or_dict_with_overrides() -> None:
    config = get_preset("test")
    from_config = build_student(config, embed_dim=12, vocab_size=40, image_size=32, resize_size=36)
    from_dict = build_student(config.to_dict(), embed_dim=12, vocab_size=40, image_size=32, resize_size=36)
    for model in (from_config, from_dict):
        assert model.config == StudentConfig.from_dict(
            {**config.to_dict(), "embed_dim": 12, "vocab_size": 40, "image_size": 32, "resize_size": 36,
             "text_pooling": "cls"}
        )
        assert model.vision.patch_embed.img_size == (32, 32)
        assert model.text.embeddings.word_embeddings.num_embeddings == 40
    with pytest.raises(ValueError, match="preset name .* a DualEncoderConfig or a dict, got int"):
        build_student(3, embed_dim=8, vocab_size=10)  # type: ignore[arg-type]


def test_demo_presets_sizes_for_the_embedded_demo() -> None:
    with torch.device("meta"):
        student = build_student("demo", embed_dim=256, vocab_size=100)
        teacher = build_student("demo_teacher", embed_dim=256, vocab_size=100)
    assert 0.5e6 <= student.num_parameters() <= 1e6
    assert 4e6 <= teacher.num_parameters() <= 5.5e6
    assert student.config.image_size == teacher.config.image_size == 48


def test_heads_are_xavier_normal_with_zero_bias() -> None:
    model = build_student("test", embed_dim=256, vocab_size=50)
    for head in (model.image_proj, model.text_proj):
        fan_out, fan_in = head.weight.shape
        expected_std = 1.414 * math.sqrt(2.0 / (fan_in + fan_out))
        assert torch.count_nonzero(head.bias) == 0
        assert abs(head.weight.std().item() / expected_std - 1) < 0.04  # 8,192 samples: 5 std errors
        assert abs(head.weight.mean().item()) < 0.02 * expected_std  # 5 standard errors


def test_text_pooling_pooler_and_cls() -> None:
    pixels, ids, mask = _inputs(build_student("test", embed_dim=8, vocab_size=40))
    pooled = build_student("test", embed_dim=8, vocab_size=40, text_pooling="pooler").eval()
    assert pooled.uses_pooler
    with torch.no_grad():
        hidden = pooled.text(input_ids=ids, attention_mask=mask).last_hidden_state
        # BERT's pooler written out: tanh(W h_CLS + b).
        dense = pooled.text.pooler.dense
        pooler_output = torch.tanh(hidden[:, 0] @ dense.weight.T + dense.bias)
        reference = F.normalize(pooled.text_proj(pooler_output), dim=-1)
        torch.testing.assert_close(pooled.encode_text(ids, mask), reference)

    cls = build_student("test", embed_dim=8, vocab_size=40, text_pooling="cls").eval()
    assert not cls.uses_pooler and cls.text.pooler is None
    assert not any(name.startswith("text.pooler") for name, _ in cls.named_parameters())
    with torch.no_grad():
        hidden = cls.text(input_ids=ids, attention_mask=mask).last_hidden_state
        reference = F.normalize(cls.text_proj(hidden[:, 0]), dim=-1)
        torch.testing.assert_close(cls.encode_text(ids, mask), reference)

    mean = build_student("test", embed_dim=8, vocab_size=40, text_pooling="mean").eval()
    assert not mean.uses_pooler and mean.text.pooler is None
    with torch.no_grad():
        hidden = mean.text(input_ids=ids, attention_mask=mask).last_hidden_state
        # Row 0 has 4 real tokens, row 1 all 7: each averaged over its own.
        averages = torch.stack([hidden[0, :4].mean(0), hidden[1].mean(0)])
        reference = F.normalize(mean.text_proj(averages), dim=-1)
        torch.testing.assert_close(mean.encode_text(ids, mask), reference)


def test_text_pooling_follows_the_text_weights(tmp_path: Path) -> None:
    assert resolve_text_pooling("auto", pretrained_text=True) == "pooler"
    assert resolve_text_pooling("auto", pretrained_text=False) == "cls"
    for explicit in ("pooler", "cls", "mean"):
        assert resolve_text_pooling(explicit, True) == resolve_text_pooling(explicit, False) == explicit
    with pytest.raises(ValueError, match="text_pooling must be one of"):
        resolve_text_pooling("max", False)

    # Every preset says auto; built without text weights that is the CLS state, with no pooler parameters.
    assert {config.text_pooling for config in PRESETS.values()} == {"auto"}
    random_text = build_student("test", embed_dim=8, vocab_size=30)
    assert random_text.config.text_pooling == "cls" and not random_text.uses_pooler
    assert random_text.text.pooler is None
    assert DualEncoder(dataclasses.replace(get_preset("test"), vocab_size=30)).config.text_pooling == "cls"
    # With pretrained text weights: BERT's pooler, loaded from them.
    BertModel(_tiny_bert_config()).save_pretrained(tmp_path / "bert")
    pretrained = build_student("test", embed_dim=8, vocab_size=30, text_weights=tmp_path / "bert")
    assert pretrained.config.text_pooling == "pooler" and pretrained.uses_pooler
    # An explicit value wins either way.
    assert build_student("test", embed_dim=8, vocab_size=30, text_pooling="pooler").uses_pooler
    cls = build_student("test", embed_dim=8, vocab_size=30, text_weights=tmp_path / "bert", text_pooling="cls")
    assert not cls.uses_pooler

    # A run's `student:` section, as the training workers and the export read it: the same rule.
    assert student_overrides({"text_pooling": "auto", "text_weights": None, "max_len": None}) == {"text_pooling": "cls"}
    assert student_overrides({"text_pooling": "auto", "text_weights": "bert-base-uncased", "max_len": 30}) == {
        "text_pooling": "pooler", "max_len": 30}
    assert student_overrides({"text_pooling": "cls", "text_weights": "bert-base-uncased"}) == {"text_pooling": "cls"}
    assert student_overrides({}) == {"text_pooling": "cls"}


def test_saved_students_keep_their_resolved_pooling(tmp_path: Path) -> None:
    BertModel(_tiny_bert_config()).save_pretrained(tmp_path / "bert")
    ids = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 3, 0, 0]])
    mask = (ids != 0).long()
    for name, weights, pooling in (("random", None, "cls"), ("pretrained", tmp_path / "bert", "pooler")):
        model = build_student("test", embed_dim=8, vocab_size=30, text_weights=weights).eval()
        saved = save_dual_encoder(model, tmp_path / name)
        assert json.loads((saved / "config.json").read_text())["student"]["text_pooling"] == pooling
        loaded, _, _ = load_dual_encoder(saved)
        assert loaded.config == model.config and loaded.uses_pooler == (pooling == "pooler")
        with torch.no_grad():
            assert torch.equal(loaded.encode_text(ids, mask), model.encode_text(ids, mask))
    # A file without the key (none is written so, but one may be hand-made) meant the pooler.
    config_path = tmp_path / "pretrained" / "config.json"
    payload = json.loads(config_path.read_text())
    del payload["student"]["text_pooling"]
    config_path.write_text(json.dumps(payload))
    assert read_saved_config(tmp_path / "pretrained")[0].text_pooling == "pooler"
    assert load_dual_encoder(tmp_path / "pretrained")[0].uses_pooler


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_padding_does_not_change_the_text_embedding(pooling: str) -> None:
    model = build_student("test", embed_dim=8, vocab_size=40, text_pooling=pooling).eval()
    ids = torch.tensor([[2, 7, 9, 3]])
    padded = torch.tensor([[2, 7, 9, 3, 0, 0, 0]])
    with torch.no_grad():
        short = model.encode_text(ids, torch.ones_like(ids))
        long = model.encode_text(padded, torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)


def test_config_round_trip_and_validation() -> None:
    config = get_preset("demo")
    assert StudentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown student config key\(s\) \['colour'\]"):
        StudentConfig.from_dict({**config.to_dict(), "colour": "red"})
    bad = {
        "text_pooling": ("max", "text_pooling must be one of"),
        "resize_size": (32, "resize_size must be an int >= image_size"),
        "embed_dim": (0, "embed_dim must be a positive int"),
        "interpolation": ("nearest", "interpolation must be one of"),
        "vision_kwargs": ({"num_classes": 3}, "may not set"),
        "text": ({"hidden_size": 8}, "model_type"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            StudentConfig.from_dict({**config.to_dict(), key: value})
    with pytest.raises(ValueError, match=r"max_position_embeddings \(32\) is smaller than .*max_len \(40\)"):
        build_student("demo", embed_dim=8, vocab_size=20, max_len=40)
    with pytest.raises(ValueError, match="not a timm model"):
        build_student("test", embed_dim=8, vocab_size=20, vision="no_such_vit")


def test_bad_model_inputs_are_rejected() -> None:
    model = build_student("test", embed_dim=8, vocab_size=40)
    with pytest.raises(ValueError, match=r"float pixels \[B, 3, 64, 64\].*preprocess_images"):
        model.encode_image(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float pixels"):
        model.encode_image(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="token id 40 >= student vocab_size 40"):
        model.encode_text(torch.tensor([[2, 40, 3]]), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        model.encode_text(torch.tensor([[2, 5, 3]]), torch.ones(1, 2, dtype=torch.long))
    # numpy token arrays (what encode_texts returns) are accepted.
    ids = np.array([[2, 5, 3]], dtype=np.int64)
    with torch.no_grad():
        model.eval()
        from_numpy = model.encode_text(ids, np.ones_like(ids))
        from_torch = model.encode_text(torch.from_numpy(ids), torch.ones(1, 3, dtype=torch.long))
        torch.testing.assert_close(from_numpy, from_torch)


# ---------------------------------------------------------------------------------------------------
# Saving and loading


def _tokenizer():
    captions = ["a red circle above a blue square", "two green triangles"]
    return build_wordpiece_tokenizer(captions, vocab_size=60)


def test_save_load_is_exact(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    model = build_student("test", embed_dim=16, vocab_size=len(tokenizer), text_pooling="cls")
    # Move off the initialisation so a loader that re-initialised would be caught.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    extra = {"teacher": "t", "step": 3}
    out = save_dual_encoder(model, tmp_path / "student", tokenizer=tokenizer, extra=extra)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "raydistill.dual_encoder" and meta["version"] == 1
    assert meta["student"] == model.config.to_dict() and meta["extra"] == {"teacher": "t", "step": 3}

    loaded, loaded_tokenizer, extra = load_dual_encoder(out)
    assert extra == {"teacher": "t", "step": 3}
    assert loaded.config == model.config and not loaded.training
    reference, restored = model.state_dict(), loaded.state_dict()
    assert reference.keys() == restored.keys()
    assert all(torch.equal(reference[k], restored[k]) for k in reference)

    model.eval()
    images = np.random.default_rng(0).integers(0, 256, size=(3, 70, 90, 3), dtype=np.uint8)
    texts = ["a red circle", "two blue squares above"]
    ids, mask = encode_texts(loaded_tokenizer, texts, max_len=12)
    np.testing.assert_array_equal(ids, encode_texts(tokenizer, texts, max_len=12)[0])
    with torch.no_grad():
        original = model.encode_image(model.preprocess_images(images))
        assert torch.equal(original, loaded.encode_image(loaded.preprocess_images(images)))
        assert torch.equal(model.encode_text(ids, mask), loaded.encode_text(ids, mask))


def test_save_replaces_an_existing_model_and_leaves_no_temporaries(tmp_path: Path) -> None:
    first = build_student("test", embed_dim=8, vocab_size=30)
    second = build_student("test", embed_dim=12, vocab_size=30)
    save_dual_encoder(first, tmp_path / "m", tokenizer=_tokenizer())
    save_dual_encoder(second, tmp_path / "m")  # no tokenizer this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded, tokenizer, extra = load_dual_encoder(tmp_path / "m")
    assert loaded.embed_dim == 12 and tokenizer is None and extra == {}
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_dual_encoder(first, tmp_path / "n", extra={"bad": object()})
    assert not (tmp_path / "n").exists()
    with pytest.raises(ValueError, match="needs a DualEncoder, got Linear"):
        save_dual_encoder(torch.nn.Linear(2, 2), tmp_path / "n")  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        save_dual_encoder(first, tmp_path / "file")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved dual encoder at .*nowhere"):
        load_dual_encoder(tmp_path / "nowhere")
    saved = save_dual_encoder(build_student("test", embed_dim=8, vocab_size=30), tmp_path / "m")
    config_text = (saved / "config.json").read_text()

    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_dual_encoder(saved)
    (saved / "config.json").write_text(json.dumps({"format": "something.else", "version": 1}))
    with pytest.raises(ValueError, match="format is 'something.else'"):
        load_dual_encoder(saved)
    (saved / "config.json").write_text(config_text.replace('"version": 1', '"version": 2'))
    with pytest.raises(ValueError, match="format version 2 is not supported"):
        load_dual_encoder(saved)
    # A config describing another architecture than the weights.
    (saved / "config.json").write_text(config_text.replace('"embed_dim": 8', '"embed_dim": 9'))
    with pytest.raises(ValueError, match=r"could not load .*model\.safetensors"):
        load_dual_encoder(saved)
    (saved / "config.json").write_text(config_text)

    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_dual_encoder(saved)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks .*model\.safetensors"):
        load_dual_encoder(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks .*config\.json"):
        load_dual_encoder(saved)


# ---------------------------------------------------------------------------------------------------
# Pretrained tower weights from local files


def _tiny_timm_vit(num_classes: int = 5, width: int = 32) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
        img_size=64, patch_size=16, embed_dim=width, depth=1, num_heads=2,
    ).eval()


def test_vision_weights_from_timm_checkpoints(tmp_path: Path) -> None:
    source = _tiny_timm_vit()
    state = source.state_dict()
    save_file(state, str(tmp_path / "vit.safetensors"))
    # A training checkpoint: nested and with DDP's prefix.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "vit.pth")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(pixels), pre_logits=True)

    for name in ("vit.safetensors", "vit.pth"):
        model = build_student("test", embed_dim=8, vocab_size=30).eval()
        report = load_vision_weights(model, tmp_path / name)
        assert report.ignored == ("head.bias", "head.weight")
        assert report.missing == report.unexpected == ()
        assert report.loaded == len(state) - 2
        with torch.no_grad():
            assert torch.equal(model.vision(pixels), expected)
            reference = F.normalize(model.image_proj(expected), dim=-1)
            torch.testing.assert_close(model.encode_image(pixels), reference)

    # Through build_student too.
    model = build_student("test", 8, 30, vision_weights=tmp_path / "vit.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(model.vision(pixels), expected)


def test_vision_weights_resample_position_embeddings(tmp_path: Path) -> None:
    # A checkpoint trained at 32 px (2 x 2 patches) loaded into the 64 px student (4 x 4 patches).
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0,
        img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
    )
    save_file(source.state_dict(), str(tmp_path / "vit32.safetensors"))
    model = build_student("test", embed_dim=8, vocab_size=30)
    report = load_vision_weights(model, tmp_path / "vit32.safetensors")
    assert report.missing == report.unexpected == ()
    assert model.vision.pos_embed.shape == (1, 17, 32)
    # The CLS position is kept; the 2 x 2 grid is resized to 4 x 4 (timm: antialiased bicubic).
    assert torch.equal(model.vision.pos_embed[0, 0], source.pos_embed[0, 0])
    old_grid = source.pos_embed[0, 1:].detach().reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(old_grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(model.vision.pos_embed[0, 1:].detach(), expected[0].permute(1, 2, 0).reshape(16, 32))
    assert torch.equal(model.vision.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_vision_weights_mismatches_and_bad_files(tmp_path: Path) -> None:
    model = build_student("test", embed_dim=8, vocab_size=30)
    before = {k: v.clone() for k, v in model.vision.state_dict().items()}

    save_file(_tiny_timm_vit(width=48).state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"wide\.safetensors does not fit the vision tower.*differ in shape"):
        load_vision_weights(model, tmp_path / "wide.safetensors")

    partial = {k: v for k, v in _tiny_timm_vit().state_dict().items() if k != "norm.weight"}
    partial["extra.weight"] = torch.zeros(2)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    message = r"1 missing key\(s\) \['norm.weight'\], 1 unexpected key\(s\) \['extra.weight'\]"
    with pytest.raises(ValueError, match=message):
        load_vision_weights(model, tmp_path / "partial.safetensors")
    # Nothing was copied by the failed loads.
    assert all(torch.equal(before[k], v) for k, v in model.vision.state_dict().items())
    report = load_vision_weights(model, tmp_path / "partial.safetensors", strict=False)
    assert report.missing == ("norm.weight",) and report.unexpected == ("extra.weight",)
    assert torch.equal(model.vision.norm.weight, before["norm.weight"])
    assert torch.equal(model.vision.cls_token, partial["cls_token"])

    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_vision_weights(model, tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"could not read weights file .*garbage\.pth"):
        load_vision_weights(model, tmp_path / "garbage.pth")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match=r"nostate\.pth holds no state dict"):
        load_vision_weights(model, tmp_path / "nostate.pth")


def test_vision_weights_from_a_saved_dual_encoder(tmp_path: Path) -> None:
    donor = build_student("test", embed_dim=8, vocab_size=30).eval()
    saved = save_dual_encoder(donor, tmp_path / "donor")
    model = build_student("test", embed_dim=16, vocab_size=50).eval()
    load_vision_weights(model, saved / "model.safetensors")
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.vision(pixels), donor.vision(pixels))


def _tiny_bert_config(vocab: int = 30) -> BertConfig:
    return BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )


def test_text_weights_from_a_hugging_face_directory(tmp_path: Path) -> None:
    source = BertModel(_tiny_bert_config()).eval()
    source.save_pretrained(tmp_path / "bert")
    ids = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = source(input_ids=ids, attention_mask=mask)

    model = build_student("test", embed_dim=8, vocab_size=30, text_weights=tmp_path / "bert").eval()
    with torch.no_grad():
        hidden = model.text(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(hidden, expected.last_hidden_state)
        torch.testing.assert_close(
            model.encode_text(ids, mask), F.normalize(model.text_proj(expected.pooler_output), dim=-1)
        )
    pooler_student = build_student("test", embed_dim=8, vocab_size=30, text_pooling="pooler")
    report = load_text_weights(pooler_student, tmp_path / "bert")
    assert report.missing == report.unexpected == report.ignored == ()

    # A masked-LM checkpoint has no pooler: an error for a pooler student, fine for a CLS one.
    BertForMaskedLM(_tiny_bert_config()).save_pretrained(tmp_path / "mlm")
    with pytest.raises(ValueError, match=r"mlm does not match the text tower .*pooler\.dense"):
        load_text_weights(pooler_student, tmp_path / "mlm")
    cls_student = build_student("test", embed_dim=8, vocab_size=30, text_pooling="cls")
    report = load_text_weights(cls_student, tmp_path / "mlm")
    assert report.missing == () and any(key.startswith("cls.predictions") for key in report.ignored)


def test_text_weights_errors(tmp_path: Path) -> None:
    model = build_student("test", embed_dim=8, vocab_size=30)
    with pytest.raises(FileNotFoundError, match=r"nothing.*config\.json"):
        load_text_weights(model, tmp_path / "nothing")
    BertModel(_tiny_bert_config(vocab=31)).save_pretrained(tmp_path / "vocab31")
    with pytest.raises(ValueError, match=r"word_embeddings.weight: file \(31, 32\) vs model \(30, 32\)"):
        load_text_weights(model, tmp_path / "vocab31")
    (tmp_path / "roberta").mkdir()
    (tmp_path / "roberta" / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="holds a 'roberta' model; the student's text tower is 'bert'"):
        load_text_weights(model, tmp_path / "roberta")


# ---------------------------------------------------------------------------------------------------
# Pretrained towers by name, from the Hugging Face cache (offline)


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Path], None]:
    """An offline Hugging Face cache under ``tmp_path`` that timm and transformers read; returns ``put(repo, folder)``.

    ``put`` lays the folder's files out as ``hf download`` leaves them: ``refs/main`` names a snapshot that
    holds the files. No network is touched (``HF_HUB_OFFLINE``).
    """
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def put(repo: str, folder: Path) -> None:
        entry = cache / f"models--{repo.replace('/', '--')}"
        commit = "0" * 40
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text(commit)
        snapshot = entry / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in folder.iterdir():
            shutil.copy(file, snapshot / file.name)

    return put


def test_tower_weights_by_name_come_from_the_hugging_face_cache(
    tmp_path: Path, hf_cache: Callable[[str, Path], None]
) -> None:
    # timm's ImageNet-21k ViT-Ti/16 (random values, its 21,843-class head included) where timm looks for it.
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=21843).eval()
    (tmp_path / "vit").mkdir()
    save_file(vit.state_dict(), str(tmp_path / "vit" / "model.safetensors"))
    hf_cache("timm/vit_tiny_patch16_224.augreg_in21k", tmp_path / "vit")
    bert = BertModel(_tiny_bert_config()).eval()
    bert.save_pretrained(tmp_path / "bert")
    hf_cache("acme/tiny-bert", tmp_path / "bert")

    model = build_student(
        "test", embed_dim=8, vocab_size=30, vision_kwargs={}, image_size=224, resize_size=224,
        vision_weights="vit_tiny_patch16_224.augreg_in21k", text_weights="acme/tiny-bert",
    ).eval()
    pixels = torch.randn(1, 3, 224, 224)
    ids = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        assert torch.equal(model.vision(pixels), vit.forward_head(vit.forward_features(pixels), pre_logits=True))
        expected = bert(input_ids=ids, attention_mask=mask)
        assert torch.equal(model.text(input_ids=ids, attention_mask=mask).pooler_output, expected.pooler_output)
    assert model.config.text_pooling == "pooler"
    report = load_vision_weights(model, "vit_tiny_patch16_224.augreg_in21k")
    assert report.source == "vit_tiny_patch16_224.augreg_in21k" and report.missing == report.unexpected == ()
    report = load_text_weights(model, "acme/tiny-bert")
    assert report.source == "acme/tiny-bert" and report.missing == report.unexpected == report.ignored == ()

    # Names that are not in the cache: the error says what to set.
    with pytest.raises(ValueError, match=r"(?s)student\.vision_weights 'vit_small_patch16_224\.augreg_in21k': "
                                         r"timm could not load.*hf download timm/vit_small_patch16_224\.augreg_in21k"
                                         r".*HF_HUB_OFFLINE=1.*a local timm checkpoint file"):
        load_vision_weights(model, "vit_small_patch16_224.augreg_in21k")
    with pytest.raises(ValueError, match=r"student\.vision_weights 'vit_tiny_patch16_224\.no_such_tag'"):
        load_vision_weights(model, "vit_tiny_patch16_224.no_such_tag")
    with pytest.raises(ValueError, match=r"(?s)student\.text_weights 'acme/absent-bert' is no local folder.*"
                                         r"hf download acme/absent-bert.*a local save_pretrained folder"):
        load_text_weights(model, "acme/absent-bert")
    # A cached model of another type.
    RobertaModel(RobertaConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40)).save_pretrained(tmp_path / "rob")
    hf_cache("acme/tiny-roberta", tmp_path / "rob")
    with pytest.raises(ValueError, match="tiny-roberta holds a 'roberta' model; the student's text tower is 'bert'"):
        load_text_weights(model, "acme/tiny-roberta")
    # A Path is always a path, and a string that is no name is a missing file, as before.
    with pytest.raises(FileNotFoundError, match="vit_tiny_patch16_224.augreg_in21k"):
        load_vision_weights(model, Path("vit_tiny_patch16_224.augreg_in21k"))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_vision_weights(model, str(tmp_path / "absent.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        load_text_weights(model, str(tmp_path / "absent"))


# ---------------------------------------------------------------------------------------------------
# Image preprocessing


def test_constant_image_gives_the_normalised_constant() -> None:
    images = np.full((2, 50, 70, 3), 128, dtype=np.uint8)
    images[..., 1] = 0
    images[..., 2] = 255
    out = preprocess_images(images, image_size=32, resize_size=40)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    for channel, value in enumerate((128, 0, 255)):
        expected = (value / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(out[:, channel], torch.full((2, 32, 32), expected))
    clip = preprocess_images(
        torch.from_numpy(images), 32, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic"
    )
    torch.testing.assert_close(clip[0, 0, 0, 0], torch.tensor((128 / 255 - CLIP_MEAN[0]) / CLIP_STD[0]))


def test_center_crop_without_resize_is_exact() -> None:
    # 4 x 6 image, shorter side already 4: only the centre crop (columns 1..4) applies.
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(1, 4, 6, 3)
    out = preprocess_images(image, image_size=4, mean=(0, 0, 0), std=(1, 1, 1))
    expected = image[0, :, 1:5, :].transpose(2, 0, 1) / 255.0
    torch.testing.assert_close(out[0], torch.from_numpy(expected).float())


@pytest.mark.parametrize(
    ("interpolation", "pil_filter"), [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)]
)
def test_resize_and_crop_match_a_pil_pipeline(interpolation: str, pil_filter: int) -> None:
    # Real COCO photos, one landscape (640 x 427) and one portrait (480 x 640), sized as a list.
    files = [LANDSCAPE_JPEG, PORTRAIT_JPEG]
    images = [np.asarray(Image.open(path).convert("RGB")) for path in files]
    out = preprocess_images(images, image_size=224, resize_size=256, interpolation=interpolation)
    assert out.shape == (2, 3, 224, 224)
    for image, got in zip(images, out):
        height, width = image.shape[:2]
        # Shorter side to 256, the other int(256 * long / short); then the centred 224 crop.
        if height <= width:
            new_w, new_h = int(256 * width / height), 256
        else:
            new_w, new_h = 256, int(256 * height / width)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), pil_filter), dtype=np.float64)
        top, left = int(round((new_h - 224) / 2)), int(round((new_w - 224) / 2))
        reference = resized[top : top + 224, left : left + 224]
        grey_levels = (got.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255
        difference = np.abs(grey_levels - reference)
        assert np.mean(difference <= 1.0 + 1e-3) >= (1.0 if interpolation == "bilinear" else 0.995)
        assert difference.mean() < 0.3


def test_batch_equals_per_image_and_model_method() -> None:
    images = np.random.default_rng(2).integers(0, 256, size=(3, 80, 100, 3), dtype=np.uint8)
    batch = preprocess_images(images, 64, resize_size=72)
    single = torch.cat([preprocess_images(images[i : i + 1], 64, resize_size=72) for i in range(3)])
    assert torch.equal(batch, single)
    model = build_student("test", embed_dim=8, vocab_size=30, resize_size=72)
    assert torch.equal(model.preprocess_images(images), batch)
    assert preprocess_images(np.zeros((0, 10, 10, 3), dtype=np.uint8), 8).shape == (0, 3, 8, 8)


def test_preprocess_rejects_bad_images() -> None:
    with pytest.raises(ValueError, match="dtype uint8"):
        preprocess_images(np.zeros((1, 8, 8, 3), dtype=np.float32), 8)
    with pytest.raises(ValueError, match=r"shape \[N, H, W, 3\].*\(1, 3, 8, 8\)"):
        preprocess_images(np.zeros((1, 3, 8, 8), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match=r"shape \[N, H, W, 3\]"):
        preprocess_images(np.zeros((8, 8, 3), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match=r"images\[1\] must be a uint8 \[H, W, 3\]"):
        preprocess_images([np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8)], 8)
    with pytest.raises(ValueError, match="resize_size must be an int >= image_size"):
        preprocess_images(np.zeros((1, 8, 8, 3), dtype=np.uint8), 8, resize_size=4)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        preprocess_images(np.zeros((1, 8, 8, 3), dtype=np.uint8), 8, interpolation="nearest")
    with pytest.raises(ValueError, match="array/tensor or a sequence of .*got str"):
        preprocess_images("image.jpg", 8)  # type: ignore[arg-type]
