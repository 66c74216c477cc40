"""The ``open_clip`` teacher on a tiny model registered from a model-config JSON file.

Weights are saved as open_clip reads them (a state dict in a ``.pt`` file, or ``.safetensors``); the
tokenizer is open_clip's own byte-pair tokenizer, which ships with the package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from real_data import coco_captions, coco_image_batch
from raydistill.models.teachers import TeacherLoadError, load_teacher

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _config_file(folder: Path, name: str, cfg: dict) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(model-config JSON, .pt weights, .safetensors weights) of one tiny CLIP."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    config = _config_file(folder, "raydistill-test-tiny-clip", TINY_CFG)
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("raydistill-test-tiny-clip")
    torch.save(model.state_dict(), folder / "tiny.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny.safetensors"))
    return config, folder / "tiny.pt", folder / "tiny.safetensors"


@pytest.mark.parametrize("weights", [1, 2], ids=["pt", "safetensors"])
def test_matches_the_model_called_directly(tiny: tuple[Path, Path, Path], weights: int) -> None:
    import open_clip

    config, checkpoint = tiny[0], tiny[weights]
    teacher = load_teacher({"kind": "open_clip", "arch": str(config), "checkpoint": str(checkpoint),
                            "batch_size": 2, "device": "cpu"})
    assert (teacher.kind, teacher.dim, teacher.image_size) == ("open_clip", 16, 32)

    model, _, preprocess = open_clip.create_model_and_transforms("raydistill-test-tiny-clip", pretrained=str(tiny[1]))
    tokenizer = open_clip.get_tokenizer("raydistill-test-tiny-clip")
    images, texts = coco_image_batch(5, 40, 60), coco_captions(5)
    with torch.no_grad():
        image_emb = model.eval().encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in images]))
        text_emb = model.encode_text(tokenizer(texts))
    np.testing.assert_allclose(teacher.embed_images(images), (image_emb / image_emb.norm(dim=-1, keepdim=True)).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(teacher.embed_texts(texts), (text_emb / text_emb.norm(dim=-1, keepdim=True)).numpy(),
                               atol=1e-5)


def test_fingerprint_tracks_weights_and_dtype(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    config, pt, _ = tiny
    spec = {"kind": "open_clip", "arch": str(config), "checkpoint": str(pt), "device": "cpu"}
    first = load_teacher(spec)
    assert first.fingerprint == load_teacher({**spec, "batch_size": 5}).fingerprint
    half = load_teacher({**spec, "dtype": "bfloat16"})
    assert half.fingerprint != first.fingerprint
    assert half.embed_texts(["a cat"]).dtype == np.float32
    state = torch.load(pt, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, tmp_path / "other.pt")
    assert load_teacher({**spec, "checkpoint": str(tmp_path / "other.pt")}).fingerprint != first.fingerprint


def test_weights_of_another_dimension_or_depth_name_the_file(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import open_clip

    for name, change, problem in (
        ("raydistill-test-dim24", {"embed_dim": 24}, r"size mismatch for text_projection"),
        ("raydistill-test-deeper", {"vision_cfg": {**TINY_CFG["vision_cfg"], "layers": 2}}, r"Unexpected key"),
    ):
        open_clip.add_model_config(_config_file(tmp_path, name, {**TINY_CFG, **change}))
        torch.save(open_clip.create_model(name).state_dict(), tmp_path / f"{name}.pt")
        with pytest.raises(TeacherLoadError, match=rf"(?s)open_clip cannot load .*{name}\.pt into model "
                                                   rf"'raydistill-test-tiny-clip': RuntimeError: .*{problem}"):
            load_teacher({"kind": "open_clip", "arch": str(tiny[0]), "checkpoint": str(tmp_path / f"{name}.pt")})


def test_missing_corrupt_and_unknown(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    config = str(tiny[0])
    with pytest.raises(TeacherLoadError, match=r"open_clip weights file .*absent\.pt does not exist"):
        load_teacher({"kind": "open_clip", "arch": config, "checkpoint": str(tmp_path / "absent.pt")})
    (tmp_path / "corrupt.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(TeacherLoadError, match=r"open_clip cannot load .*corrupt\.pt"):
        load_teacher({"kind": "open_clip", "arch": config, "checkpoint": str(tmp_path / "corrupt.pt")})
    with pytest.raises(TeacherLoadError, match=r"model-config file .*absent\.json does not exist"):
        load_teacher({"kind": "open_clip", "arch": str(tmp_path / "absent.json"), "checkpoint": str(tiny[1])})
    with pytest.raises(TeacherLoadError, match=r"open_clip has no model 'ViT-Q-99'"):
        load_teacher({"kind": "open_clip", "arch": "ViT-Q-99", "checkpoint": str(tiny[1])})
    with pytest.raises(TeacherLoadError, match=r"'laion9b' is neither an existing file nor a pretrained tag of 'ViT-B-32'"
                                               r" \(its tags: \[.*'openai'"):
        load_teacher({"kind": "open_clip", "arch": "ViT-B-32", "checkpoint": "laion9b"})
    with pytest.raises(TeacherLoadError, match=r"teacher.checkpoint is required for open_clip model 'ViT-B-32'"):
        load_teacher({"kind": "open_clip", "arch": "ViT-B-32"})
