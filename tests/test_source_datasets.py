"""Sources read by Ray Data in tasks: manifests (JSONL, Parquet), WebDataset shards, caption files; the source's
identity, its per-split counts, and the checks that run before Ray starts. Built from the real JPEGs and
captions in tests/data; one local Ray instance serves the module.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from real_data import COCO, val_jpegs, write_karpathy_from_coco
from raydistill.config import config_from_dict
from raydistill.data.images import decode_image
from raydistill.data.records import DataError
from raydistill.data.manifest import estimate_rows
from raydistill.data.source import (
    check_source,
    count_splits,
    shuffle_partitions,
    source_dataset,
    source_identity,
)
from raydistill.errors import find_user_error
from raydistill.pipeline.cache import id_hash

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from raydistill.pipeline.plans import configure_data_context

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    configure_data_context(config_from_dict({}))  # what `raydistill run` sets
    yield
    ray.shutdown()


def _cfg(tmp_path: Path, **data) -> object:
    return config_from_dict({"output_dir": str(tmp_path / "out"), "data": data})


def _rows(cfg, splits=("train",)) -> list[dict]:
    """The source's image rows, read by Ray; order by image id (a hash shuffle groups manifest rows)."""
    rows = source_dataset(cfg, list(splits)).take_all()
    return sorted(rows, key=lambda r: r["image_id"])


def _raised(fn) -> DataError:
    """The user error ``fn`` raised, as the command line finds it inside Ray's wrappers."""
    with pytest.raises(Exception) as info:
        fn()
    found = find_user_error(info.value)
    assert isinstance(found, DataError), f"not a DataError: {info.value!r}"
    return found


# ---------------------------------------------------------------------------------------------- manifests


def test_manifest_jsonl_image_level_and_caption_level_rows(tmp_path: Path):
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
    cfg = _cfg(tmp_path, source="manifest", path=str(manifest))
    stem = [f"imgs/{j.stem}" for j in jpegs]
    assert _rows(cfg, ["train", "val"]) == sorted([
        {"image_id": stem[0], "path": str(tmp_path / "imgs" / jpegs[0].name), "data": None,
         "captions": ["first", "second"], "caption_ids": [f"{stem[0]}#0", f"{stem[0]}#1"], "split": "val"},
        {"image_id": stem[1], "path": str(tmp_path / "imgs" / jpegs[1].name), "data": None,
         "captions": ["row caption one", "row caption two"], "caption_ids": [f"{stem[1]}#0", f"{stem[1]}#1"],
         "split": "train"},
        {"image_id": "custom", "path": str(tmp_path / "imgs" / jpegs[2].name), "data": None,
         "captions": ["other image"], "caption_ids": ["custom#0"], "split": "train"},
    ], key=lambda r: r["image_id"])
    counts = count_splits(cfg, ["train", "val"])
    assert counts == {"train": {"images": 2, "captions": 3, "id_hash": id_hash([stem[1], "custom"])},
                      "val": {"images": 1, "captions": 2, "id_hash": id_hash([stem[0]])}}
    # data.image_root moves relative images; the rows name object-store paths as given
    moved = _cfg(tmp_path, source="manifest", path=str(manifest), image_root="s3://bucket/data")
    assert _rows(moved, ["val"])[0]["path"] == f"s3://bucket/data/imgs/{jpegs[0].name}"


def test_a_budgeted_manifest_groups_its_rows_through_local_disk_a_block_at_a_time(tmp_path: Path):
    # Ray Data's in-memory hash shuffle buffers up to 1 GiB of input and keeps every shard in the object store
    # until its reducers run: grouping a manifest's caption rows held the whole source there. Under the budget
    # `raydistill run` sets, the shards go to local disk and the input is partitioned a block at a time.
    ctx = ray.data.DataContext.get_current()
    assert ctx.use_disk_based_hash_shuffle and ctx.shuffle_input_batch_bytes == ctx.target_max_block_size
    jpegs = val_jpegs(2)
    # caption rows of the same images, spread over four files read by separate tasks
    for k in range(4):
        lines = [{"image": str(jpegs[i]), "caption": f"file {k} caption {i}"} for i in range(2)]
        (tmp_path / f"part-{k}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    cfg = _cfg(tmp_path, source="manifest", path=str(tmp_path))
    ds = source_dataset(cfg, ["train"]).materialize()
    assert "DiskHashShuffleMap" in ds.stats()
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    assert [(r["image_id"], sorted(r["captions"])) for r in rows] == [
        (str(jpegs[i].with_suffix("")), [f"file {k} caption {i}" for k in range(4)]) for i in range(2)]


def test_a_larger_manifest_is_grouped_in_more_partitions_of_at_most_the_configured_rows(tmp_path: Path):
    # A partition leaves its reducer as one block that the next stage holds in the object store: a fixed number
    # of partitions would make the store grow with the manifest. 12 rows at 3 a partition: 4 partitions.
    jpegs = val_jpegs(3)
    lines = [{"image": str(jpegs[k % 3]), "caption": f"caption {k:02d}"} for k in range(12)]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    assert estimate_rows(str(manifest)) == 12
    for per, partitions in ((3, 4), (None, 2), (100, 2)):
        cfg = config_from_dict({"output_dir": str(tmp_path / "out"), "data": {"source": "manifest", "path": str(manifest)},
                                "ray": {"shuffle_partitions": 2, "shuffle_partition_rows": per}})
        ds = source_dataset(cfg, ["train"]).materialize()
        assert f"DiskHashShuffleMap(keys=('image_id',), partitions={partitions})" in ds.stats()
        rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
        assert [(r["image_id"], sorted(r["captions"])) for r in rows] == [
            (str(jpegs[i].with_suffix("")), [f"caption {k:02d}" for k in range(i, 12, 3)]) for i in range(3)]


def test_shuffle_partitions_grow_with_the_rows_past_the_configured_least():
    cfg = config_from_dict({})  # 16 partitions at least, 5,000 rows each at most
    assert [shuffle_partitions(cfg, rows) for rows in (0, 10_000, 80_000, 80_001, 1_000_000)] == [16, 16, 16, 17, 200]
    fixed = config_from_dict({"ray": {"shuffle_partitions": 40, "shuffle_partition_rows": None}})
    assert shuffle_partitions(fixed, 1_000_000) == 40


def test_a_manifests_rows_are_estimated_from_its_footers_or_its_sizes(tmp_path: Path):
    # Parquet: the footers' row counts, exactly
    folder = tmp_path / "pq"
    folder.mkdir()
    for name, n in (("a.parquet", 7), ("b.parquet", 5)):
        pq.write_table(pa.table({"image": [f"{k}.jpg" for k in range(n)], "caption": ["c"] * n}), folder / name)
    assert estimate_rows(str(folder)) == 12
    (folder / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"c\.parquet: not a readable Parquet file"):
        estimate_rows(str(folder))
    (folder / "c.parquet").unlink()
    # JSONL: the files' bytes over the first file's mean line (these lines are all one length)
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for name, n in (("a.jsonl", 300), ("b.jsonl", 700)):
        lines = [json.dumps({"image": f"{k:06d}.jpg", "caption": "a caption"}) for k in range(n)]
        (jsonl / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert estimate_rows(str(jsonl)) == 1000
    # The head is cut at 64 KiB: 2,000 lines of 48 bytes (96,000) still estimate as 2,000
    (jsonl / "b.jsonl").unlink()
    (jsonl / "a.jsonl").write_text("".join(json.dumps({"image": f"{k:06d}.jpg", "caption": "a caption"}) + "\n"
                                           for k in range(2000)), encoding="utf-8")
    assert estimate_rows(str(jsonl)) == 2000


def test_manifest_parquet_folder_with_bytes_and_paths(tmp_path: Path):
    jpegs = val_jpegs(3)
    folder = tmp_path / "manifest"
    folder.mkdir()
    pq.write_table(pa.table({
        "image": [None, str(jpegs[1])], "image_bytes": [jpegs[0].read_bytes(), None],
        "captions": [["from bytes"], ["abs path", "  "]], "image_id": ["b0", None], "split": ["test", None],
    }), folder / "part-0.parquet")
    pq.write_table(pa.table({"image": [str(jpegs[2])], "image_bytes": pa.array([None], pa.binary()),
                             "captions": [["third"]], "image_id": ["i2"], "split": ["val"]}), folder / "part-1.parquet")
    cfg = _cfg(tmp_path, source="manifest", path=str(folder))
    rows = _rows(cfg, ["train", "val", "test"])
    assert [r["image_id"] for r in rows] == [str(jpegs[1].with_suffix("")), "b0", "i2"]
    assert rows[1]["data"] == jpegs[0].read_bytes() and rows[1]["path"] is None
    assert rows[0]["path"] == str(jpegs[1]) and rows[0]["captions"] == ["abs path"]
    assert [r["split"] for r in rows] == ["train", "test", "val"]
    with Image.open(jpegs[0]) as image:
        np.testing.assert_array_equal(decode_image(rows[1]["data"]), np.asarray(image.convert("RGB")))


def test_manifest_jsonl_base64_bytes_default_id_is_content_hash(tmp_path: Path):
    data = val_jpegs(1)[0].read_bytes()
    manifest = tmp_path / "m.ndjson"
    manifest.write_text(json.dumps({"image_bytes": base64.b64encode(data).decode(), "caption": "x",
                                    "image_id": None}) + "\n")
    (row,) = _rows(_cfg(tmp_path, source="manifest", path=str(manifest)))
    assert row["data"] == data and row["image_id"] == hashlib.sha256(data).hexdigest()[:16]


@pytest.mark.parametrize(
    "lines, expected",
    [
        # Found where the rows are read (the first rows pass the check before Ray starts).
        ([{"image": "a.jpg", "captions": ["x"]}] * 25 + [{"image": "b.jpg", "caption": "x", "captions": ["y"]}],
         "bad.jsonl: row with image 'b.jpg': has both 'caption' and 'captions'"),
        ([{"image": f"{k}.jpg", "captions": ["x"]} for k in range(25)] + [{"image": "3.jpg", "captions": ["y"]}],
         "duplicate image id '3'"),
        ([{"image": f"{k}.jpg", "caption": "x"} for k in range(25)] + [{"image": "3.jpg", "caption": "y", "split": "val"}],
         "image id '3' was first seen at"),
    ],
)
def test_manifest_errors_found_in_the_distributed_read(tmp_path: Path, lines, expected):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    cfg = _cfg(tmp_path, source="manifest", path=str(manifest))
    check_source(cfg)  # the first 20 rows are fine
    error = _raised(lambda: count_splits(cfg, ["train"]))
    assert expected in str(error)
    assert "Traceback" not in str(error)


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([{"img": "a.jpg", "caption": "x"}], "needs an 'image' or 'image_bytes' column"),
        ([{"image": "a.jpg", "text": "x"}], "columns found: ['image', 'text']"),
        ([{"image": "a.jpg", "image_bytes": "AAAA", "caption": "x"}], "line 1: needs exactly one of"),
        ([{"image": "a.jpg", "caption": "x"}, {"caption": "y", "image": None}], "line 2: needs exactly one of"),
        ([{"image": 3, "caption": "x"}], "line 1: 'image' must be a non-empty path string"),
        ([{"image": "a.jpg", "captions": "x"}], "line 1: captions must be a list"),
        ([{"image": "a.jpg", "captions": ["x", 2]}], "line 1: caption 1 must be a string"),
        ([{"image": "a.jpg", "caption": ["x"]}], "line 1: 'caption' must be a string"),
        ([{"image": "a.jpg", "caption": "x", "split": 1}], "line 1: 'split' must be a non-empty string"),
        ([{"image": "a.jpg", "caption": "x", "image_id": 1.5}], "line 1: image_id must be"),
        ([{"image_bytes": "not base64!", "caption": "x"}], "line 1: 'image_bytes' text is not valid base64"),
    ],
)
def test_manifest_schema_errors_before_ray_name_the_line(tmp_path: Path, lines, expected):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    with pytest.raises(DataError) as info:
        check_source(_cfg(tmp_path, source="manifest", path=str(manifest)))
    assert expected in str(info.value) and "bad.jsonl" in str(info.value)


def test_manifest_file_level_errors_before_ray(tmp_path: Path):
    with pytest.raises(DataError, match=r"m\.csv: unknown manifest suffix '\.csv'; allowed"):
        (tmp_path / "m.csv").write_text("x")
        check_source(_cfg(tmp_path, source="manifest", path=str(tmp_path / "m.csv")))
    with pytest.raises(DataError, match=r"absent\.jsonl: manifest not found; check data.path"):
        check_source(_cfg(tmp_path, source="manifest", path=str(tmp_path / "absent.jsonl")))
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"m\.jsonl: line 2: expected a JSON object, got list"):
        check_source(_cfg(tmp_path, source="manifest", path=str(tmp_path / "m.jsonl")))
    prefix = b'{"image": "a.jpg", "caption": "'
    (tmp_path / "m.jsonl").write_bytes(prefix + b'\xff"}\n')
    with pytest.raises(DataError, match=rf"m\.jsonl: not valid UTF-8 at byte {len(prefix)} "):
        check_source(_cfg(tmp_path, source="manifest", path=str(tmp_path / "m.jsonl")))
    (tmp_path / "m.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"m\.parquet: not a readable Parquet file"):
        check_source(_cfg(tmp_path, source="manifest", path=str(tmp_path / "m.parquet")))


def test_a_split_without_captions_says_why(tmp_path: Path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": "  ", "split": "val"}]))
    error = _raised(lambda: count_splits(_cfg(tmp_path, source="manifest", path=str(manifest)), ["train", "val"]))
    assert "split 'val' has no images with captions" in str(error)
    assert "captions are all empty are dropped" in str(error)


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
    cfg = _cfg(tmp_path, source="webdataset", path=str(tmp_path / "shard-{00000..00001}.tar"))
    check_source(cfg)
    rows = source_dataset(cfg, ["train"]).take_all()  # shard order, then member order
    assert [r["image_id"] for r in rows] == ["000000000", "000000001", "sub/000000005", "000000007"]
    assert [r["captions"] for r in rows] == [["a real photo"], ["caption from json"], ["png sample"], ["webp"]]
    assert rows[0]["caption_ids"] == ["000000000#0"] and {r["split"] for r in rows} == {"train"}
    assert rows[0]["data"] == jpegs[0] and rows[1]["data"] == jpegs[1] and rows[0]["path"] is None
    np.testing.assert_array_equal(decode_image(rows[2]["data"]), np.full((3, 4, 3), (9, 8, 7), np.uint8))
    assert count_splits(cfg, ["train"])["train"]["images"] == 4
    by_glob = _cfg(tmp_path, source="webdataset", path=str(tmp_path / "shard-*.tar"))
    assert source_dataset(by_glob, ["train"]).take_all() == rows


def test_webdataset_errors(tmp_path: Path):
    jpeg = val_jpegs(1)[0].read_bytes()
    _write_shard(tmp_path / "a.tar", [("k.jpg", jpeg), ("k.txt", b"x")])
    _write_shard(tmp_path / "b.tar", [("k.jpg", jpeg), ("k.txt", b"y")])
    error = _raised(lambda: count_splits(_cfg(tmp_path, source="webdataset", path=str(tmp_path / "[ab].tar")),
                                         ["train"]))
    assert "duplicate image id 'k'" in str(error)
    _write_shard(tmp_path / "c.tar", [("k.jpg", jpeg), ("k.txt", "caf\u00e9".encode("latin-1"))])
    error = _raised(lambda: count_splits(_cfg(tmp_path, source="webdataset", path=str(tmp_path / "c.tar")), ["train"]))
    assert "c.tar: member k.txt: not valid UTF-8 at byte 3" in str(error)
    _write_shard(tmp_path / "d.tar", [("k.jpg", jpeg), ("k.json", b"{oops")])
    error = _raised(lambda: count_splits(_cfg(tmp_path, source="webdataset", path=str(tmp_path / "d.tar")), ["train"]))
    assert "d.tar: member k.json: invalid JSON" in str(error)
    (tmp_path / "e.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataError, match=r"e\.tar: not a readable tar shard"):
        check_source(_cfg(tmp_path, source="webdataset", path=str(tmp_path / "e.tar")))
    with pytest.raises(DataError, match=r"missing\.tar: shard not found"):
        check_source(_cfg(tmp_path, source="webdataset", path=str(tmp_path / "missing.tar")))
    with pytest.raises(DataError, match="matches no files"):
        check_source(_cfg(tmp_path, source="webdataset", path=str(tmp_path / "none-*.tar")))


# ---------------------------------------------------------------------------------------------- caption files


def test_caption_files_in_one_task_splits_and_limit(tmp_path: Path):
    karpathy = write_karpathy_from_coco(tmp_path / "dataset_coco.json")
    cfg = _cfg(tmp_path, source="karpathy", path=str(karpathy), image_root=str(COCO))
    assert [r["image_id"] for r in source_dataset(cfg, ["val"]).take_all()] == \
        ["397133", "475678", "431848", "229358", "126107", "463690"]  # file order
    counts = count_splits(cfg, ["train", "val", "test"])
    assert {s: (c["images"], c["captions"]) for s, c in counts.items()} == \
        {"train": (3, 15), "val": (6, 30), "test": (5, 25)}
    limited = _cfg(tmp_path, source="karpathy", path=str(karpathy), image_root=str(COCO), limit_images=2)
    assert [r["image_id"] for r in source_dataset(limited, ["val", "test"]).take_all()] == \
        ["397133", "475678", "269314", "165518"]  # the first two of each split
    coco = _cfg(tmp_path, source="coco", coco_splits={
        "train": {"captions": str(COCO / "annotations/captions_train2017.json"), "images": str(COCO / "train2017")},
        "val": {"captions": str(COCO / "annotations/captions_val2017.json"), "images": str(COCO / "val2017")}})
    counts = count_splits(coco, ["train", "val"])
    assert (counts["train"]["images"], counts["val"]["captions"]) == (3, 55)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": 3, "sentences": []}]}))
    error = _raised(lambda: count_splits(_cfg(tmp_path, source="karpathy", path=str(broken)), ["train"]))
    assert str(error) == f"{broken}: images[0]: key 'split' must be str, got int 3"


# ---------------------------------------------------------------------------------------------- identity


def test_source_identity_follows_the_index_files(tmp_path: Path):
    folder = tmp_path / "one"
    folder.mkdir()
    for jpeg in val_jpegs(3):
        shutil.copy(jpeg, folder / jpeg.name)
    manifest = folder / "m.jsonl"
    lines = [json.dumps({"image": j.name, "captions": [f"caption {k}"]}) for k, j in enumerate(val_jpegs(3))]
    manifest.write_text("\n".join(lines))
    base = source_identity(_cfg(tmp_path, source="manifest", path=str(manifest)))
    assert len(base) == 64 and source_identity(_cfg(tmp_path, source="manifest", path=str(manifest))) == base

    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)  # the same files on another mount: the same dataset
    assert source_identity(_cfg(tmp_path, source="manifest", path=str(moved / "m.jsonl"))) == base
    manifest.write_text("\n".join(lines).replace("caption 1", "caption 1!"))
    assert source_identity(_cfg(tmp_path, source="manifest", path=str(manifest))) != base
    limited = _cfg(tmp_path, source="manifest", path=str(moved / "m.jsonl"), limit_images=2)
    assert source_identity(limited) != base


# ---------------------------------------------------------------------------------------------- epoch order


def test_each_epoch_has_its_own_seeded_order_whatever_the_blocks(tmp_path: Path):
    from raydistill.pipeline.plans import shuffled

    def order(seed: int, epoch: int, blocks: int, mode: str = "global") -> list[str]:
        cfg = config_from_dict({"train": {"seed": seed, "shuffle": mode}, "ray": {"shuffle_partitions": 4}})
        rows = ray.data.from_items([{"image_id": f"img{k:03d}", "v": k} for k in range(200)],
                                   override_num_blocks=blocks)
        return [r["image_id"] for r in shuffled(rows, cfg, epoch).take_all()]

    first = order(seed=0, epoch=0, blocks=3)
    assert sorted(first) == [f"img{k:03d}" for k in range(200)]  # a permutation: nothing lost or repeated
    assert order(seed=0, epoch=0, blocks=7) == first  # the same order from other blocks (a resumed run's)
    assert order(seed=0, epoch=1, blocks=3) != first  # a new order every epoch
    assert order(seed=1, epoch=0, blocks=3) != first  # and for every seed
    assert order(seed=0, epoch=0, blocks=3, mode="files") == [f"img{k:03d}" for k in range(200)]


def test_a_globally_shuffled_epoch_runs_under_rays_own_queue_rule_and_other_pipelines_keep_held_queues():
    # Behind the sort, held queues stopped decoding after a million-row epoch's first batch (one batch in two
    # minutes; 4,905 rows/s under Ray's own rule). The module's context is a budgeted run's (held queues).
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES as RAYS,
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY as KEY,
    )

    from raydistill.pipeline.backpressure import HeldQueues
    from raydistill.pipeline.plans import shuffled

    def policies(ds) -> list[type]:
        return ds.context.get_config(KEY, RAYS)

    held = ray.data.DataContext.get_current().get_config(KEY, RAYS)
    assert HeldQueues in held
    rows = ray.data.from_items([{"image_id": f"img{k:03d}"} for k in range(50)])
    cfg = config_from_dict({"train": {"shuffle": "global"}, "ray": {"shuffle_partitions": 2}})
    epoch = shuffled(rows, cfg, 0).map_batches(lambda batch: batch)  # the stages after it share its context
    assert policies(epoch) == RAYS and HeldQueues not in policies(epoch)
    assert sorted(r["image_id"] for r in epoch.take_all()) == [f"img{k:03d}" for k in range(50)]
    # the process's context, and a pipeline built after, keep the held queues
    assert ray.data.DataContext.get_current().get_config(KEY, RAYS) == held
    files = config_from_dict({"train": {"shuffle": "files"}})
    assert policies(shuffled(ray.data.from_items([{"image_id": "a"}]), files, 0)) == held


def test_decode_splits_a_large_block_across_tasks_in_order(monkeypatch):
    # A Parquet read makes blocks of thousands of light rows, and one task decodes a whole block: the decode
    # stage takes blocks of at most DECODE_BLOCK_ROWS images, in the source's order.
    from raydistill.pipeline import plans

    monkeypatch.setattr(plans, "DECODE_BLOCK_ROWS", 100)
    jpegs = val_jpegs(5)
    rows = ray.data.from_items([{"image_id": f"img{k:03d}", "path": str(jpegs[k % 5]),
                                 "captions": ["a"], "caption_ids": [f"c{k}"]}
                                for k in range(250)], override_num_blocks=1)
    decoded = plans.decoded(rows, config_from_dict({}), {"pixels": 16}, None, count_bad=False)
    blocks = [ray.get(ref) for bundle in decoded.iter_internal_ref_bundles() for ref in bundle.block_refs]
    assert max(block.num_rows for block in blocks) <= 100  # not 250: the one block went to three tasks
    ids = [i for block in blocks for i in block.column("image_id").to_pylist()]
    assert ids == [f"img{k:03d}" for k in range(250)]
    assert all(tuple(block.column("pixels").type.shape) == (16, 16, 3) for block in blocks)
    # A cache's parts, read a part per task, are decoded a part per task.
    whole = plans.decoded(rows, config_from_dict({}), {"pixels": 16}, None, count_bad=False, regroup=False)
    assert [ray.get(ref).num_rows for bundle in whole.iter_internal_ref_bundles() for ref in bundle.block_refs] == [250]


def test_one_worker_reads_its_epoch_through_a_split_coordinator_in_order():
    # A Train worker iterating its epoch's dataset would run Ray Data's streaming executor as a thread of its
    # own process, beside training; through worker_shard the executor runs in Ray Data's split coordinator.
    import threading
    import time

    from raydistill.pipeline.train_loop import epoch_batches, worker_shard

    def rows(batch: dict) -> dict:
        time.sleep(0.1)  # still reading when the first batches arrive
        return {"pixels": batch["id"].reshape(-1, 1), "v": batch["id"] * 10}

    def epoch() -> ray.data.Dataset:
        return ray.data.range(400, override_num_blocks=16).map_batches(rows, batch_size=25)

    def read(batches) -> tuple[list[int], set[str]]:
        values, threads = [], set()
        for batch in batches:
            threads |= {t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor")}
            values.extend(int(v) for v in batch["v"])
        return values, threads

    values, threads = read(epoch().iter_batches(batch_size=64))
    assert values == [10 * k for k in range(400)] and threads  # iterated here, the executor runs here

    values, threads = read(epoch_batches(worker_shard(epoch(), rank=0, world=1), rank=0, seed=0, epoch=0,
                                         batch_size=64, window=0))
    assert values == [10 * k for k in range(384)]  # every full batch of 64, in the dataset's order
    assert threads == set()


def test_batches_without_a_shuffle_window_are_writable_copies():
    # Without a window (train.shuffle_buffer: 0) the rows are not permuted, so no copy of Ray's read-only
    # zero-copy arrays was made: torch warned that its tensors would share memory it may not write.
    import warnings

    from raydistill.pipeline.train_loop import epoch_batches, worker_shard

    ds = ray.data.range(256, override_num_blocks=4).map_batches(
        lambda b: {"pixels": np.repeat(b["id"][:, None], 3, axis=1), "v": b["id"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(epoch_batches(worker_shard(ds, rank=0, world=1), rank=0, seed=0, epoch=0, batch_size=64,
                                     window=0))
    assert [int(v) for b in batches for v in b["v"]] == list(range(256))
    assert all(b["pixels"].shape == (64, 3) and b["pixels"].numpy().flags.writeable for b in batches)
