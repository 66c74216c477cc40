"""Dataset readers on the real samples committed in tests/data (COCO images and captions, read as COCO files and
as a Karpathy file built from them) and on manifests and shards built from real JPEGs."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from real_data import (
    COCO,
    COCO_TRAIN_CAPTIONS,
    COCO_TRAIN_IMAGES,
    COCO_VAL_CAPTIONS,
    COCO_VAL_CAPTIONS_EXCERPT,
    COCO_VAL_IMAGES,
    val_jpegs,
    write_karpathy_from_coco,
)
from raydistill.data.images import decode_image
from raydistill.data.sources import (
    DataError,
    ReadStats,
    caption_rows,
    clean_caption,
    dataset_fingerprint,
    expand_shards,
    read_coco_captions,
    read_karpathy,
    read_manifest,
    read_source,
    read_webdataset,
    summarize,
)

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


# ---------------------------------------------------------------------------------------------- manifests


def test_manifest_jsonl_image_level_and_caption_level(tmp_path: Path):
    jpegs = val_jpegs(3)
    (tmp_path / "imgs").mkdir()
    for jpeg in jpegs:
        shutil.copy(jpeg, tmp_path / "imgs" / jpeg.name)
    lines = [
        {"image": f"imgs/{jpegs[0].name}", "captions": [" first ", "second\n"], "split": "val"},
        {"image": f"imgs/{jpegs[1].name}", "caption": "row caption one", "extra": 1},
        {"image": f"imgs/{jpegs[2].name}", "caption": "other image", "image_id": "custom"},
        {"image": f"imgs/{jpegs[1].name}", "caption": "  row caption two"},
        {"image": f"imgs/{jpegs[1].name}", "caption": None},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    stats = ReadStats()
    records = read_manifest(manifest, stats=stats)
    _check_records(records)
    stem = [f"imgs/{j.stem}" for j in jpegs]
    assert records == [
        {"image_id": stem[0], "path": str(tmp_path / "imgs" / jpegs[0].name), "data": None,
         "captions": ["first", "second"], "caption_ids": [f"{stem[0]}#0", f"{stem[0]}#1"], "split": "val"},
        {"image_id": stem[1], "path": str(tmp_path / "imgs" / jpegs[1].name), "data": None,
         "captions": ["row caption one", "row caption two"], "caption_ids": [f"{stem[1]}#0", f"{stem[1]}#1"],
         "split": "train"},
        {"image_id": "custom", "path": str(tmp_path / "imgs" / jpegs[2].name), "data": None,
         "captions": ["other image"], "caption_ids": ["custom#0"], "split": "train"},
    ]
    assert stats.dropped_captions == 1
    for record in records:
        assert decode_image(record["path"]).shape[2] == 3
    # image_root overrides the manifest's folder
    moved = read_manifest(manifest, image_root="s3://bucket/data")
    assert moved[0]["path"] == f"s3://bucket/data/imgs/{jpegs[0].name}"


def test_manifest_parquet_with_bytes_and_paths(tmp_path: Path):
    jpegs = val_jpegs(3)
    table = pa.table({
        "image": [None, str(jpegs[1]), str(jpegs[2])],  # absolute paths are kept
        "image_bytes": [jpegs[0].read_bytes(), None, None],
        "captions": [["from bytes"], ["abs path", "  "], ["third"]],
        "image_id": ["b0", None, "i2"],
        "split": ["test", None, "val"],
    })
    pq.write_table(table, tmp_path / "m.parquet")
    stats = ReadStats()
    records = read_manifest(tmp_path / "m.parquet", stats=stats)
    _check_records(records)
    assert [r["image_id"] for r in records] == ["b0", str(jpegs[1].with_suffix("")), "i2"]
    assert records[0]["data"] == jpegs[0].read_bytes() and records[0]["path"] is None
    assert records[1]["path"] == str(jpegs[1]) and records[1]["captions"] == ["abs path"]
    assert [r["split"] for r in records] == ["test", "train", "val"]
    assert stats == ReadStats(images=3, captions=3, dropped_captions=1, dropped_images=0)
    with Image.open(jpegs[0]) as image:
        np.testing.assert_array_equal(decode_image(records[0]["data"]), np.asarray(image.convert("RGB")))


def test_manifest_jsonl_base64_bytes_default_id_is_content_hash(tmp_path: Path):
    import hashlib

    data = val_jpegs(1)[0].read_bytes()
    manifest = tmp_path / "m.ndjson"
    manifest.write_text(json.dumps({"image_bytes": base64.b64encode(data).decode(), "caption": "x",
                                    "image_id": None}) + "\n")
    (record,) = read_manifest(manifest)
    assert record["data"] == data and record["image_id"] == hashlib.sha256(data).hexdigest()[:16]
    manifest.write_text(json.dumps({"image_bytes": "not base64!", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"row 0: 'image_bytes' text is not valid base64"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([{"img": "a.jpg", "caption": "x"}], "needs an 'image' or 'image_bytes' column"),
        ([{"image": "a.jpg", "text": "x"}], "columns found: ['image', 'text']"),
        ([{"image": "a.jpg", "image_bytes": "AAAA", "caption": "x"}], "row 0: needs exactly one of"),
        ([{"image": "a.jpg", "caption": "x"}, {"caption": "y", "image": None}], "row 1: needs exactly one of"),
        ([{"image": 3, "caption": "x"}], "row 0: 'image' must be a non-empty path string"),
        ([{"image": "a.jpg", "captions": "x"}], "row 0: captions must be a list"),
        ([{"image": "a.jpg", "captions": ["x", 2]}], "row 0: caption 1 must be a string"),
        ([{"image": "a.jpg", "caption": ["x"]}], "row 0: 'caption' must be a string"),
        ([{"image": "a.jpg", "caption": "x", "captions": ["y"]}], "has both 'caption' and 'captions'"),
        ([{"image": "a.jpg", "caption": "x", "split": 1}], "row 0: 'split' must be a non-empty string"),
        ([{"image": "a.jpg", "caption": "x", "image_id": 1.5}], "row 0: image_id must be"),
        ([{"image": "a.jpg", "captions": ["x"]}, {"image": "a.jpg", "captions": ["y"]}],
         "duplicate image id 'a' at row 1"),
        ([{"image": "a.jpg", "caption": "x"}, {"image": "a.jpg", "caption": "y", "split": "val"}],
         "row 1: image id 'a' was first seen at"),
        ([{"image": "a.jpg", "caption": " "}], "no images with captions"),
    ],
)
def test_manifest_errors(tmp_path: Path, lines, expected):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_manifest(manifest)
    assert expected in str(info.value)
    assert "bad.jsonl" in str(info.value)


def test_manifest_file_level_errors(tmp_path: Path):
    with pytest.raises(DataError, match=r"unknown manifest suffix '\.csv'; allowed"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"m\.jsonl: line 2: expected a JSON object, got list"):
        read_manifest(tmp_path / "m.jsonl")
    prefix = b'{"image": "a.jpg", "caption": "'
    (tmp_path / "m.jsonl").write_bytes(prefix + b'\xff"}\n')
    with pytest.raises(DataError, match=rf"m\.jsonl: not valid UTF-8 at byte {len(prefix)} "):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"m\.parquet: not a readable Parquet file"):
        read_manifest(tmp_path / "m.parquet")


# ---------------------------------------------------------------------------------------------- WebDataset


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _add_member(tar, name, data)


def test_webdataset_img2dataset_layout(tmp_path: Path):
    jpegs = [p.read_bytes() for p in val_jpegs(5)]
    png = io.BytesIO()
    Image.new("RGB", (4, 3), (9, 8, 7)).save(png, format="PNG")
    _write_shard(tmp_path / "shard-00000.tar", [
        ("000000000.jpg", jpegs[0]),
        ("000000000.txt", b"  a real photo \n"),
        ("000000000.json",
         json.dumps({"key": "000000000", "caption": "ignored: txt wins", "status": "success"}).encode()),
        ("000000001.jpg", jpegs[1]),
        ("000000001.json", json.dumps({"key": "000000001", "caption": "caption from json"}).encode()),
        ("000000002.jpg", jpegs[2]),  # no caption at all: dropped
        ("._000000003.jpg", b"macOS fork"),  # hidden: ignored
        ("000000004.txt", b"caption without image"),  # dropped
    ])
    _write_shard(tmp_path / "shard-00001.tar", [
        ("sub/000000005.png", png.getvalue()),
        ("sub/000000005.txt", b"png sample"),
        ("000000006.jpg", jpegs[3]),
        ("000000006.txt", b"   "),  # empty caption: caption and image dropped
        ("000000007.webp", jpegs[4]),  # bytes are passed through; decoding is the decoder's job
        ("000000007.txt", b"webp"),
    ])
    stats = ReadStats()
    records = read_webdataset(str(tmp_path / "shard-{00000..00001}.tar"), split="val", stats=stats)
    _check_records(records)
    assert [r["image_id"] for r in records] == ["000000000", "000000001", "sub/000000005", "000000007"]
    assert [r["captions"] for r in records] == [["a real photo"], ["caption from json"], ["png sample"], ["webp"]]
    assert records[0]["caption_ids"] == ["000000000#0"] and {r["split"] for r in records} == {"val"}
    assert records[0]["data"] == jpegs[0] and records[1]["data"] == jpegs[1] and records[0]["path"] is None
    assert stats == ReadStats(images=4, captions=4, dropped_captions=1, dropped_images=3)
    with Image.open(io.BytesIO(jpegs[0])) as image:
        np.testing.assert_array_equal(decode_image(records[0]["data"]), np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(decode_image(records[2]["data"]), np.full((3, 4, 3), (9, 8, 7), np.uint8))

    by_glob = read_webdataset(str(tmp_path / "shard-*.tar"), split="val")
    assert by_glob == records
    gz = tmp_path / "gz"
    gz.mkdir()
    with tarfile.open(gz / "s.tar.gz", "w:gz") as tar:  # compressed shards are read too
        _add_member(tar, "k.jpg", jpegs[0])
        _add_member(tar, "k.txt", b"zipped")
    assert read_source("webdataset", shards=[(gz / "s.tar.gz").as_uri()])[0]["captions"] == ["zipped"]


def test_webdataset_errors(tmp_path: Path):
    jpeg = val_jpegs(1)[0].read_bytes()
    _write_shard(tmp_path / "a.tar", [("k.jpg", jpeg), ("k.txt", b"x")])
    _write_shard(tmp_path / "b.tar", [("k.jpg", jpeg), ("k.txt", b"y")])
    with pytest.raises(DataError, match="duplicate image id 'k'"):
        read_webdataset([tmp_path / "a.tar", tmp_path / "b.tar"])
    _write_shard(tmp_path / "c.tar", [("k.jpg", jpeg), ("k.txt", "caf\u00e9".encode("latin-1"))])
    with pytest.raises(DataError, match=r"c\.tar: member k\.txt: not valid UTF-8 at byte 3"):
        read_webdataset(tmp_path / "c.tar")
    _write_shard(tmp_path / "d.tar", [("k.jpg", jpeg), ("k.json", b"{oops")])
    with pytest.raises(DataError, match=r"d\.tar: member k\.json: invalid JSON"):
        read_webdataset(tmp_path / "d.tar")
    (tmp_path / "e.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataError, match=r"e\.tar: not a readable tar shard"):
        read_webdataset(tmp_path / "e.tar")
    with pytest.raises(DataError, match=r"missing\.tar: shard not found"):
        read_webdataset(tmp_path / "missing.tar")
    with pytest.raises(DataError, match="matches no files"):
        read_webdataset(str(tmp_path / "none-*.tar"))
    with pytest.raises(ValueError, match="split"):
        read_webdataset(tmp_path / "a.tar", split="")


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


# ---------------------------------------------------------------------------------------------- utilities


def test_read_source_dispatch(tmp_path: Path):
    json_path = write_karpathy_from_coco(tmp_path / "dataset_coco.json")
    assert read_source("karpathy", json_path=json_path, image_root="/x", splits="val") == \
        read_karpathy(json_path, "/x", splits="val")
    with pytest.raises(ValueError, match=r"unknown data source kind 'csv'; allowed: \['coco', 'karpathy', "
                                         r"'manifest', 'webdataset'\]"):
        read_source("csv", path="x")


def test_caption_rows_explode_records():
    records = read_coco_captions(COCO_VAL_CAPTIONS_EXCERPT, COCO_VAL_IMAGES, "val")
    rows = caption_rows(records)
    assert len(rows) == 144 and set(rows[0]) == {"caption_id", "image_id", "caption"}
    naive = [(cid, r["image_id"], c) for r in records for cid, c in zip(r["caption_ids"], r["captions"])]
    assert [(row["caption_id"], row["image_id"], row["caption"]) for row in rows] == naive
    with pytest.raises(DataError, match="2 captions but 1 caption ids"):
        caption_rows([{"image_id": "x", "captions": ["a", "b"], "caption_ids": ["1"]}])


def test_dataset_fingerprint(tmp_path: Path):
    jpegs = val_jpegs(3)
    folder = tmp_path / "one"
    folder.mkdir()
    for jpeg in jpegs:
        shutil.copy(jpeg, folder / jpeg.name)
    manifest = folder / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": j.name, "captions": [f"caption {k}"]})
                                  for k, j in enumerate(jpegs)))
    records = read_manifest(manifest)
    base = dataset_fingerprint(records)
    assert len(base) == 64 and int(base, 16) >= 0
    assert dataset_fingerprint(list(reversed(records))) == base  # order does not matter
    assert dataset_fingerprint([dict(r) for r in records]) == base  # recomputed, not cached

    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert dataset_fingerprint(read_manifest(moved / "m.jsonl")) == base  # same files on another mount

    edited = [dict(r) for r in records]
    edited[1] = {**edited[1], "captions": ["caption 1!"]}
    assert dataset_fingerprint(edited) != base
    resplit = [dict(r) for r in records]
    resplit[0] = {**resplit[0], "split": "val"}
    assert dataset_fingerprint(resplit) != base
    with open(folder / jpegs[2].name, "ab") as f:
        f.write(b"\0")  # the image file changed size
    assert dataset_fingerprint(records) != base

    inline = [{**records[0], "path": None, "data": jpegs[0].read_bytes()}]
    assert dataset_fingerprint(inline) == dataset_fingerprint([dict(inline[0])])
    assert dataset_fingerprint(inline) != dataset_fingerprint([{**inline[0], "data": jpegs[1].read_bytes()}])
