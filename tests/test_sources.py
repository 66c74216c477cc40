"""The caption-file readers (Karpathy, COCO) on the real samples committed in tests/data: COCO images and
captions, read as COCO files and as a Karpathy file built from them. Manifests and shards, which Ray Data reads,
are tested in test_source_datasets.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from real_data import (
    COCO,
    COCO_TRAIN_CAPTIONS,
    COCO_TRAIN_IMAGES,
    COCO_VAL_CAPTIONS,
    COCO_VAL_CAPTIONS_EXCERPT,
    COCO_VAL_IMAGES,
    write_karpathy_from_coco,
)
from raydistill.data.images import decode_image
from raydistill.data.records import DataError, ReadStats, clean_caption, expand_shards
from raydistill.data.sources import caption_blocks, read_coco_captions, read_karpathy

RECORD_KEYS = {"image_id", "path", "data", "captions", "caption_ids", "split"}


def _check_records(records: list[dict]) -> None:
    """The record contract every reader must meet."""
    caption_ids = [cid for r in records for cid in r["caption_ids"]]
    assert len(caption_ids) == len(set(caption_ids))
    assert len({r["image_id"] for r in records}) == len(records)
    for record in records:
        assert set(record) == RECORD_KEYS
        assert (record["path"] is None) != (record["data"] is None)
        assert len(record["captions"]) == len(record["caption_ids"]) >= 1
        for caption in record["captions"]:
            assert caption == " ".join(caption.split()) and caption


def summarize(records: list[dict]) -> dict:
    splits = Counter(r["split"] for r in records)
    return {"images": len(records), "captions": sum(len(r["captions"]) for r in records),
            "splits": dict(sorted(splits.items()))}


def _write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("  Two roses in a vase. ", "Two roses in a vase."),
        ("cut\n.", "cut ."),
        ("a\t\tb \r\n c", "a b c"),
        (" \n\t ", ""),
        ("", ""),
    ],
)
def test_clean_caption(raw, cleaned):
    assert clean_caption(raw) == cleaned


# ---------------------------------------------------------------------------------------------- Karpathy


def test_karpathy_coco_layout_on_real_files(tmp_path: Path):
    json_path = write_karpathy_from_coco(tmp_path / "dataset_coco.json")
    stats = ReadStats()
    records = read_karpathy(json_path, COCO, stats=stats)
    _check_records(records)
    assert stats == ReadStats(images=14, captions=70, dropped_captions=0, dropped_images=0)
    assert summarize(records) == {"images": 14, "captions": 70, "splits": {"test": 5, "train": 3, "val": 6}}

    raw = json.loads(json_path.read_text())["images"]
    for record, item in zip(records, raw):  # file order, ids and texts straight from the JSON
        assert record["image_id"] == str(item["cocoid"])
        assert record["path"] == str(COCO / item["filepath"] / item["filename"])
        assert Path(record["path"]).is_file()
        assert record["caption_ids"] == [str(s["sentid"]) for s in item["sentences"]]
        assert record["captions"] == [" ".join(s["raw"].split()) for s in item["sentences"]]
        assert record["split"] == ("train" if item["split"] == "restval" else item["split"])
    first = records[0]
    assert first["image_id"] == "408805" and first["caption_ids"] == ["0", "1", "2", "3", "4"]
    # Stray spaces and an embedded newline, as written in COCO's captions, come out cleaned.
    assert "an offica kitchen with white cabinets and some yellow walls" in first["captions"]  # typo kept
    bowl = {r["image_id"]: r for r in records}["99053"]
    assert "A bowl of food that looks like worms and some greens." in bowl["captions"]
    for record in records:
        with Image.open(record["path"]) as image:
            reference = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(decode_image(record["path"]), reference)


def test_karpathy_split_selection(tmp_path: Path):
    json_path = write_karpathy_from_coco(tmp_path / "dataset_coco.json")
    val = read_karpathy(json_path, "/images", splits="val")
    assert len(val) == 6 and {r["split"] for r in val} == {"val"}
    both = read_karpathy(json_path, "/images", splits=["train", "val"])
    assert len(both) == 9
    assert [r["image_id"] for r in read_karpathy(json_path, "/images", splits="restval")] == \
        ["408805", "231460", "196393"]  # restval is read as train
    with pytest.raises(DataError) as info:
        read_karpathy(json_path, "/images", splits=["val", "extra"])
    message = str(info.value)
    assert "'extra'" in message and "['test', 'train', 'val']" in message and "dataset_coco.json" in message


def test_karpathy_coco_layout_filepath_cocoid_restval(tmp_path: Path):
    document = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 0, "split": "restval",
             "cocoid": 42, "sentids": [7, 8],
             "sentences": [{"raw": "A dog.", "sentid": 7, "imgid": 0}, {"raw": " A  cat ", "sentid": 8, "imgid": 0}]},
            {"filepath": "val2014", "filename": "COCO_val2014_000000000073.jpg", "imgid": 1, "split": "test",
             "cocoid": 73, "sentids": [9], "sentences": [{"raw": "A bike.", "sentid": 9, "imgid": 1}]},
        ],
    }
    json_path = _write_json(tmp_path / "dataset_coco.json", document)
    records = read_karpathy(json_path, tmp_path / "coco")
    assert [r["image_id"] for r in records] == ["42", "73"]
    assert records[0]["path"] == str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg")
    assert records[0]["split"] == "train"  # restval is training data
    assert records[0]["captions"] == ["A dog.", "A cat"] and records[0]["caption_ids"] == ["7", "8"]
    assert [r["image_id"] for r in read_karpathy(json_path, tmp_path, splits="restval")] == ["42"]
    uri_records = read_karpathy(json_path, "s3://bucket/coco/")
    assert uri_records[1]["path"] == "s3://bucket/coco/val2014/COCO_val2014_000000000073.jpg"


def test_karpathy_drops_empty_captions_and_captionless_images(tmp_path: Path):
    document = {"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "  "}, {"raw": "one"}, {"raw": "\n"}]},
        {"filename": "b.jpg", "split": "test", "sentences": []},  # the homework-variant test records
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": ""}]},
    ]}
    stats = ReadStats()
    records = read_karpathy(_write_json(tmp_path / "d.json", document), tmp_path, stats=stats)
    assert [(r["image_id"], r["captions"], r["caption_ids"]) for r in records] == [("a", ["one"], ["a#1"])]
    assert stats == ReadStats(images=1, captions=1, dropped_captions=3, dropped_images=2)


@pytest.mark.parametrize(
    "document, expected",
    [
        ([], "expected a JSON object"),
        ({"dataset": "x"}, "missing key 'images'"),
        ({"images": {}}, "key 'images' must be list"),
        ({"images": [{"split": "train", "sentences": []}]}, "images[0]: missing key 'filename'"),
        ({"images": [{"filename": "a.jpg", "split": 3, "sentences": []}]}, "images[0]: key 'split' must be str"),
        ({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": 5}]}]},
         "images[0].sentences[0]: key 'raw' must be str"),
        ({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},
                     {"filename": "b/a.jpg", "split": "val", "sentences": [{"raw": "y"}]}]},
         "duplicate image id 'a'"),
        ({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x", "sentid": 1}]},
                     {"filename": "b.jpg", "split": "val", "sentences": [{"raw": "y", "sentid": 1}]}]},
         "duplicate caption id '1'"),
        ({"images": []}, "no images with captions"),
    ],
)
def test_karpathy_schema_errors_name_file_and_key(tmp_path: Path, document, expected):
    json_path = _write_json(tmp_path / "broken.json", document)
    with pytest.raises(DataError) as info:
        read_karpathy(json_path, tmp_path)
    assert expected in str(info.value)
    assert "broken.json" in str(info.value)


def test_json_readers_reject_non_utf8_and_bad_json(tmp_path: Path):
    latin1 = tmp_path / "latin1.json"
    prefix = '{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "caf'
    latin1.write_bytes((prefix + '\u00e9"}]}]}').encode("latin-1"))  # é is byte 0xE9 in Latin-1
    with pytest.raises(DataError, match=rf"latin1\.json: not valid UTF-8 at byte {len(prefix)} "):
        read_karpathy(latin1, tmp_path)
    truncated = tmp_path / "cut.json"
    truncated.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"cut\.json: invalid JSON at line 1"):
        read_coco_captions(truncated, tmp_path, "val")
    with pytest.raises(DataError, match="file not found"):
        read_karpathy(tmp_path / "absent.json", tmp_path)
    surrogate = tmp_path / "surrogate.json"  # valid JSON syntax, but "\ud800" alone is not a character
    surrogate.write_text('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x\\ud800"}]}]}')
    with pytest.raises(DataError, match=r"surrogate\.json: images\[0\]: caption 0: invalid Unicode"):
        read_karpathy(surrogate, tmp_path)


# ---------------------------------------------------------------------------------------------- COCO


def test_coco_val_real_files():
    stats = ReadStats()
    records = read_coco_captions(COCO_VAL_CAPTIONS, COCO_VAL_IMAGES, "val", stats=stats)
    _check_records(records)
    assert stats == ReadStats(images=11, captions=55, dropped_captions=0, dropped_images=0)
    assert all(len(r["captions"]) == 5 and r["split"] == "val" for r in records)
    assert all(Path(r["path"]).is_file() for r in records)

    by_caption_id = {cid: caption for r in records for cid, caption in zip(r["caption_ids"], r["captions"])}
    # A caption with an embedded newline, and ones with trailing spaces, in the official file.
    assert by_caption_id["332123"] == "A bowl of food that looks like worms and some greens."
    assert by_caption_id["468803"] == "A man in a bathroom looking at himself in the mirror."
    assert by_caption_id["761464"] == "a person riding a motorcycle on a a foggy road"

    grey = {r["image_id"]: r for r in records}["431848"]
    decoded = decode_image(grey["path"])
    assert decoded.ndim == 3 and decoded.shape[2] == 3
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()


def test_coco_train_real_files():
    records = read_coco_captions(COCO_TRAIN_CAPTIONS, COCO_TRAIN_IMAGES, "train")
    assert summarize(records) == {"images": 3, "captions": 15, "splits": {"train": 3}}


def test_coco_val2017_excerpt_caption_counts():
    """Records of the official val2017 file: images with 6 and 7 captions, and captions with newlines."""
    records = read_coco_captions(COCO_VAL_CAPTIONS_EXCERPT, "/coco/val2017", "val")
    _check_records(records)
    assert summarize(records)["images"] == 26 and summarize(records)["captions"] == 144
    assert Counter(len(r["captions"]) for r in records) == {5: 13, 6: 12, 7: 1}
    raw = json.loads(COCO_VAL_CAPTIONS_EXCERPT.read_text())
    seven = {r["image_id"]: r for r in records}["431896"]
    expected = [a for a in raw["annotations"] if a["image_id"] == 431896]
    assert len(seven["captions"]) == 7
    assert seven["caption_ids"] == [str(a["id"]) for a in expected]
    assert seven["captions"] == [" ".join(a["caption"].split()) for a in expected]
    assert [r["image_id"] for r in records] == [str(image["id"]) for image in raw["images"]]
    by_caption_id = {cid: caption for r in records for cid, caption in zip(r["caption_ids"], r["captions"])}
    assert by_caption_id["555895"] == "Two pizza pies sitting atop a stove getting ready to be cut ."
    assert by_caption_id["607448"] == "Individual is doing something at the moment that is intriguing."


def test_coco_drops_captionless_images_and_validates(tmp_path: Path):
    document = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}, {"id": 3, "file_name": "3.jpg"}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "a cat "}, {"image_id": 3, "id": 11, "caption": "\n"}],
    }
    stats = ReadStats()
    records = read_coco_captions(_write_json(tmp_path / "c.json", document), tmp_path, "val", stats=stats)
    assert records == [{"image_id": "1", "path": str(tmp_path / "1.jpg"), "data": None, "captions": ["a cat"],
                        "caption_ids": ["10"], "split": "val"}]
    assert stats == ReadStats(images=1, captions=1, dropped_captions=1, dropped_images=2)

    document["annotations"].append({"image_id": 9, "id": 12, "caption": "orphan"})
    with pytest.raises(DataError, match=r"annotations\[2\]: image_id '9' is not in the file's images"):
        read_coco_captions(_write_json(tmp_path / "c.json", document), tmp_path, "val")
    document["annotations"][2] = {"image_id": 2, "id": 10, "caption": "same id"}
    with pytest.raises(DataError, match="duplicate caption id '10'"):
        read_coco_captions(_write_json(tmp_path / "c.json", document), tmp_path, "val")
    document["images"].append({"id": 1, "file_name": "again.jpg"})
    with pytest.raises(DataError, match=r"duplicate image id '1' at images\[3\]"):
        read_coco_captions(_write_json(tmp_path / "c.json", document), tmp_path, "val")
    with pytest.raises(ValueError, match="split"):
        read_coco_captions(tmp_path / "c.json", tmp_path, "")


# ---------------------------------------------------------------------------------------------- shards


def test_expand_shards_braces():
    assert expand_shards("s3://b/data-{008..011}.tar") == [f"s3://b/data-{n:03d}.tar" for n in range(8, 12)]
    assert expand_shards("x-{1..3}-{a,b}.tar") == ["x-1-a.tar", "x-1-b.tar", "x-2-a.tar", "x-2-b.tar",
                                                     "x-3-a.tar", "x-3-b.tar"]
    assert expand_shards(["a.tar", "a.tar", "b.tar"]) == ["a.tar", "b.tar"]
    with pytest.raises(DataError, match="counts down"):
        expand_shards("d-{9..1}.tar")
    with pytest.raises(DataError, match="cannot expand"):
        expand_shards("d-{x}.tar")
    with pytest.raises(DataError, match="only on local paths"):
        expand_shards("s3://b/*.tar")


def test_caption_rows_are_cut_into_one_block_per_megabyte_of_json_up_to_eight(tmp_path: Path):
    def files(*sizes: int) -> list[tuple[str, str, str, None]]:
        out = []
        for k, size in enumerate(sizes):
            path = tmp_path / f"captions{k}.json"
            path.write_bytes(b" " * size)
            out.append(("karpathy", str(path), str(tmp_path), None))
        return out

    assert caption_blocks(files(60_000)) == 1  # a small dataset: one block, one schema task
    assert caption_blocks(files(2 * 2**20 + 1)) == 3
    assert caption_blocks(files(2**20, 2**20 + 10)) == 3  # the files' sizes add up
    assert caption_blocks(files(40 * 2**20)) == 8
    # A size that cannot be read (a URI, a file gone) counts as large: as many blocks as allowed.
    assert caption_blocks([("coco", "s3://bucket/captions.json", "s3://bucket/images", "val2017")]) == 8
    assert caption_blocks([("karpathy", str(tmp_path / "missing.json"), str(tmp_path), None)]) == 8
