"""The ``hf_clip`` teacher on tiny CLIP and SigLIP models saved with ``save_pretrained``.

The CLIP text tower uses the real BERT uncased vocabulary (committed in tests/data) as its tokenizer; SigLIP
uses its own SentencePiece tokenizer class over a SentencePiece model trained in the test.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from real_data import BERT_VOCAB, coco_captions, coco_image_batch
from raydistill.models.teachers import TeacherLoadError, load_teacher


def _bert_tokenizer(max_len: int):
    """BERT uncased WordPiece from the real vocab.txt, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    lines = BERT_VOCAB.read_text(encoding="utf-8").splitlines()
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(lines)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=max_len)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 20, "bos_token_id": 101,
                     "eos_token_id": 102, "pad_token_id": 0},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 48,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=24,
    )
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    _bert_tokenizer(20).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(coco_captions(60)), model_writer=buffer, vocab_size=90,
        model_type="unigram", character_coverage=1.0, unk_id=2, eos_id=1, pad_id=0, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", num_threads=1, hard_vocab_limit=False, minloglevel=2,
    )
    tmp_path = tmp_path_factory.mktemp("siglip")
    spm_file = tmp_path / "spiece.model"
    spm_file.write_bytes(buffer.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(spm_file), model_max_length=16, pad_token="<pad>")
    config = SiglipConfig(
        text_config={"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 48,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    folder = tmp_path / "tiny-siglip"
    torch.manual_seed(0)
    SiglipModel(config).eval().save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> np.ndarray:
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def test_clip_matches_the_model_called_directly(clip_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    teacher = load_teacher({"kind": "hf_clip", "checkpoint": str(clip_dir), "batch_size": 2, "device": "cpu"})
    assert (teacher.kind, teacher.dim, teacher.image_size, teacher.max_len) == ("hf_clip", 24, 32, 20)
    images, texts = coco_image_batch(5, 40, 48), coco_captions(5)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
        expected_images = _unit(_features(model.get_image_features(pixel_values=pixels)))
        # Dynamic padding here: CLIP pools at [SEP] under an attention mask, so the adapter's
        # fixed-length padding must give the same embeddings (both truncate at the model's 20 positions).
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=20, return_tensors="pt")
        expected_texts = _unit(_features(model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])))
    np.testing.assert_allclose(teacher.embed_images(images), expected_images, atol=1e-5)
    np.testing.assert_allclose(teacher.embed_texts(texts), expected_texts, atol=1e-5)
    assert teacher.embed_texts(texts).dtype == np.float32


def test_siglip_matches_the_model_called_directly(siglip_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    teacher = load_teacher({"kind": "hf_clip", "checkpoint": str(siglip_dir), "batch_size": 3, "device": "cpu"})
    assert (teacher.dim, teacher.image_size, teacher.max_len) == (32, 32, 16)
    images, texts = coco_image_batch(4, 50, 30), coco_captions(4) + ["a dog " * 20]

    model = SiglipModel.from_pretrained(siglip_dir).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(siglip_dir), AutoTokenizer.from_pretrained(siglip_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
        expected_images = _unit(_features(model.get_image_features(pixel_values=pixels)))
        # SigLIP's documented usage: pad to the maximum length.
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        expected_texts = _unit(_features(model.get_text_features(**tokens)))
    np.testing.assert_allclose(teacher.embed_images(images), expected_images, atol=1e-5)
    np.testing.assert_allclose(teacher.embed_texts(texts), expected_texts, atol=1e-5)


def test_bfloat16_and_fingerprints(clip_dir: Path) -> None:
    spec = {"kind": "hf_clip", "checkpoint": str(clip_dir), "device": "cpu"}
    full, half = load_teacher(spec), load_teacher({**spec, "dtype": "bfloat16"})
    texts = coco_captions(3)
    a, b = full.embed_texts(texts), half.embed_texts(texts)
    assert b.dtype == np.float32 and np.min(np.sum(a * b, axis=1)) > 0.99 and not np.array_equal(a, b)
    assert full.fingerprint == load_teacher({**spec, "batch_size": 7}).fingerprint
    assert full.fingerprint != half.fingerprint
    assert full.fingerprint != load_teacher({**spec, "max_len": 12}).fingerprint


def test_separate_tokenizer_directory(tmp_path: Path, clip_dir: Path) -> None:
    clip_dir = Path(shutil.copytree(clip_dir, tmp_path / "tiny-clip"))
    tokenizer_dir = tmp_path / "tokenizer-only"
    _bert_tokenizer(20).save_pretrained(tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (clip_dir / name).unlink(missing_ok=True)
    with pytest.raises(TeacherLoadError, match=r"teacher.checkpoint: the tokenizer loaded from .*tiny-clip knows no words"):
        load_teacher({"kind": "hf_clip", "checkpoint": str(clip_dir), "device": "cpu"})
    teacher = load_teacher({"kind": "hf_clip", "checkpoint": str(clip_dir), "tokenizer": str(tokenizer_dir),
                            "device": "cpu"})
    assert teacher.embed_texts(["a cat"]).shape == (1, 24)


def test_load_errors_name_the_source(tmp_path: Path, clip_dir: Path) -> None:
    clip_dir = Path(shutil.copytree(clip_dir, tmp_path / "tiny-clip"))
    with pytest.raises(TeacherLoadError, match=r"teacher.checkpoint: .*no-such-model does not exist"):
        load_teacher({"kind": "hf_clip", "checkpoint": str(tmp_path / "no-such-model")})

    # Weights of another width than the config declares.
    config = json.loads((clip_dir / "config.json").read_text())
    config["projection_dim"] = 40
    (clip_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherLoadError, match=r"the weights in .*tiny-clip do not fit .*2 shape mismatches: "
                       r"\['(text|visual)_projection.weight: checkpoint \(24, 32\) vs model \(40, 32\)'"):
        load_teacher({"kind": "hf_clip", "checkpoint": str(clip_dir)})

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    config["projection_dim"] = 24
    (corrupt / "config.json").write_text(json.dumps(config))
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(TeacherLoadError, match=r"cannot load a transformers model from .*corrupt"):
        load_teacher({"kind": "hf_clip", "checkpoint": str(corrupt)})


def test_a_model_that_is_not_a_dual_encoder(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    with pytest.raises(TeacherLoadError, match=r"bert holds a BertModel, which is not an image-text dual encoder"):
        load_teacher({"kind": "hf_clip", "checkpoint": str(folder)})


def test_input_side_falls_back_to_the_image_processor() -> None:
    from types import SimpleNamespace

    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from raydistill.models.teachers.hf_clip import _image_side

    no_vision_config = SimpleNamespace()
    clip = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 30, "width": 30})
    assert _image_side(no_vision_config, clip, "m") == 30  # the centre crop is what the model sees
    assert _image_side(no_vision_config, SiglipImageProcessor(size={"height": 28, "width": 28}), "m") == 28
    assert _image_side(SimpleNamespace(vision_config=SimpleNamespace(image_size=224)), clip, "m") == 224
    with pytest.raises(TeacherLoadError, match=r"m: only square inputs are supported, the model takes \(20, 22\)"):
        _image_side(no_vision_config, SimpleNamespace(crop_size={"height": 20, "width": 22}), "m")
