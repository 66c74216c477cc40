"""Reliability: runs survive killed workers, killed teacher actors and full disks, and end where they should.

On a local Ray instance: a teacher actor killed mid-pass while ``embed`` resumes a partial cache (a
0.05 M-parameter teacher, 120 synthetic images): every image and caption ends up in the cache exactly once, and
only the missing images were embedded. A student worker killed mid-epoch is tested in the stream run of
tests/test_e2e_run.py, a killed driver in tests/test_resume_cli.py.

The rest needs no Ray: atomic checkpoint writes on a full disk, recovery skipping a truncated checkpoint,
unwritable output folders, and a split with no images. Bad images, bad dataset files, bad teacher checkpoints,
bad configs and an unreachable MLflow are tested where those readers live (test_images, test_sources,
test_data_properties, test_teachers_*, test_config*, test_tracking).
"""

from __future__ import annotations

import errno
import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from e2e_helpers import (
    TEACHER_DIM,
    decoded_rows,
    make_tiny_teacher,
    read_records,
    tiny_config,
)

from raydistill.config import ConfigError, config_from_dict
from raydistill.data.source import source_identity
from raydistill.pipeline.cache import EmbeddingCache
from raydistill.pipeline.runner import embed, run_experiment
from raydistill.pipeline.teacher_side import cache_key, teacher_spec
from raydistill.pipeline.teacher_stage import TeacherEmbedder
from raydistill.pipeline.trainer import (
    HISTORY_FILE,
    STATE_FILE,
    Trainer,
    latest_checkpoint,
)

TEACHER_BATCH = 16  # teacher.pool.batch_size of the embed test: several teacher batches per pass


# ------------------------------------------------------------------------------------------------ helpers
def _column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _rows(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in batch.items()}


def _cache_rows(cache_dir: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> list[dict[str, Any]]:
    rows = []
    for split in splits:
        for path in EmbeddingCache(str(cache_dir)).part_files(split):
            rows.extend(pq.read_table(path).to_pylist())
    return rows


# ------------------------------------------------------------------------------------------------ no Ray
@pytest.fixture()
def trainer() -> Trainer:
    cfg = config_from_dict({"student": {"preset": "test"}, "distill": {"queue_size": 16}})
    return Trainer(cfg, embed_dim=16, vocab_size=60, planned_steps=10,
                   device=torch.device("cpu"))


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    # What torch itself raises when its zip writer cannot write (a full disk, a vanished mount).
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),
])
def test_a_checkpoint_write_cut_short_keeps_the_previous_one(trainer: Trainer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            failure: Exception) -> None:
    trainer.step, trainer.history = 3, [{"step": 3, "loss/total": 1.5}]
    trainer.save(tmp_path)
    saved_state = (tmp_path / STATE_FILE).read_bytes()
    saved_history = (tmp_path / HISTORY_FILE).read_text()

    real_save = torch.save

    def half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half a file on disk
        raise failure

    trainer.step, trainer.history = 6, [{"step": 3, "loss/total": 1.5}, {"step": 6, "loss/total": 1.2}]
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match=rf"cannot write the training checkpoint {tmp_path / STATE_FILE}: .*"
                                      rf"(No space left on device|file write failed)"):
        trainer.save(tmp_path)
    monkeypatch.undo()
    # The previous checkpoint is intact, byte for byte, and nothing half-written is left beside it.
    assert (tmp_path / STATE_FILE).read_bytes() == saved_state
    assert (tmp_path / HISTORY_FILE).read_text() == saved_history
    assert sorted(p.name for p in tmp_path.iterdir()) == [HISTORY_FILE, STATE_FILE]
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 3


def test_recovery_skips_a_checkpoint_copy_cut_short(trainer: Trainer, tmp_path: Path) -> None:
    older = tmp_path / "checkpoint_2026-01-01_00-00-01.000000"
    newer = tmp_path / "checkpoint_2026-01-01_00-00-02.000000"
    trainer.step = 3
    trainer.save(older)
    trainer.step = 6
    trainer.save(newer)
    assert latest_checkpoint(tmp_path) == newer
    data = (newer / STATE_FILE).read_bytes()
    (newer / STATE_FILE).write_bytes(data[: len(data) // 3])  # a copy to storage that died midway
    assert latest_checkpoint(tmp_path) == older
    trainer.restore(older)
    assert trainer.step == 3
    (tmp_path / "checkpoint_2026-01-01_00-00-03.000000").mkdir()  # created, nothing written yet
    assert latest_checkpoint(tmp_path) == older


@pytest.mark.parametrize("key", ["train.storage_path", "output_dir"])
def test_an_unwritable_output_location_stops_the_run_before_it_starts(tmp_path: Path, key: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    target = blocker / "sub"  # no one can create a folder inside a file, root included
    teacher = tmp_path / "no-teacher-needed"
    if key == "output_dir":
        cfg = tiny_config(teacher, target)
    else:
        cfg = tiny_config(teacher, out, extra=[f"{key}={target}"])
    with pytest.raises(ConfigError, match=rf"{key}={target}.*: cannot write there \(Not a directory\); "
                                          rf"point {key} at a writable folder"):
        run_experiment(cfg)
    # Nothing was created: no run folder, no config copy, no MLflow store.
    assert not out.exists() or not any(out.rglob("*"))
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("reliability")
    teacher = make_tiny_teacher(home / "teacher")
    marker = home / "teacher-killed"
    # Set before Ray starts: its worker processes inherit the environment.
    os.environ["RAYDISTILL_KILL_TEACHER_AT"] = f"2:{marker}"
    ray.init(address="local", num_cpus=6, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield {"teacher": teacher, "marker": marker}
    ray.shutdown()
    os.environ.pop("RAYDISTILL_KILL_TEACHER_AT", None)


@pytest.mark.ray
@pytest.mark.slow
def test_a_teacher_actor_killed_mid_pass_leaves_every_image_embedded_once(ray_env: dict, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cfg = tiny_config(ray_env["teacher"], tmp_path, extra=[f"cache.dir={cache_dir}",
                                                          f"teacher.pool.batch_size={TEACHER_BATCH}"])
    records = read_records(cfg)
    splits = ("train", "val", "test")
    assert set(records) == set(splits)

    # A partial cache, as an earlier pass cut short leaves it: the first 32 training images.
    spec = teacher_spec(cfg)
    early = records["train"][:32]
    EmbeddingCache(str(cache_dir)).open(cache_key(cfg, spec, source_identity(cfg)), TEACHER_DIM,
                                        TeacherEmbedder(spec, TEACHER_DIM).teacher.fingerprint)
    TeacherEmbedder(spec, TEACHER_DIM, cache_uri=str(cache_dir))(decoded_rows(early, {"image": cfg.data.decode_size}))
    assert len(EmbeddingCache(str(cache_dir)).part_files("train")) == 1

    summary = embed(cfg)

    # The actor died right after writing its second part of the training pass (of four: 64 images left).
    assert ray_env["marker"].read_text() == "teacher actor killed after writing part 2\n"
    n_images = {s: len(records[s]) for s in splits}
    n_captions = {s: sum(len(r["captions"]) for r in records[s]) for s in splits}
    assert summary["splits"] == {s: {"images": n_images[s], "captions": n_captions[s]} for s in splits}
    # Only the missing images were embedded, each once, although one batch was lost with the actor.
    assert summary["teacher_images_embedded"] == sum(n_images.values()) - len(early)
    assert summary["teacher_captions_embedded"] == sum(n_captions.values()) - sum(len(r["captions"]) for r in early)

    # The cache: every image exactly once, with its own captions, in its own split; nothing else.
    rows = _cache_rows(cache_dir)
    counts = Counter(r["image_id"] for r in rows)
    assert max(counts.values()) == 1
    by_id = {r["image_id"]: r for r in rows}
    for split in splits:
        assert {i for i, r in by_id.items() if r["split"] == split} == {r["image_id"] for r in records[split]}
    for record in (r for s in splits for r in records[s]):
        row = by_id[record["image_id"]]
        assert row["caption_ids"] == list(record["caption_ids"])
        assert row["captions"] == list(record["captions"])
        assert len(row["t_txt"]) == len(record["captions"]) * TEACHER_DIM
    assert not [p for p in (cache_dir / "parts").rglob("*") if p.is_file() and not p.name.endswith(".parquet")]

    # ... and the embeddings are the teacher's for that image and those captions (not a neighbour's).
    everything = [r for s in splits for r in records[s]]
    reference = TeacherEmbedder(spec, TEACHER_DIM)(decoded_rows(everything, {"image": cfg.data.decode_size}))
    for i, record in enumerate(everything):
        row = by_id[record["image_id"]]
        np.testing.assert_allclose(np.asarray(row["t_img"]), reference["t_img"][i], atol=1e-5)
        np.testing.assert_allclose(np.asarray(row["t_txt"]).reshape(-1, TEACHER_DIM), reference["t_txt"][i], atol=1e-5)
