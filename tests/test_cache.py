"""The embedding cache: atomic parts named by their ids, one folder per split, exactly-once finalisation by a
Ray pass that keeps counts only, key checks that say which part differs, and caches of an earlier schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from raydistill.pipeline.cache import CacheError, EmbeddingCache, id_hash, make_key

pytestmark = [pytest.mark.ray]
DIM = 4
KEY = make_key({"kind": "raydistill", "checkpoint": "/t"}, {"decode_size": 48}, "data-1")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from raydistill.config import config_from_dict
    from raydistill.pipeline.plans import configure_data_context

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    configure_data_context(config_from_dict({}))
    yield
    ray.shutdown()


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


def _cache(tmp_path: Path) -> EmbeddingCache:
    cache = EmbeddingCache(str(tmp_path / "c"))
    cache.open(KEY, DIM, "weights-1")
    return cache


def test_parts_round_trip_by_split(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    rows = _rows(["a", "b", "c"])
    rows["split"] = ["train", "test", "train"]
    written = cache.write_part(rows, DIM)
    assert [Path(p).parent.name for p in written] == ["train", "test"]
    assert not list((tmp_path / "c" / "parts").rglob("*.tmp*"))
    got = sorted(cache.split_dataset("train").take_all(), key=lambda r: r["image_id"])
    assert [r["image_id"] for r in got] == ["a", "c"]
    np.testing.assert_array_equal(got[1]["t_img"], rows["t_img"][2])
    np.testing.assert_array_equal(np.asarray(got[1]["t_txt"]).reshape(2, DIM), rows["t_txt"][2])
    assert cache.has_rows("test") and not cache.has_rows("val")
    assert cache.ids_dataset("val") is None


def test_a_retried_batch_overwrites_its_own_part(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    first = cache.write_part(_rows(["b", "a"]), DIM)
    again = cache.write_part(_rows(["a", "b"]), DIM)  # the same images, as a retry would write them
    assert first == again and len(cache.part_files("train")) == 1


def test_finalize_counts_checks_ids_and_removes_duplicates(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.write_part(_rows(["a", "b"]), DIM)
    cache.write_part(_rows(["b", "c"]), DIM)  # "b" in two parts: an interrupted pass re-batched it
    # A writer killed mid-write leaves only a temporary file, which is ignored.
    (tmp_path / "c" / "parts" / "train" / "part-dead.parquet.tmp-1").write_bytes(b"half a file")
    assert cache.count("train") == {"rows": 4, "captions": 8, "id_hash": id_hash(["a", "b", "b", "c"])}
    stats = cache.finalize("train", 3, id_hash(["a", "b", "c"]))
    assert stats == {"images": 3, "captions": 6, "duplicates_removed": 1}
    ids = [i for f in cache.part_files("train") for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]
    assert sorted(ids) == ["a", "b", "c"]
    assert cache.complete_splits() == {"train": {"images": 3, "captions": 6}}


def test_finalize_refuses_gaps_and_foreign_images(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.write_part(_rows(["a"]), DIM)
    with pytest.raises(CacheError, match=r"split 'train' holds 1 images but the data has 2 .*raydistill embed"):
        cache.finalize("train", 2, id_hash(["a", "b"]))
    with pytest.raises(CacheError, match="or other ones"):
        cache.finalize("train", 1, id_hash(["z"]))  # as many images, but not the data's
    assert cache.complete_splits() == {}


def test_stale_cache_is_refused_with_the_reason(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    other = make_key({"kind": "raydistill", "checkpoint": "/t"}, {"decode_size": 64}, "data-1")
    with pytest.raises(CacheError, match=r"stale.*preprocessing: cache has \{\"decode_size\": 48\}, "
                                         r"this run has \{\"decode_size\": 64\}"):
        cache.open(other, DIM, "weights-1")
    with pytest.raises(CacheError, match="teacher: cache has"):
        cache.check(make_key({"kind": "raydistill", "checkpoint": "/u"}, {"decode_size": 48}, "data-1"))
    with pytest.raises(CacheError, match="teacher's weights differ"):
        cache.open(KEY, DIM, "weights-2")


def test_require_complete_names_missing_split(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="raydistill embed"):
        EmbeddingCache(str(tmp_path / "c")).require_complete(KEY, ["train"])
    cache = _cache(tmp_path)
    cache.write_part(_rows(["a"]), DIM)
    cache.finalize("train", 1, id_hash(["a"]))
    with pytest.raises(CacheError, match=r"not completed split\(s\) \['test'\]"):
        cache.require_complete(KEY, ["train", "test"])
    assert cache.require_complete(KEY, ["train"])["complete_splits"]["train"]["images"] == 1
    assert cache.dim() == DIM


def test_corrupt_manifest_and_an_earlier_schema_are_reported(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json is corrupt"):
        cache.manifest()
    # A cache written before parts were kept per split (schema 1) is not read: the message says what to do.
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(
        {"fingerprint": {"schema_version": 1, "hash": "x"}, "dim": 4, "complete_splits": {}}))
    with pytest.raises(CacheError, match=r"earlier raydistill \(schema 1, this one reads 2\).*raydistill embed"):
        cache.manifest()


def test_a_first_pass_that_delivered_every_image_is_not_read_back(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.write_part(_rows(["a", "b"]), DIM)
    delivered = {"images": 2, "captions": 4, "id_hash": id_hash(["b", "a"])}
    assert cache.finalize("train", 2, id_hash(["a", "b"]), delivered=delivered) == \
        {"images": 2, "captions": 4, "duplicates_removed": 0}
    # What a pass delivered but does not match (a worker restarted, images re-embedded): the parts are counted.
    cache.write_part(_rows(["c"], split="val"), DIM)
    wrong = {"images": 3, "captions": 6, "id_hash": id_hash(["c", "c", "c"])}
    assert cache.finalize("val", 1, id_hash(["c"]), delivered=wrong)["images"] == 1


def test_a_train_workers_split_coordinator_runs_the_split_with_held_queues(tmp_path: Path) -> None:
    # A Train worker reads its epoch through a split coordinator, an actor of its own whose process runs Ray
    # Data's executor: the budgeted pipeline's back-pressure must reach it with the dataset, not stay in the
    # worker's process.
    from ray.data._internal.execution.backpressure_policy import ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY

    from raydistill.pipeline.backpressure import HeldQueues
    from raydistill.pipeline.train_loop import worker_shard

    cache = _cache(tmp_path)
    for k in range(3):
        cache.write_part(_rows([f"s{k}-{i}" for i in range(5)]), DIM)
    shard = worker_shard(cache.split_dataset("train", ["image_id"]), 0, 1)
    assert HeldQueues in shard.get_context().get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY)
    assert sorted(r["image_id"] for r in shard.iter_rows()) == sorted(f"s{k}-{i}" for k in range(3) for i in range(5))


def test_an_epoch_reads_the_cache_a_part_per_task_and_other_reads_a_block_per_task(tmp_path: Path, monkeypatch) -> None:
    # Ray Data packs Parquet files into read tasks of up to 128 MiB of rows, and a task streams its blocks out
    # whatever the pipeline's budget. A split's rows (an epoch, an evaluation) are read a part per task: a part is
    # a teacher batch, a block the decode stage takes whole, so light rows do not wait for decoding in the store.
    # Other Parquet reads (a manifest's) take tasks of about one block under a budget.
    import re

    from raydistill.config import config_from_dict
    from raydistill.pipeline.plans import configure_data_context

    cache = _cache(tmp_path)
    for k in range(24):  # 24 parts of 400 rows: a little over 1 MiB of rows in all
        cache.write_part(_rows([f"p{k:02d}-{i:03d}" for i in range(400)]), DIM)
    saved = ray.data.DataContext.get_current().copy()
    monkeypatch.delenv("RAY_DATA_PARQUET_BIN_PACKING_BYTES", raising=False)

    def read_tasks(budget_mb: int | None, read) -> tuple[int, int]:
        ray.data.DataContext._set_current(saved.copy())
        configure_data_context(config_from_dict({"ray": {"data_object_store_mb": budget_mb}}))
        ds = read().materialize()
        tasks = re.search(r"ReadFilesParquetV2\S*: (\d+) tasks executed", ds.stats())
        return int(tasks.group(1)), ds.count()

    def whole_files():  # the same files read whole, as a Parquet manifest is
        return ray.data.read_parquet(cache.part_files("train"))

    try:
        # Ray Data's packing alone: one task reads every part
        assert read_tasks(None, whole_files) == (1, 9600)
        # A budget of 1 MiB: blocks of at most 256 KiB, and read tasks of about one block each.
        tasks, rows = read_tasks(1, whole_files)
        assert rows == 9600 and 4 <= tasks < 24
        before = dict(os.environ)
        for budget_mb in (None, 1):
            assert read_tasks(budget_mb, lambda: cache.split_dataset("train")) == (24, 9600)
            assert dict(os.environ) == before  # the read's own packing is not left behind
        # Rows sorted before decoding (train.shuffle: global) are read as other reads are: fewer tasks to exchange.
        assert read_tasks(1, lambda: cache.split_dataset("train", part_per_task=False)) == (tasks, 9600)
    finally:
        ray.data.DataContext._set_current(saved)
