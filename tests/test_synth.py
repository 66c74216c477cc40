"""The synthetic captioned-scenes dataset: determinism, captions that agree with the pixels, safe caching."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from raydistill.data import synth
from raydistill.data.images import decode_image
from raydistill.data.sources import read_karpathy
from raydistill.data.synth import (
    BACKGROUNDS,
    PALETTE,
    REGION_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    ensure_synth_dataset,
    generate_scenes,
    params_hash,
    shared_caption_fraction,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_images": 40, "image_size": 48, "seed": 3}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("synth") / "ds", **SMALL)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- format


def test_karpathy_format_and_reader(small_dataset: Path):
    document = json.loads(small_dataset.read_text())
    assert document["dataset"] == "synth" and len(document["images"]) == 40
    sentids = []
    for index, item in enumerate(document["images"]):
        assert item["filename"] == f"synth_{index:06d}.jpg" and item["imgid"] == index
        assert 3 <= len(item["sentences"]) <= 5
        assert len({s["raw"] for s in item["sentences"]}) == len(item["sentences"])  # paraphrases, not copies
        assert item["sentids"] == [s["sentid"] for s in item["sentences"]]
        for sentence in item["sentences"]:
            assert sentence["imgid"] == index
            # Karpathy tokens: lower-cased alphanumeric runs
            assert sentence["tokens"] == [t for t in re.split("[^a-z0-9]+", sentence["raw"].lower()) if t]
        sentids += item["sentids"]
    assert sentids == list(range(len(sentids)))

    records = read_karpathy(small_dataset, small_dataset.parent / "images")
    assert Counter(r["split"] for r in records) == {"train": 32, "val": 4, "test": 4}
    assert [r["image_id"] for r in records] == [f"synth_{i:06d}" for i in range(40)]
    assert all(decode_image(r["path"]).shape == (48, 48, 3) for r in records)
    assert (small_dataset.parent / "COMPLETE").is_file()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, small_dataset: Path):
    again = generate_scenes(tmp_path / "again", **SMALL)
    assert _files(again.parent) == _files(small_dataset.parent)
    other = generate_scenes(tmp_path / "other", **{**SMALL, "seed": 4})
    assert other.read_bytes() != small_dataset.read_bytes()
    assert (other.parent / "images" / "synth_000000.jpg").read_bytes() != \
        (small_dataset.parent / "images" / "synth_000000.jpg").read_bytes()


def test_split_fractions_and_caption_counts(tmp_path: Path):
    path = generate_scenes(tmp_path / "d", n_images=20, image_size=32, captions_per_image=(2, 2),
                           split_fractions=(0.5, 0.5, 0.0), seed=1)
    records = read_karpathy(path, path.parent / "images")
    assert Counter(r["split"] for r in records) == {"train": 10, "val": 10}
    assert all(len(r["captions"]) == 2 for r in records)


# ---------------------------------------------------------------------------------------------- agreement


def _nearest(colour: np.ndarray, named: dict[str, tuple[int, int, int]]) -> str:
    return min(named, key=lambda name: np.abs(colour.astype(int) - np.array(named[name])).sum())


def test_pixels_agree_with_the_scene(small_dataset: Path):
    document = json.loads(small_dataset.read_text())
    backgrounds = {f"bg{k}": tuple(c) for k, c in enumerate(BACKGROUNDS)}
    for item in document["images"]:
        image = decode_image(small_dataset.parent / "images" / item["filename"])
        scene = item["scene"]
        for shape in scene["shapes"]:
            x, y = shape["center"]
            assert _nearest(image[y, x], {**PALETTE, **backgrounds}) == shape["color"], (item["filename"], shape)
            assert np.abs(image[y, x].astype(int) - PALETTE[shape["color"]]).max() <= 40
        corner = image[0, 0]  # shapes keep 1 px from the border, so the corner is background
        np.testing.assert_allclose(corner.astype(int), scene["background"], atol=8)


def _relation_holds(relation: str, a: dict, b: dict) -> bool:
    """Naive reference: a is clearly `relation` b (y grows downwards)."""
    dx = b["center"][0] - a["center"][0]
    dy = b["center"][1] - a["center"][1]
    return {
        "left of": dx > 0 and abs(dx) >= 2 * abs(dy),
        "right of": dx < 0 and abs(dx) >= 2 * abs(dy),
        "above": dy > 0 and abs(dy) >= 2 * abs(dx),
        "below": dy < 0 and abs(dy) >= 2 * abs(dx),
    }[relation]


def _phrase_pattern() -> tuple[re.Pattern, dict[str, str], dict[str, str], dict[str, str]]:
    size_of = {w: size for size, words in SIZE_WORDS.items() for w in words}
    shape_of = {w: shape for shape, words in SHAPE_WORDS.items() for w in words}
    relation_of = {w: rel for rel, words in RELATION_WORDS.items() for w in words}

    def alternation(words):
        return "|".join(sorted(map(re.escape, words), key=len, reverse=True))

    noun = rf"(?:a|the) ({alternation(size_of)}) ({alternation(PALETTE)}) ({alternation(shape_of)})"
    clause = re.compile(rf"{noun} (?:is |sits )?({alternation(relation_of)}) {noun}")
    return clause, size_of, shape_of, relation_of


def test_captions_agree_with_the_scene(tmp_path: Path):
    path = generate_scenes(tmp_path / "d", n_images=120, image_size=48, seed=11)
    document = json.loads(path.read_text())
    clause, size_of, shape_of, relation_of = _phrase_pattern()
    noun = re.compile(rf"(?:a|the) ({'|'.join(size_of)}) ({'|'.join(PALETTE)}) "
                      rf"({'|'.join(sorted(shape_of, key=len, reverse=True))})")
    region_of = {w: region for region, words in REGION_WORDS.items() for w in words}
    where = re.compile(rf"\b({'|'.join(sorted(map(re.escape, region_of), key=len, reverse=True))})\b")
    shape_counts = Counter()
    for item in document["images"]:
        shapes = item["scene"]["shapes"]
        shape_counts[len(shapes)] += 1
        by_description = {(s["size"], s["color"], s["shape"]): s for s in shapes}
        assert len(by_description) == len(shapes)  # no two shapes share size, colour and shape
        for relation in item["scene"]["relations"]:
            assert _relation_holds(relation["relation"], shapes[relation["subject"]], shapes[relation["object"]])
        for sentence in item["sentences"]:
            raw = sentence["raw"]
            mentioned = {(size_of[z], c, shape_of[s]) for z, c, s in noun.findall(raw)}
            assert mentioned == set(by_description), raw
            clauses = clause.findall(raw)
            assert len(clauses) == len(shapes) - 1, raw
            said = [region_of[words] for words in where.findall(raw)]
            assert said == ([_region(shapes[0]["center"], 48)] if len(shapes) == 1 else []), raw
            for size_a, colour_a, shape_a, relation, size_b, colour_b, shape_b in clauses:
                a = by_description[(size_of[size_a], colour_a, shape_of[shape_a])]
                b = by_description[(size_of[size_b], colour_b, shape_of[shape_b])]
                assert _relation_holds(relation_of[relation], a, b), raw
    assert set(shape_counts) == {1, 2, 3}  # every scene complexity occurs


def _region(center: list[int], image_size: int) -> str:
    """Naive reference: which third, both ways, holds the centre; asserts it is clear of the borders."""
    names = []
    for value, words in zip(reversed(center), (("top", "", "bottom"), ("left", "", "right"))):
        third = value / (image_size / 3)
        assert 0.15 <= third % 1 <= 0.85, (center, "a lone shape stands near a region border")
        names.append(words[int(third)])
    return " ".join(n for n in names if n) or "centre"


def test_region_of_hand_cases():
    assert synth.region_of([5, 5], 48) == "top left"
    assert synth.region_of([24, 5], 48) == "top"
    assert synth.region_of([47, 24], 48) == "right"
    assert synth.region_of([24, 24], 48) == "centre"
    assert synth.region_of([15, 47], 48) == "bottom left"
    assert synth.region_of([16, 32], 48) == "bottom"


@pytest.mark.parametrize("image_size", [32, 33, 48, 100])
def test_lone_shapes_reach_every_region_clear_of_borders(tmp_path: Path, image_size: int):
    path = generate_scenes(tmp_path / "d", n_images=300, image_size=image_size, seed=5)
    regions = Counter()
    for item in json.loads(path.read_text())["images"]:
        shapes = item["scene"]["shapes"]
        if len(shapes) == 1:
            assert shapes[0]["region"] == _region(shapes[0]["center"], image_size)
            regions[shapes[0]["region"]] += 1
    assert set(regions) == set(REGION_WORDS)


def test_the_demo_dataset_has_few_shared_captions(tmp_path: Path):
    """The embedded benchmark's data: under 5 % of training captions also caption another image."""
    path = generate_scenes(tmp_path / "d", n_images=1500, image_size=48, seed=0)
    fraction = shared_caption_fraction(json.loads(path.read_text()))
    assert 0 < fraction < 0.05


def test_shared_caption_fraction_hand_case():
    def image(imgid, split, *raws):
        return {"imgid": imgid, "split": split, "sentences": [{"raw": r} for r in raws]}

    document = {"images": [image(0, "train", "a", "b"), image(1, "train", "a", "c"), image(2, "test", "b", "d"),
                           image(3, "train", "e", "e")]}
    # train captions a, b, a, c, e, e: a (twice, images 0 and 1) and b (images 0 and 2) are shared; e is one image's
    assert shared_caption_fraction(document) == pytest.approx(3 / 6)
    assert shared_caption_fraction(document, "test") == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="'val'"):
        shared_caption_fraction(document, "val")


def test_relation_between_hand_cases():
    def shape(x, y, r=3):
        return {"center": [x, y], "radius": r}

    assert synth.relation_between(shape(5, 10), shape(20, 12)) == "left of"
    assert synth.relation_between(shape(20, 12), shape(5, 10)) == "right of"
    assert synth.relation_between(shape(10, 2), shape(11, 30)) == "above"
    assert synth.relation_between(shape(10, 30), shape(11, 2)) == "below"
    assert synth.relation_between(shape(0, 0), shape(10, 10)) is None  # diagonal: no clear relation
    assert synth.relation_between(shape(0, 0), shape(7, 0)) is None  # closer than r + r + 2: touching


# ---------------------------------------------------------------------------------------------- writing


def test_generate_refuses_non_empty_folder_and_accepts_empty(tmp_path: Path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full"):
        generate_scenes(tmp_path / "full", n_images=2, image_size=32)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert generate_scenes(tmp_path / "empty", n_images=2, image_size=32) == tmp_path / "empty" / "dataset_synth.json"


def test_failure_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real_render = synth.render_scene
    calls = []

    def failing_render(scene, image_size):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_render(scene, image_size)

    monkeypatch.setattr(synth, "render_scene", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_scenes(tmp_path / "ds", n_images=5, image_size=32)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a temporary folder


@pytest.mark.parametrize(
    "params, name",
    [
        ({"n_images": 0}, "n_images"),
        ({"image_size": 16}, "image_size"),
        ({"captions_per_image": (4, 2)}, "captions_per_image"),
        ({"captions_per_image": 3}, "captions_per_image"),
        ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
        ({"split_fractions": (1.2, -0.1, -0.1)}, "split_fractions"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"seed": "zero"}, "seed"),
    ],
)
def test_bad_parameters_are_named(tmp_path: Path, params, name):
    with pytest.raises(ValueError, match=name):
        generate_scenes(tmp_path / "ds", **params)
    assert not (tmp_path / "ds").exists()


def test_progress_lines_for_big_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setattr(synth, "PROGRESS_MIN_IMAGES", 8)
    generate_scenes(tmp_path / "big", n_images=8, image_size=32)
    assert capsys.readouterr().err.splitlines() == [f"synth: {n}/8 images" for n in (2, 4, 6, 8)]
    generate_scenes(tmp_path / "small", n_images=7, image_size=32)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- caching


def test_params_hash_fills_defaults_and_rejects_unknown():
    assert params_hash() == params_hash(n_images=1500, image_size=64, seed=0)
    assert params_hash(captions_per_image=[3, 5]) == params_hash()
    assert params_hash(n_images=10) != params_hash(n_images=11)
    with pytest.raises(ValueError, match=r"unknown synth parameter\(s\) \['n_image'\]; allowed: \['n_images'"):
        params_hash(n_image=10)


def test_ensure_reuses_a_complete_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    first = ensure_synth_dataset(tmp_path, n_images=6, image_size=32)
    assert first == tmp_path / params_hash(n_images=6, image_size=32) / "dataset_synth.json"
    before = _files(first.parent)

    def no_regeneration(folder, params):
        raise AssertionError("a complete dataset must be reused")

    monkeypatch.setattr(synth, "_write_dataset", no_regeneration)
    assert ensure_synth_dataset(tmp_path, n_images=6, image_size=32) == first
    assert _files(first.parent) == before
    monkeypatch.undo()
    other = ensure_synth_dataset(tmp_path, n_images=7, image_size=32)
    assert other.parent != first.parent and len(json.loads(other.read_text())["images"]) == 7


def test_ensure_replaces_an_incomplete_folder(tmp_path: Path):
    target = tmp_path / params_hash(n_images=4, image_size=32)
    (target / "images").mkdir(parents=True)
    (target / "dataset_synth.json").write_text("{half written")
    path = ensure_synth_dataset(tmp_path, n_images=4, image_size=32)
    assert len(json.loads(path.read_text())["images"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_publish_keeps_the_winner_when_losing_the_race(tmp_path: Path):
    winner = generate_scenes(tmp_path / "target", n_images=3, image_size=32).parent
    before = _files(winner)
    loser = tmp_path / ".target.tmp-x"
    loser.mkdir()
    (loser / "dataset_synth.json").write_text("loser's copy")
    synth._publish(loser, winner)
    assert not loser.exists()
    assert _files(winner) == before


def test_ensure_from_two_processes_at_once(tmp_path: Path):
    code = (
        "import sys; from raydistill.data.synth import ensure_synth_dataset; "
        "print(ensure_synth_dataset(sys.argv[1], n_images=60, image_size=32, seed=5))"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {out.strip() for out, _ in outputs}
    expected = tmp_path / params_hash(n_images=60, image_size=32, seed=5) / "dataset_synth.json"
    assert paths == {str(expected)}
    assert [p.name for p in tmp_path.iterdir()] == [expected.parent.name]  # no temporary folders left
    reference = generate_scenes(tmp_path.parent / f"{tmp_path.name}-ref", n_images=60, image_size=32, seed=5)
    assert _files(expected.parent) == _files(reference.parent)


def test_data_synth_command_reports_shared_captions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from raydistill.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n-images", "60", "--image-size", "48",
                 "--seed", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    document = json.loads((tmp_path / "d" / "dataset_synth.json").read_text())
    assert summary["dataset"] == str(tmp_path / "d" / "dataset_synth.json")
    assert summary["shared_caption_fraction"] == shared_caption_fraction(document)
    assert f"{100 * summary['shared_caption_fraction']:.1f} % of training captions also caption another image" in err
