"""The shared teacher interface: spec validation, devices, batching and normalisation, fingerprints."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from raydistill.models.teachers import TEACHER_KINDS, Teacher, TeacherSpec, load_teacher, teacher_fingerprint
from raydistill.models.teachers.base import hash_path, looks_like_path, resolve_device


def test_kinds() -> None:
    assert TEACHER_KINDS == ("beit3", "hf_clip", "open_clip", "raydistill")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "blip"}, r"teacher.kind: unknown kind 'blip'; allowed: \['beit3', 'hf_clip', 'open_clip', 'raydistill'\]"),
        ({"checkpoint": "x"}, r"teacher.kind is required; allowed: \['beit3'"),
        ({"kind": "hf_clip", "checkpoint": "x", "weights": "y"}, r"teacher.weights: unknown key; allowed keys: \['kind', 'checkpoint'"),
        ({"kind": "hf_clip", "checkpoint": "x", "size": "base"}, r"teacher.size is not used by kind 'hf_clip'; its keys: "
                                                                  r"\['batch_size', 'checkpoint', 'device', 'dtype', 'kind', 'max_len', 'tokenizer'\]"),
        ({"kind": "hf_clip"}, r"teacher.checkpoint is required for kind 'hf_clip'"),
        ({"kind": "raydistill", "checkpoint": ""}, r"teacher.checkpoint is required for kind 'raydistill'"),
        ({"kind": "open_clip", "checkpoint": "x.pt"}, r"teacher.arch is required for kind 'open_clip'"),
        ({"kind": "open_clip", "arch": "ViT-B-32", "size": "ViT-B-16"}, r"teacher.arch and teacher.size both name"),
        ({"kind": "open_clip", "arch": {"width": 3}}, r"teacher.arch for kind 'open_clip' must be a model name"),
        ({"kind": "beit3", "checkpoint": "a", "tokenizer": "b"}, r"teacher.size is required for kind 'beit3' \(allowed: 'base', 'large'\)"),
        ({"kind": "beit3", "checkpoint": "a", "tokenizer": "b", "arch": "large"}, r"teacher.arch for kind 'beit3' must be a mapping"),
        ({"kind": "hf_clip", "checkpoint": "x", "dtype": "fp8"}, r"teacher.dtype: unknown dtype 'fp8'; allowed: \['float32', 'bfloat16', 'float16'\]"),
        ({"kind": "hf_clip", "checkpoint": "x", "device": "gpu"}, r"teacher.device: unknown device 'gpu'; allowed: 'cpu', 'cuda', 'cuda:<index>' or 'auto'"),
        ({"kind": "hf_clip", "checkpoint": "x", "batch_size": 0}, r"teacher.batch_size must be a positive int, got 0"),
        ({"kind": "hf_clip", "checkpoint": "x", "batch_size": True}, r"teacher.batch_size must be a positive int, got True"),
        ({"kind": "hf_clip", "checkpoint": "x", "max_len": 2}, r"teacher.max_len must be an int >= 3, got 2"),
        ({"kind": "hf_clip", "checkpoint": 7}, r"teacher.checkpoint must be a path or a name, got 7"),
    ],
)
def test_invalid_specs_name_the_key_and_the_allowed_values(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_teacher(raw)


def test_a_valid_spec_keeps_its_values(tmp_path: Path) -> None:
    spec = TeacherSpec.from_mapping({"kind": "beit3", "checkpoint": tmp_path / "w.pth", "tokenizer": "beit3.spm",
                                     "size": "large", "dtype": "bfloat16", "device": "cuda:1", "batch_size": 8})
    assert spec.checkpoint == str(tmp_path / "w.pth") and spec.size == "large" and spec.max_len is None
    assert spec.as_dict()["batch_size"] == 8
    # open_clip's model name may come as `size` too (the run config's wording).
    assert TeacherSpec.from_mapping({"kind": "open_clip", "size": "ViT-B-32", "checkpoint": "openai"}).arch == "ViT-B-32"
    with pytest.raises(ValueError, match="teacher spec must be a mapping, got list"):
        TeacherSpec.from_mapping(["beit3"])


def test_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="teacher.device is 'cuda:0' but CUDA is not available here"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="teacher.device is 'cuda:2' but only 2 CUDA device"):
        resolve_device("cuda:2")


def _toy_teacher(calls: list[int], batch_size: int = 2) -> Teacher:
    """A teacher whose 'model' is fixed arithmetic, to check what the interface does around it."""

    def encode_images(images: np.ndarray) -> torch.Tensor:
        calls.append(len(images))
        flat = torch.from_numpy(images.reshape(len(images), -1)[:, :3].astype(np.float64))
        return (flat + 1).to(torch.bfloat16)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        return torch.tensor([[len(t), 1.0, 0.0] for t in texts], dtype=torch.float64)

    return Teacher(kind="toy", dim=3, image_size=4, fingerprint="f" * 64, batch_size=batch_size,
                   device=torch.device("cpu"), dtype=torch.bfloat16, encode_images=encode_images,
                   encode_texts=encode_texts)


def test_mini_batches_float32_and_unit_norm() -> None:
    calls: list[int] = []
    teacher = _toy_teacher(calls)
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    got = teacher.embed_images(images)
    assert calls == [2, 2, 1]
    assert got.dtype == np.float32 and got.shape == (5, 3)
    first = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)  # pixels 0, 1, 2 plus one
    np.testing.assert_allclose(got[0], first, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    texts = teacher.embed_texts(["abc", "abcd"])
    np.testing.assert_allclose(texts, [[3 / np.sqrt(10), 1 / np.sqrt(10), 0], [4 / np.sqrt(17), 1 / np.sqrt(17), 0]],
                               rtol=1e-6)
    assert teacher.embed_texts([]).shape == (0, 3) and calls[-1] == 2


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 4, 4, 3), np.float32), r"uint8 array of shape \[N, H, W, 3\], got shape \(2, 4, 4, 3\) dtype float32"),
        (np.zeros((4, 4, 3), np.uint8), r"got shape \(4, 4, 3\) dtype uint8"),
        (np.zeros((1, 4, 4, 4), np.uint8), r"got shape \(1, 4, 4, 4\)"),
        ([np.zeros((4, 4, 3), np.uint8)], r"got shape None dtype list"),
    ],
)
def test_bad_images_are_refused(images: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _toy_teacher([]).embed_images(images)


def test_bad_texts_are_refused() -> None:
    teacher = _toy_teacher([])
    with pytest.raises(ValueError, match="texts must be a list of strings, got str"):
        teacher.embed_texts("a cat")
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str, got int"):
        teacher.embed_texts(["a cat", 3])


def test_wrong_embedding_shape_from_an_adapter_is_reported() -> None:
    teacher = _toy_teacher([])
    teacher.dim = 4
    with pytest.raises(RuntimeError, match=r"toy teacher returned embeddings of shape \(2, 3\), expected \(2, 4\)"):
        teacher.embed_texts(["a", "b"])


def test_hash_path_of_files_and_folders(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        (folder / "sub").mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "sub" / "w.bin").write_bytes(b"\x01\x02")
    (two / ".cache").mkdir()
    (two / ".cache" / "lock").write_text("ignored")
    assert hash_path(one / "config.json") == hashlib.sha256(b"{}").hexdigest()
    assert hash_path(one) == hash_path(two)  # same files, other place; hidden files ignored
    (two / "sub" / "w.bin").write_bytes(b"\x01\x03")
    assert hash_path(one) != hash_path(two)
    (two / "sub" / "w.bin").write_bytes(b"\x01\x02")
    (two / "sub" / "w.bin").rename(two / "sub" / "v.bin")
    assert hash_path(one) != hash_path(two)  # names count, not only bytes


def test_fingerprint_is_order_free_and_sensitive() -> None:
    a = teacher_fingerprint("beit3", {"max_len": 64, "dtype": "float32"}, ["abc"])
    assert a == teacher_fingerprint("beit3", {"dtype": "float32", "max_len": 64}, ["abc"])
    assert a != teacher_fingerprint("beit3", {"dtype": "float32", "max_len": 65}, ["abc"])
    assert a != teacher_fingerprint("beit3", {"dtype": "float32", "max_len": 64}, ["abd"])
    assert a != teacher_fingerprint("hf_clip", {"dtype": "float32", "max_len": 64}, ["abc"])


@pytest.mark.parametrize(
    ("value", "is_path"),
    [("openai/clip-vit-base-patch32", False), ("laion2b_s34b_b79k", False), ("ViT-B-32", False),
     ("./models/clip", True), ("/abs/clip", True), ("runs/x/teacher", True), ("beit3.pth", True),
     ("~/w.safetensors", True)],
)
def test_paths_versus_hub_names(value: str, is_path: bool) -> None:
    assert looks_like_path(value) is is_path
