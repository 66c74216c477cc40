"""The embedding cache: atomic parts, exactly-once finalisation, fingerprint checks, resumable state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydistill.pipeline.cache import CacheError, EmbeddingCache, make_fingerprint, rows_from_cache_batch

DIM = 4


def _rows(ids: list[str], split: str = "train", n_caps: int = 2) -> dict:
    rng = np.random.default_rng(abs(hash(tuple(ids))) % 2**32)
    return {
        "image_id": ids,
        "split": [split] * len(ids),
        "path": [f"/img/{i}.jpg" for i in ids],
        "data": None,
        "captions": [[f"{i} cap {k}" for k in range(n_caps)] for i in ids],
        "caption_ids": [[f"{i}#{k}" for k in range(n_caps)] for i in ids],
        "t_img": rng.normal(size=(len(ids), DIM)).astype(np.float32),
        "t_txt": [rng.normal(size=(n_caps, DIM)).astype(np.float32) for _ in ids],
    }


FP = make_fingerprint({"kind": "raydistill", "fingerprint": "abc"}, {"decode_size": 48}, "data-1")


def test_parts_round_trip_embeddings(tmp_path: Path) -> None:
    cache = EmbeddingCache(str(tmp_path / "c"))
    cache.open(FP, DIM)
    rows = _rows(["a", "b", "c"])
    path = cache.write_part(rows, DIM)
    assert path.endswith(".parquet") and not list((tmp_path / "c" / "parts").glob("*.tmp"))
    got = cache.load_embeddings()
    assert sorted(got) == ["a", "b", "c"]
    np.testing.assert_array_equal(got["b"][0], rows["t_img"][1])
    np.testing.assert_array_equal(got["c"][1], rows["t_txt"][2])
    assert cache.done_ids("train") == {"a", "b", "c"} and cache.done_ids("test") == set()


def test_finalize_removes_duplicates_and_counts(tmp_path: Path) -> None:
    cache = EmbeddingCache(str(tmp_path / "c"))
    cache.open(FP, DIM)
    cache.write_part(_rows(["a", "b"]), DIM)
    cache.write_part(_rows(["b", "c"]), DIM)  # a retried batch wrote "b" twice
    # A writer killed mid-write leaves only a temporary file, which is ignored.
    (tmp_path / "c" / "parts" / "part-dead.parquet.tmp").write_bytes(b"half a file")
    stats = cache.finalize("train", {"a", "b", "c"}, expected_captions=6)
    assert stats == {"images": 3, "captions": 6, "duplicates_removed": 1}
    ids = [i for f in cache.part_files() for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]
    assert sorted(ids) == ["a", "b", "c"]
    assert cache.complete_splits() == {"train": {"images": 3, "captions": 6}}


def test_finalize_refuses_gaps(tmp_path: Path) -> None:
    cache = EmbeddingCache(str(tmp_path / "c"))
    cache.open(FP, DIM)
    cache.write_part(_rows(["a"]), DIM)
    with pytest.raises(CacheError, match=r"split 'train' misses 1 of 2 images .*'b'.*raydistill embed"):
        cache.finalize("train", {"a", "b"})
    assert cache.complete_splits() == {}


def test_stale_cache_is_refused_with_the_reason(tmp_path: Path) -> None:
    cache = EmbeddingCache(str(tmp_path / "c"))
    cache.open(FP, DIM)
    other = make_fingerprint({"kind": "raydistill", "fingerprint": "abc"}, {"decode_size": 64}, "data-1")
    with pytest.raises(CacheError, match=r"stale.*preprocessing: cache has \{\"decode_size\": 48\}, this run has \{\"decode_size\": 64\}"):
        cache.open(other, DIM)
    other_teacher = make_fingerprint({"kind": "raydistill", "fingerprint": "xyz"}, {"decode_size": 48}, "data-1")
    with pytest.raises(CacheError, match="teacher: cache has"):
        cache.check(other_teacher)


def test_require_complete_names_missing_split(tmp_path: Path) -> None:
    cache = EmbeddingCache(str(tmp_path / "c"))
    with pytest.raises(CacheError, match="raydistill embed"):
        cache.require_complete(FP, ["train"])
    cache.open(FP, DIM)
    cache.write_part(_rows(["a"]), DIM)
    cache.finalize("train", {"a"})
    with pytest.raises(CacheError, match=r"not completed split\(s\) \['test'\]"):
        cache.require_complete(FP, ["train", "test"])
    assert cache.require_complete(FP, ["train"])["complete_splits"]["train"]["images"] == 1


def test_corrupt_manifest_is_reported(tmp_path: Path) -> None:
    cache = EmbeddingCache(str(tmp_path / "c"))
    cache.open(FP, DIM)
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json is corrupt"):
        cache.manifest()


def test_rows_from_cache_batch_reshapes_flattened_text_embeddings() -> None:
    batch = {
        "image_id": np.array(["a", "b"], dtype=object),
        "t_img": np.array([np.arange(DIM, dtype=np.float32), np.ones(DIM, np.float32)], dtype=object),
        "t_txt": np.array([np.arange(2 * DIM, dtype=np.float32), np.arange(3 * DIM, dtype=np.float32)], dtype=object),
    }
    out = rows_from_cache_batch(batch)
    assert out["t_img"].shape == (2, DIM)
    assert out["t_txt"][0].shape == (2, DIM) and out["t_txt"][1].shape == (3, DIM)
    np.testing.assert_array_equal(out["t_txt"][1][2], np.arange(8, 12, dtype=np.float32))


def test_read_split_then_local_decode_gives_the_rows_ray_data_would(tmp_path: Path) -> None:
    """The driver-side path for small evaluation splits: one split's rows, its embeddings reshaped to
    [captions, d], images decoded with the run's policy (a corrupt file skipped and counted)."""
    from PIL import Image

    from raydistill.config import load_config
    from raydistill.pipeline.datasets import column_batch, decode_locally

    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255)), ("c", (0, 255, 0))):
        Image.new("RGB", (64, 32), colour).save(tmp_path / f"{name}.jpg", quality=95)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    cache = EmbeddingCache(str(tmp_path / "c"))
    cache.open(FP, DIM)
    test_rows = _rows(["a", "bad", "b"], split="test", n_caps=3)
    test_rows["path"] = [str(tmp_path / f"{i}.jpg") for i in ("a", "bad", "b")]
    cache.write_part(_rows(["c"], split="train"), DIM)
    cache.write_part(test_rows, DIM)

    table = cache.read_split("test")
    assert table.column("image_id").to_pylist() == ["a", "bad", "b"]
    batch = rows_from_cache_batch(column_batch(table.to_pydict()))
    np.testing.assert_array_equal(batch["t_img"], test_rows["t_img"])
    assert batch["t_txt"][2].shape == (3, DIM)
    np.testing.assert_array_equal(batch["t_txt"][2], test_rows["t_txt"][2])

    class Counted:
        def __init__(self) -> None:
            self.totals: dict = {}

        def add_many(self, values: dict) -> dict:
            for k, v in values.items():
                self.totals[k] = self.totals.get(k, 0) + v
            return dict(self.totals)

    counters = Counted()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quick.yaml", ["data.decode_size=16"])
    rows = decode_locally(batch, cfg, counters, chunk=2)  # two chunks: [a, bad], [b]
    assert [r["image_id"] for r in rows] == ["a", "b"]
    assert rows[0]["image"].shape == (16, 16, 3) and rows[0]["image"][8, 8].tolist() == [254, 0, 0]
    assert list(rows[1]["caption_ids"]) == ["b#0", "b#1", "b#2"]
    np.testing.assert_array_equal(rows[1]["t_img"], test_rows["t_img"][2])
    assert counters.totals == {"images_decoded": 2, "captions_decoded": 6, "bad_images": 1,
                               "bad_images/not_an_image": 1}
    assert cache.read_split("val").num_rows == 0
