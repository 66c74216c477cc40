"""The ``raydistill`` teacher: a dual encoder saved by ``save_dual_encoder`` and loaded as a teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from real_data import BERT_VOCAB, coco_captions, coco_image_batch
from raydistill.models.student import build_student, save_dual_encoder
from raydistill.models.teachers import TeacherLoadError, load_teacher
from raydistill.models.tokenizers import encode_texts, tokenizer_from_vocab


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = tokenizer_from_vocab(BERT_VOCAB)
    torch.manual_seed(0)
    model = build_student("test", embed_dim=16, vocab_size=tokenizer.vocab_size).eval()
    folder = save_dual_encoder(model, tmp_path_factory.mktemp("rd") / "teacher", tokenizer=tokenizer)
    return folder, model, tokenizer


def test_matches_the_model_called_directly(saved) -> None:
    folder, model, tokenizer = saved
    teacher = load_teacher({"kind": "raydistill", "checkpoint": str(folder), "batch_size": 2, "device": "cpu"})
    assert (teacher.kind, teacher.dim, teacher.image_size, teacher.max_len) == ("raydistill", 16, 64, 30)
    images, texts = coco_image_batch(5, 48, 80), coco_captions(5)
    with torch.no_grad():
        expected_images = model.encode_image(model.preprocess_images(images)).numpy()
        ids, mask = encode_texts(tokenizer, texts, 30)
        expected_texts = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(teacher.embed_images(images), expected_images, atol=1e-5)
    np.testing.assert_allclose(teacher.embed_texts(texts), expected_texts, atol=1e-5)
    half = load_teacher({"kind": "raydistill", "checkpoint": str(folder), "dtype": "bfloat16", "device": "cpu"})
    assert half.fingerprint != teacher.fingerprint
    assert np.min(np.sum(half.embed_texts(texts) * expected_texts, axis=1)) > 0.99


def test_load_errors_name_the_checkpoint(saved, tmp_path: Path) -> None:
    folder, model, _ = saved
    with pytest.raises(TeacherLoadError, match=r"raydistill checkpoint .*absent does not exist"):
        load_teacher({"kind": "raydistill", "checkpoint": str(tmp_path / "absent")})
    no_tokenizer = save_dual_encoder(model, tmp_path / "no-tokenizer")
    with pytest.raises(TeacherLoadError, match=r"no-tokenizer was saved without its tokenizer"):
        load_teacher({"kind": "raydistill", "checkpoint": str(no_tokenizer)})
    broken = save_dual_encoder(model, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(TeacherLoadError, match=r"cannot load a raydistill dual encoder from .*broken: .*config\.json"):
        load_teacher({"kind": "raydistill", "checkpoint": str(broken)})
