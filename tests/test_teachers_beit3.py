"""The BEiT-3 teacher: official key names, the XLM-R id layout, the forward math and clear load errors.

Every model here is tiny (16-wide, 2 layers, 32 px) and saved the way unilm publishes its checkpoints
(``{"model": state_dict}`` in a torch file); the SentencePiece models are trained in the test.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image

from real_data import coco_captions, coco_image_batch
from raydistill.models.teachers import TeacherLoadError, load_teacher
from raydistill.models.teachers.beit3_arch import BEiT3Retrieval, make_config
from raydistill.models.teachers.xlmr_tokenizer import XLMRTokenizer

TINY = {"img_size": 32, "patch_size": 16, "vocab_size": 96, "encoder_embed_dim": 16, "encoder_layers": 2,
        "encoder_attention_heads": 2, "encoder_ffn_embed_dim": 32, "max_source_positions": 80}


# ---------------------------------------------------------------- helpers


def _train_spm(path: Path, sentences: list[str], model_type: str, vocab_size: int) -> Path:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        hard_vocab_limit=False, minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())
    return path


def _tiny_model(arch: dict, seed: int = 0) -> BEiT3Retrieval:
    """A BEiT-3 with every parameter random, so that swapping any A/B copy changes the output."""
    torch.manual_seed(seed)
    model = BEiT3Retrieval(make_config(None, arch))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.A.weight") or name.endswith("norm.B.weight") else 0.0, 0.3)
    return model.eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture
def caption_spm(tmp_path: Path) -> Path:
    return _train_spm(tmp_path / "beit3.spm", coco_captions(60), "unigram", 80)


@pytest.fixture
def word_spm(tmp_path: Path) -> Path:
    # Word frequencies 5, 4, 3, 2, 1 fix the ids: ▁a=3, ▁dog=4, ▁runs=5, ▁on=6, ▁beach=7.
    sentences = ["a dog runs on beach", "a dog runs on", "a dog runs", "a dog", "a"]
    return _train_spm(tmp_path / "word.spm", sentences, "word", 8)


# ---------------------------------------------------------------- names


def test_state_dict_has_the_official_key_names() -> None:
    model = BEiT3Retrieval(make_config(None, {**TINY, "encoder_layers": 1}))
    layer = "beit3.encoder.layers.0."
    per_way = [f"self_attn.{p}_proj.{w}.{t}" for p in ("q", "k", "v", "out") for w in "AB" for t in ("weight", "bias")]
    per_way += [f"{n}.{w}.{t}" for n in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm")
                for w in "AB" for t in ("weight", "bias")]
    per_way += [f"ffn.{w}.{m}.{t}" for w in "AB" for m in ("fc1", "fc2", "ffn_layernorm") for t in ("weight", "bias")]
    expected = {
        "beit3.text_embed.weight", "beit3.vision_embed.mask_token", "beit3.vision_embed.cls_token",
        "beit3.vision_embed.proj.weight", "beit3.vision_embed.proj.bias",
        "beit3.encoder.embed_positions.A.weight", "beit3.encoder.embed_positions.B.weight",
        "beit3.encoder.layer_norm.A.weight", "beit3.encoder.layer_norm.A.bias",
        "beit3.encoder.layer_norm.B.weight", "beit3.encoder.layer_norm.B.bias",
        "vision_head.weight", "language_head.weight", "logit_scale",
        *(layer + name for name in per_way),
    }
    state = model.state_dict()
    assert set(state) == expected
    # (32 / 16)^2 patches + [CLS] + the 2 fairseq offset rows; text rows = max_source_positions.
    assert state["beit3.encoder.embed_positions.A.weight"].shape == (4 + 1 + 2, 16)
    assert state["beit3.encoder.embed_positions.B.weight"].shape == (80, 16)
    assert state["vision_head.weight"].shape == (16, 16)
    assert state["logit_scale"].shape == ()


def test_presets_are_the_official_sizes() -> None:
    base, large = make_config("base"), make_config("large")
    assert (base.encoder_embed_dim, base.encoder_layers, base.encoder_attention_heads,
            base.encoder_ffn_embed_dim, base.vocab_size, base.max_source_positions) == (768, 12, 12, 3072, 64010, 1024)
    assert (large.encoder_embed_dim, large.encoder_layers, large.encoder_attention_heads,
            large.encoder_ffn_embed_dim) == (1024, 24, 16, 4096)
    with pytest.raises(ValueError, match="teacher.size.*'base', 'large'"):
        make_config("huge")
    with pytest.raises(ValueError, match="teacher.arch.embed_dim.*encoder_embed_dim"):
        make_config("base", {"embed_dim": 512})


# ---------------------------------------------------------------- tokenizer


def test_token_ids_by_hand(word_spm: Path) -> None:
    tokenizer = XLMRTokenizer(word_spm)
    # 8 SentencePiece pieces: <mask> = 8 + 1, and ids 0..9 are in use.
    assert (tokenizer.mask_id, tokenizer.vocab_size) == (9, 10)
    ids, padding = tokenizer.encode(["a dog runs on the beach", "a dog <mask>"], max_len=10)
    # <s>=0; ▁a 3->4, ▁dog 4->5, ▁runs 5->6, ▁on 6->7; "▁the" is unknown -> <unk>=3;
    # ▁beach 7->8; </s>=2; <pad>=1
    assert ids.tolist() == [[0, 4, 5, 6, 7, 3, 8, 2, 1, 1], [0, 4, 5, 9, 2, 1, 1, 1, 1, 1]]
    assert padding.tolist() == [[0] * 8 + [1] * 2, [0] * 5 + [1] * 5]
    assert ids.dtype == padding.dtype == np.int64
    # Cut to max_len - 2 tokens, then </s>, as the official _get_text_segment does.
    ids, padding = tokenizer.encode(["a dog runs on beach"], max_len=4)
    assert ids.tolist() == [[0, 4, 5, 2]] and padding.tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="text 1 .*no token"):
        tokenizer.encode(["a", "   "], max_len=8)


def test_token_ids_match_transformers_xlm_roberta(tmp_path: Path, caption_spm: Path) -> None:
    from transformers import XLMRobertaTokenizer

    folder = tmp_path / "xlmr"
    folder.mkdir()
    shutil.copy(caption_spm, folder / "sentencepiece.bpe.model")
    reference = XLMRobertaTokenizer.from_pretrained(folder)
    ours = XLMRTokenizer(caption_spm)
    texts = coco_captions(80)[60:] + ["Über 2 CAFÉS, 東京!!", "a man <mask> rides", "x"]
    for text in texts:
        assert ours.token_ids(text) == reference(text, add_special_tokens=False)["input_ids"], text
    assert ours.vocab_size == len(reference)


# ---------------------------------------------------------------- forward math


def _reference_encoder(
    state: dict, x: torch.Tensor, way: str, padding: torch.Tensor | None, heads: int
) -> torch.Tensor:
    """BEiT-3's encoder written out with explicit per-head loops (torchscale's math, eps 1e-5)."""

    def norm(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(h, h.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    def linear(h: torch.Tensor, name: str) -> torch.Tensor:
        return h @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    length, dim = x.shape[1], x.shape[2]
    h = x + state[f"beit3.encoder.embed_positions.{way}.weight"][2 : 2 + length]  # positions start at 2
    if padding is not None:
        h = h * (1 - padding[..., None].float())
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("beit3.encoder.layers."))
    head_dim = dim // heads
    for i in range(layers):
        p = f"beit3.encoder.layers.{i}."
        y = norm(h, p + f"self_attn_layer_norm.{way}")
        q = linear(y, p + f"self_attn.q_proj.{way}") * head_dim**-0.5
        k, v = linear(y, p + f"self_attn.k_proj.{way}"), linear(y, p + f"self_attn.v_proj.{way}")
        outputs = []
        for head in range(heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[..., cols] @ k[..., cols].transpose(1, 2)
            if padding is not None:
                scores = scores.masked_fill(padding[:, None, :].bool(), float("-inf"))
            outputs.append(scores.softmax(-1) @ v[..., cols])
        attn = norm(torch.cat(outputs, -1), p + f"self_attn.inner_attn_ln.{way}")
        h = h + linear(attn, p + f"self_attn.out_proj.{way}")
        y = norm(h, p + f"final_layer_norm.{way}")
        z = linear(y, p + f"ffn.{way}.fc1")
        z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # exact GELU
        h = h + linear(norm(z, p + f"ffn.{way}.ffn_layernorm"), p + f"ffn.{way}.fc2")
    return norm(h, f"beit3.encoder.layer_norm.{way}")


def _reference_image_embeddings(state: dict, images: np.ndarray, size: int, patch: int, heads: int) -> np.ndarray:
    # Official eval transform: PIL bicubic resize to size x size, ToTensor, Normalize(0.5, 0.5).
    pixels = np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BICUBIC)) for i in images])
    x = (torch.tensor(pixels, dtype=torch.float32) / 255 - 0.5) / 0.5  # [B, S, S, 3]
    grid = size // patch
    patches = x.reshape(len(x), grid, patch, grid, patch, 3).permute(0, 1, 3, 5, 2, 4).reshape(len(x), grid * grid, -1)
    weight = state["beit3.vision_embed.proj.weight"].reshape(len(state["beit3.vision_embed.proj.bias"]), -1)
    tokens = patches @ weight.T + state["beit3.vision_embed.proj.bias"]
    tokens = torch.cat([state["beit3.vision_embed.cls_token"].expand(len(x), 1, -1), tokens], 1)
    cls = _reference_encoder(state, tokens, "A", None, heads)[:, 0]
    out = cls @ state["vision_head.weight"].T
    return (out / out.norm(dim=-1, keepdim=True)).numpy()


def _reference_text_embeddings(state: dict, sp_path: Path, texts: list[str], max_len: int, heads: int) -> np.ndarray:
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    rows, pads = [], []
    for text in texts:
        pieces = [i + 1 if i else 3 for i in sp.encode(text)][: max_len - 2]  # fairseq offset, unk -> 3
        row = [0, *pieces, 2]
        pads.append([0] * len(row) + [1] * (max_len - len(row)))
        rows.append(row + [1] * (max_len - len(row)))
    ids, padding = torch.tensor(rows), torch.tensor(pads)
    cls = _reference_encoder(state, state["beit3.text_embed.weight"][ids], "B", padding, heads)[:, 0]
    out = cls @ state["language_head.weight"].T
    return (out / out.norm(dim=-1, keepdim=True)).numpy()


def test_embeddings_equal_the_reference_forward(tmp_path: Path, caption_spm: Path) -> None:
    model = _tiny_model(TINY)
    checkpoint = _save(model, tmp_path / "beit3_tiny_patch16_32_retrieval.pth")
    teacher = load_teacher({"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(caption_spm),
                            "arch": {k: v for k, v in TINY.items() if k != "img_size"}, "max_len": 12,
                            "batch_size": 2, "device": "cpu"})
    assert (teacher.kind, teacher.dim, teacher.image_size, teacher.max_len) == ("beit3", 16, 32, 12)

    images = coco_image_batch(5, 40, 48)  # not the model's size: the teacher resizes
    texts = coco_captions(5) + ["a very long caption " * 8]
    state = model.state_dict()
    got_images, got_texts = teacher.embed_images(images), teacher.embed_texts(texts)
    assert got_images.dtype == got_texts.dtype == np.float32
    assert got_images.shape == (5, 16) and got_texts.shape == (6, 16)
    np.testing.assert_allclose(got_images, _reference_image_embeddings(state, images, 32, 16, 2), atol=2e-5)
    np.testing.assert_allclose(got_texts, _reference_text_embeddings(state, caption_spm, texts, 12, 2), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got_texts, axis=1), 1.0, atol=1e-6)
    # Mini-batches of 2 give what one batch of 5 gives.
    np.testing.assert_allclose(got_images[3:], teacher.embed_images(images[3:]), atol=1e-6)
    assert teacher.embed_texts([]).shape == (0, 16)


def test_bfloat16_returns_float32_close_to_float32(tmp_path: Path, caption_spm: Path) -> None:
    checkpoint = _save(_tiny_model(TINY), tmp_path / "tiny.pth")
    spec = {"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(caption_spm), "arch": TINY,
            "device": "cpu"}
    full, half = load_teacher(spec), load_teacher({**spec, "dtype": "bfloat16"})
    images, texts = coco_image_batch(3, 32, 32), coco_captions(3)
    pairs = [(full.embed_images(images), half.embed_images(images)), (full.embed_texts(texts), half.embed_texts(texts))]
    for a, b in pairs:
        assert b.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-6)
        assert np.min(np.sum(a * b, axis=1)) > 0.99  # cosine between bf16 and fp32 embeddings
        assert not np.array_equal(a, b)  # the computation did run in bfloat16
    assert half.fingerprint != full.fingerprint


def test_resolution_is_read_from_the_checkpoint(tmp_path: Path, caption_spm: Path) -> None:
    checkpoint = _save(_tiny_model({**TINY, "img_size": 48}), tmp_path / "tiny48.pth")
    arch = {k: v for k, v in TINY.items() if k != "img_size"}
    teacher = load_teacher({"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(caption_spm),
                            "arch": arch, "device": "cpu"})
    assert teacher.image_size == 48
    assert teacher.embed_images(np.zeros((1, 10, 10, 3), np.uint8)).shape == (1, 16)


def test_fingerprint_follows_the_bytes_not_the_path(tmp_path: Path, caption_spm: Path) -> None:
    model = _tiny_model(TINY)
    spec = {"kind": "beit3", "checkpoint": str(_save(model, tmp_path / "a.pth")), "tokenizer": str(caption_spm),
            "arch": TINY, "device": "cpu"}
    first = load_teacher(spec).fingerprint
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    copy = shutil.copy(spec["checkpoint"], moved / "b.pth")
    assert load_teacher({**spec, "checkpoint": str(copy), "batch_size": 3}).fingerprint == first
    with torch.no_grad():
        model.vision_head.weight[0, 0] += 1.0
    changed = _save(model, tmp_path / "c.pth")
    assert load_teacher({**spec, "checkpoint": str(changed)}).fingerprint != first
    assert load_teacher({**spec, "max_len": 20}).fingerprint != first
    assert len(first) == 64 and int(first, 16) >= 0


# ---------------------------------------------------------------- errors


def test_checkpoint_of_another_size_names_file_and_shapes(tmp_path: Path, caption_spm: Path) -> None:
    wide = {**TINY, "encoder_embed_dim": 24, "encoder_ffn_embed_dim": 48}
    checkpoint = _save(_tiny_model(wide), tmp_path / "wide.pth")
    with pytest.raises(TeacherLoadError) as error:
        load_teacher({"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(caption_spm), "arch": TINY})
    message = str(error.value)
    assert "wide.pth" in message and "shape mismatches" in message
    assert "beit3.text_embed.weight: checkpoint (96, 24) vs model (96, 16)" in message
    assert "encoder_embed_dim=24" in message  # what the file actually holds

    # A base-size spec on a tiny file: the layer count differs too.
    message = r"wide\.pth.*400 missing keys: \[.beit3\.encoder\.layers\.2\..*encoder_layers=2"
    with pytest.raises(TeacherLoadError, match=message):
        load_teacher({"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(caption_spm), "size": "base"})


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path, caption_spm: Path) -> None:
    state = _tiny_model(TINY).state_dict()
    del state["vision_head.weight"]
    state["beit3.encoder.output_projection.weight"] = torch.zeros(96, 16)
    checkpoint = tmp_path / "edited.pth"
    torch.save({"model": state}, checkpoint)
    with pytest.raises(TeacherLoadError) as error:
        load_teacher({"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(caption_spm), "arch": TINY})
    message = str(error.value)
    assert "edited.pth" in message
    assert "1 missing keys: ['vision_head.weight']" in message
    assert "1 unexpected keys: ['beit3.encoder.output_projection.weight']" in message

    torch.save({"model": {"visual.proj": torch.zeros(4, 4)}}, tmp_path / "clip.pth")
    with pytest.raises(TeacherLoadError, match="clip.pth.*not look like a BEiT-3"):
        load_teacher({"kind": "beit3", "checkpoint": str(tmp_path / "clip.pth"), "tokenizer": str(caption_spm),
                      "arch": TINY})


def test_missing_corrupt_or_foreign_files(tmp_path: Path, caption_spm: Path) -> None:
    good = _save(_tiny_model(TINY), tmp_path / "good.pth")
    base = {"kind": "beit3", "tokenizer": str(caption_spm), "arch": TINY}
    with pytest.raises(TeacherLoadError, match=r"teacher.checkpoint: BEiT-3 checkpoint .*absent\.pth does not exist"):
        load_teacher({**base, "checkpoint": str(tmp_path / "absent.pth")})
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(TeacherLoadError, match=r"corrupt\.pth cannot be read as a torch checkpoint"):
        load_teacher({**base, "checkpoint": str(corrupt)})
    torch.save({"model": {"note": "not tensors"}}, tmp_path / "strings.pth")
    with pytest.raises(TeacherLoadError, match=r"strings\.pth holds no BEiT-3 state dict"):
        load_teacher({**base, "checkpoint": str(tmp_path / "strings.pth")})

    with pytest.raises(ValueError, match="teacher.tokenizer is required for kind 'beit3'"):
        load_teacher({"kind": "beit3", "checkpoint": str(good), "arch": TINY})
    with pytest.raises(TeacherLoadError, match=r"teacher.tokenizer: .*no\.spm does not exist"):
        load_teacher({**base, "checkpoint": str(good), "tokenizer": str(tmp_path / "no.spm")})
    bad_spm = tmp_path / "bad.spm"
    bad_spm.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TeacherLoadError, match=r"teacher.tokenizer: .*bad\.spm is not a SentencePiece model"):
        load_teacher({**base, "checkpoint": str(good), "tokenizer": str(bad_spm)})


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path, caption_spm: Path) -> None:
    small = {**TINY, "vocab_size": 20}
    largest = XLMRTokenizer(caption_spm).vocab_size - 1  # the caption model has ~80 pieces
    assert largest >= 20
    checkpoint = _save(_tiny_model(small), tmp_path / "small_vocab.pth")
    message = rf"beit3\.spm produces ids up to {largest} .*small_vocab\.pth has only 20"
    with pytest.raises(TeacherLoadError, match=message):
        load_teacher({"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(caption_spm), "arch": small})
    checkpoint = _save(_tiny_model(TINY), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="teacher.max_len: 100 exceeds the 78 text positions"):
        load_teacher({"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(caption_spm), "arch": TINY,
                      "max_len": 100})
