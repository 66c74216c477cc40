"""The `student:` and `train.adam_beta2` config keys: pretrained towers for the real recipes, checked fail-fast.

The tiny, small and base presets start from pretrained towers (DSMD.md: an ImageNet-21k ViT and a pretrained
BERT) unless the config says `student.from_scratch: true`; the CPU presets never need weights. Validation reads
no weights and touches no network: hub names are checked when the workers load them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from raydistill.config import ConfigError, StudentConfig, config_from_dict, load_config
from raydistill.models.student import build_student, get_preset

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    p for pattern in ("flickr30k-*.yaml", "coco-*.yaml", "cluster-*.yaml") for p in (REPO / "configs").glob(pattern)
)


def test_there_are_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"flickr30k-beit3-base.yaml", "coco-beit3-base.yaml",
                                         "cluster-flickr30k-beit3-base.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_real_recipe_names_the_pretrained_towers_of_its_preset(path: Path) -> None:
    student = load_config(path).student
    assert not student.from_scratch
    assert (student.vision_weights, student.text_weights) == StudentConfig.PRETRAINED_TOWERS[student.preset]
    assert student.tokenizer == student.text_weights  # the text tower's own vocabulary
    assert student.text_pooling == "auto"  # hence BERT's pooler, as in the reference


@pytest.mark.parametrize("preset", sorted(StudentConfig.PRETRAINED_TOWERS))
def test_the_named_towers_fit_their_preset(preset: str) -> None:
    vision, text = StudentConfig.PRETRAINED_TOWERS[preset]
    with torch.device("meta"):
        ours = build_student(preset, embed_dim=8, vocab_size=30522).vision.state_dict()
        theirs = timm.create_model(vision, pretrained=False, num_classes=0).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    # BERT's published sizes: bert-base-uncased is L-12 H-768 A-12; Google's small BERTs spell theirs out.
    layers, hidden, heads = (12, 768, 12) if text == "bert-base-uncased" else map(
        int, re.fullmatch(r"google/bert_uncased_L-(\d+)_H-(\d+)_A-(\d+)", text).groups())
    bert = get_preset(preset).text
    assert (bert["num_hidden_layers"], bert["hidden_size"], bert["num_attention_heads"]) == (layers, hidden, heads)
    assert bert["intermediate_size"] == 4 * hidden and bert["max_position_embeddings"] == 512


def test_a_large_preset_without_weights_stops_naming_the_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("student:\n  preset: base\n  tokenizer: bert-base-uncased\n  text_weights: bert-base-uncased\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: student: ")
    assert "student.preset=base starts from pretrained towers" in message
    assert "student.vision_weights is not set" in message
    assert "student.vision_weights: vit_base_patch16_224.augreg_in21k" in message
    assert "student.from_scratch: true" in message
    with pytest.raises(ConfigError, match=r"student.vision_weights and student.text_weights are not set.*"
                                          r"google/bert_uncased_L-4_H-256_A-4"):
        config_from_dict({"student": {"preset": "tiny"}})
    # On purpose from scratch, or a CPU preset: no weights needed.
    assert load_config(path, ["student.from_scratch=true"]).student.from_scratch
    for preset in ("test", "demo", "demo_teacher"):
        assert config_from_dict({"student": {"preset": preset}}).student.vision_weights is None


def test_text_weights_need_their_own_tokenizer() -> None:
    with pytest.raises(ConfigError, match=r"student.text_weights \(bert-base-uncased\) needs student.tokenizer"):
        config_from_dict({"student": {"preset": "test", "text_weights": "bert-base-uncased"}})


def test_text_pooling_and_adam_beta2_keys() -> None:
    cfg = config_from_dict({})
    assert cfg.student.text_pooling == "auto" and cfg.train.adam_beta2 == 0.999
    cfg = config_from_dict({"student": {"text_pooling": "pooler"}, "train": {"adam_beta2": 0.98}})
    assert cfg.student.text_pooling == "pooler" and cfg.train.adam_beta2 == 0.98
    with pytest.raises(ConfigError, match=r"student.text_pooling = 'max': Input should be 'auto', 'pooler', 'cls' or "
                                          r"'mean'"):
        config_from_dict({"student": {"text_pooling": "max"}})
    for bad in (1.0, 0):
        with pytest.raises(ConfigError, match=rf"train.adam_beta2 = {bad}"):
            config_from_dict({"train": {"adam_beta2": bad}})


def test_validating_the_recipes_loads_no_model_code() -> None:
    # Hub names stay names: validation imports neither timm nor transformers, so it needs no network or files.
    code = ("import sys; from raydistill.config import load_config; "
            f"[load_config(p) for p in {[str(p) for p in RECIPES]!r}]; "
            "print(sorted(m for m in ('timm', 'transformers', 'huggingface_hub', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
