"""Reliability: runs survive killed workers, killed teacher actors and full disks, and end where they should.

Two Ray runs on one local instance (a 0.05 M-parameter student, 120 synthetic images):

- a teacher actor killed mid-pass while ``embed`` resumes a partial cache: every image and caption ends up
  in the cache exactly once, and only the missing images were embedded;
- a student worker killed mid-epoch, with shuffling on (a seeded global order per epoch and a window shuffle
  of caption rows): the run resumes from its last checkpoint and ends in exactly the state of an uninterrupted
  run with the same seed, computed here without Ray from the same rows in the same order (student, optimizer,
  scheduler, queues, balancer, loss curve).

The rest needs no Ray: atomic checkpoint writes on a full disk, recovery skipping a truncated checkpoint,
unwritable output folders, and a split with no images. Bad images, bad dataset files, bad teacher checkpoints,
bad configs and an unreachable MLflow are tested where those readers live (test_images, test_sources,
test_data_properties, test_teachers_*, test_config*, test_tracking).
"""

from __future__ import annotations

import errno
import io
import json
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
    BATCH,
    TEACHER_DIM,
    assert_same_state,
    decoded_rows,
    make_tiny_teacher,
    tiny_config,
    uninterrupted_reference,
)
from raydistill.config import ConfigError, config_from_dict
from raydistill.data.source import caption_files, source_identity
from raydistill.data.sources import read_karpathy
from raydistill.pipeline.cache import EmbeddingCache
from raydistill.pipeline.runner import embed, run_experiment
from raydistill.pipeline.teacher_side import cache_key, teacher_spec
from raydistill.pipeline.teacher_stage import TeacherEmbedder
from raydistill.pipeline.trainer import HISTORY_FILE, STATE_FILE, Trainer, latest_checkpoint

TEACHER_BATCH = 16  # teacher.pool.batch_size of the embed test: several teacher batches per pass


# ------------------------------------------------------------------------------------------------ helpers
def _column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def read_records(cfg: Any) -> dict[str, list[dict[str, Any]]]:
    """The synthetic source's records by split, read in this process (the pipeline reads them in Ray tasks)."""
    (_, json_path, image_root, _), = caption_files(cfg)
    by_split: dict[str, list[dict[str, Any]]] = {}
    for record in read_karpathy(json_path, image_root):
        by_split.setdefault(record["split"], []).append(record)
    return by_split





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
    return Trainer(cfg.model_dump(mode="json"), embed_dim=16, vocab_size=60, planned_steps=10,
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
    records = read_records(tiny_config(teacher, home / "probe"))
    per_epoch = sum(len(r["captions"]) for r in records["train"]) // BATCH
    # The worker dies two steps after a checkpoint taken three steps into the second epoch, so the resumed
    # worker must skip the batches of that epoch it already trained on.
    plan = {"per_epoch": per_epoch, "checkpoint_every": per_epoch + 3, "kill_at": per_epoch + 5,
            "planned": per_epoch + 6}
    markers = {"worker": home / "worker-killed", "teacher": home / "teacher-killed"}
    # Set before Ray starts: its worker processes inherit the environment.
    os.environ["RAYDISTILL_KILL_WORKER_AT"] = f"{plan['kill_at']}:{markers['worker']}"
    os.environ["RAYDISTILL_KILL_TEACHER_AT"] = f"2:{markers['teacher']}"
    ray.init(address="local", num_cpus=6, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield {"teacher": teacher, "markers": markers, **plan}
    ray.shutdown()
    os.environ.pop("RAYDISTILL_KILL_WORKER_AT", None)
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
    assert ray_env["markers"]["teacher"].read_text() == "teacher actor killed after writing part 2\n"
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


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_killed_mid_epoch_resumes_to_the_state_of_an_uninterrupted_run(ray_env: dict,
                                                                                tmp_path: Path) -> None:
    planned, every, per_epoch = ray_env["planned"], ray_env["checkpoint_every"], ray_env["per_epoch"]
    cache_dir = tmp_path / "cache"
    cfg = tiny_config(ray_env["teacher"], tmp_path, steps=planned, extra=[
        f"train.checkpoint_every={every}", "train.log_every=1", "tracking.enabled=false", "train.max_failures=2",
        f"cache.dir={cache_dir}", "train.shuffle=global", "train.shuffle_buffer=64",
    ])
    summary = run_experiment(cfg)

    assert ray_env["markers"]["worker"].read_text() == f"killed at step {ray_env['kill_at']}\n"
    assert summary["steps"] == summary["planned_steps"] == planned
    assert summary["resumed_from_step"] == every  # the checkpoint before the kill, in the second epoch
    state = torch.load(Path(summary["checkpoint"]) / STATE_FILE, weights_only=True)
    assert (state["step"], state["epoch"], state["epoch_start_step"]) == (planned, 1, per_epoch)

    reference, outputs = uninterrupted_reference(cfg, Path(summary["run_dir"]), cache_dir, planned)
    # Student, optimizer moments, LR schedule, teacher-embedding queues, balancer history, RNG: all equal.
    assert_same_state(state, reference.state_dict())

    # The loss curve is continuous: each step logged once, with the uninterrupted run's values.
    history = json.loads((Path(summary["checkpoint"]) / HISTORY_FILE).read_text())
    assert [h["step"] for h in history] == list(range(1, planned + 1))
    for h in history:
        expected = outputs[h["step"]]
        assert {k: v for k, v in h.items() if k != "step"} == {
            k: v for k, v in expected.items() if k.startswith(("loss/", "weight/"))}
