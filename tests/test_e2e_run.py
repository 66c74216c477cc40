"""End to end on a real local Ray instance, a real MLflow SQLite store and real files.

One Ray instance serves the module. Each run is tiny (a 0.05 M-parameter student, 120 synthetic images),
so what is exercised is the machinery: teacher actor pool, cache, Ray Train, eval, MLflow, and recovery from a
killed Train worker (killed teacher actors and drivers: test_reliability.py, test_resume_cli.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from e2e_helpers import (
    BATCH,
    TEACHER_DIM,
    assert_same_state,
    make_tiny_teacher,
    read_records,
    tiny_config,
    uninterrupted_reference,
)
from mlflow.tracking import MlflowClient

from raydistill.pipeline.cache import CacheError, EmbeddingCache
from raydistill.pipeline.runner import embed, run_experiment
from raydistill.pipeline.trainer import HISTORY_FILE, STATE_FILE

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")
    os.environ["RAYDISTILL_HOME"] = str(home)
    ray.init(address="local", num_cpus=6, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    teacher = make_tiny_teacher(home / "teacher")
    yield {"home": home, "teacher": teacher}
    ray.shutdown()


def _check_recall(metrics: dict[str, float]) -> None:
    for key in RECALL_KEYS:
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["rsum"] == pytest.approx(sum(metrics[k] for k in RECALL_KEYS))
    assert metrics["mean_recall"] == pytest.approx(metrics["rsum"] / 6)


def _check_stream_run(summary: dict, planned: int) -> None:
    """What every stream run leaves: the training state, the exported student, recall, the MLflow record."""
    assert summary["planned_steps"] == planned and summary["steps"] == planned

    # The final checkpoint holds the whole training state.
    state = torch.load(Path(summary["checkpoint"]) / STATE_FILE, weights_only=True)
    assert state["step"] == planned
    assert state["balancer"]["_extra_state"]["step"] == planned
    assert int(state["objective"]["queue_img.ptr"]) == (planned * 32) % 100  # an enqueue of 32 per step, queue 100

    # The exported student loads and gives unit-norm embeddings of the teacher's dimension.
    from raydistill.models.student import load_dual_encoder

    model, tokenizer, extra = load_dual_encoder(summary["student_dir"])
    pixels = model.preprocess_images(np.zeros((2, 48, 48, 3), np.uint8))
    emb = model.encode_image(pixels)
    assert emb.shape == (2, TEACHER_DIM)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert extra["step"] == planned

    # Recall numbers are in range, for the student and the teacher's ceiling.
    _check_recall(summary["metrics"]["student"])
    _check_recall(summary["metrics"]["teacher"])

    # MLflow holds the params, the per-step losses and weights, the eval metrics and the artifacts.
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["balancer.kind"] == "dsmd"
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss/contrastive")]
    assert steps == list(range(1, planned + 1))
    assert client.get_metric_history(summary["run_id"], "weight/hard_negative")[-1].step == planned
    assert run.data.metrics["test/rsum"] == pytest.approx(summary["metrics"]["student"]["rsum"])
    assert run.data.metrics["teacher_test/rsum"] == pytest.approx(summary["metrics"]["teacher"]["rsum"])
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"config.yaml", "recall_table.json", "balancer_weights.png", "student"} <= artifacts
    table = json.loads((Path(summary["run_dir"]) / "recall_table.json").read_text())
    assert table["student"]["rsum"] == pytest.approx(summary["metrics"]["student"]["rsum"])


def _actor_classes() -> set[str]:
    """Class names of every actor this instance has run, live or dead (from the GCS: no dashboard here)."""
    return {a["ActorClassName"] for a in ray._private.state.actors().values()}


def _teacher_pools() -> int:
    """How many teacher actor pools this instance has started (each a Ray Data map worker of TeacherEmbedder)."""
    return sum(1 for a in ray._private.state.actors().values()
               if "TeacherEmbedder" in str(a.get("Name", "")) + str(a.get("ActorClassName", "")))


def test_stream_run_with_write_through_then_cache_mode_runs_the_teacher_once(env, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    pools_before = _teacher_pools()
    # Two epochs of a 96-image training split: the first streams through the teacher and writes through, the
    # second reads the cache and starts no teacher actor. Shuffling is on (a seeded global order per epoch and a
    # window shuffle of caption rows), and the Train worker is killed two steps after a checkpoint taken a few
    # steps into the second epoch: the restarted worker must skip the batches of that epoch it already trained on.
    cfg = tiny_config(env["teacher"], tmp_path, extra=[f"cache.dir={cache_dir}", "train.steps=null",
                                                       "train.epochs=2", "train.shuffle=global",
                                                       "train.shuffle_buffer=64", "train.log_every=1"], steps=1)
    per_epoch = sum(len(r["captions"]) for r in read_records(cfg)["train"]) // BATCH
    every = cfg.train.checkpoint_every
    resume_at = (per_epoch // every + 1) * every  # the first checkpoint inside the second epoch
    marker = tmp_path / "worker-killed"
    os.environ["RAYDISTILL_KILL_WORKER_AT"] = f"{resume_at + 2}:{marker}"
    try:
        summary = run_experiment(cfg)
    finally:
        os.environ.pop("RAYDISTILL_KILL_WORKER_AT")
    # A local instance runs no preemption watcher (ray_env.LOCAL_RAY_ENV; tests/conftest.py sets it as
    # `raydistill run` does).
    actors = _actor_classes()
    assert {"TrainController", "RayTrainWorker"} <= actors and "PreemptionWatcher" not in actors
    cache = EmbeddingCache(str(cache_dir))
    done = cache.complete_splits()
    assert set(done) == {"train", "test"}
    n_images = done["train"]["images"] + done["test"]["images"]
    n_captions = done["train"]["captions"] + done["test"]["captions"]
    # Each image and caption embedded once in two epochs: epoch 2 (and the restarted worker) read the cache.
    assert summary["teacher_images_embedded"] == n_images
    assert summary["teacher_captions_embedded"] == n_captions
    assert _teacher_pools() - pools_before == 2  # the test split's pass, and epoch 1's stream
    assert summary["dataset_images"] == n_images and summary["dataset_captions"] == n_captions
    planned = 2 * per_epoch
    _check_stream_run(summary, planned=planned)

    # The worker died once; the run resumed from the checkpoint before, and ended in exactly the state of an
    # uninterrupted run of the same seed, computed here without Ray from the same rows in the same order:
    # student, optimizer moments, LR schedule, teacher-embedding queues, balancer history, RNG.
    assert marker.read_text() == f"killed at step {resume_at + 2}\n"
    assert summary["resumed_from_step"] == resume_at
    state = torch.load(Path(summary["checkpoint"]) / STATE_FILE, weights_only=True)
    assert (state["step"], state["epoch"], state["epoch_start_step"]) == (planned, 1, per_epoch)
    reference, outputs = uninterrupted_reference(cfg, Path(summary["run_dir"]), cache_dir, planned)
    assert_same_state(state, reference.state_dict())
    # The loss curve is continuous: each step once, with the uninterrupted run's values, in the checkpoint's
    # history and in MLflow (the steps trained again after the restart were not logged twice).
    history = json.loads((Path(summary["checkpoint"]) / HISTORY_FILE).read_text())
    assert [h["step"] for h in history] == list(range(1, planned + 1))
    for h in history:
        assert {k: v for k, v in h.items() if k != "step"} == {
            k: v for k, v in outputs[h["step"]].items() if k.startswith(("loss/", "weight/"))}
    logged = MlflowClient(summary["mlflow_tracking_uri"]).get_metric_history(summary["run_id"], "loss/contrastive")
    assert sorted(m.value for m in logged) == pytest.approx(sorted(outputs[k]["loss/contrastive"] for k in outputs))

    # embed resumes: train and test are complete, so only the validation split (never used by the run) is new.
    again = embed(cfg)
    assert again["splits"]["train"] == done["train"] and again["splits"]["test"] == done["test"]
    assert again["teacher_images_embedded"] == again["splits"]["val"]["images"] > 0
    assert embed(cfg)["teacher_images_embedded"] == 0

    # (A partial cache, where only the images it lacks reach the teacher: tests/test_reliability.py.)

    # A cache-mode run never loads the teacher: no probe, no actor pool, nothing embedded.
    pools_before = _teacher_pools()
    cached = run_experiment(tiny_config(env["teacher"], tmp_path, extra=[f"cache.dir={cache_dir}", "cache.mode=cache",
                                                                          "train.eval_every=3"]))
    assert cached["teacher_images_embedded"] == 0 and _teacher_pools() == pools_before
    assert cached["steps"] == 6
    # With a validation split the exported student is the checkpoint with the best validation RSUM.
    val = {h["step"]: h["val_rsum"] for h in cached["history"]}
    assert sorted(val) == [3, 6] and cached["best_step"] == max(val, key=val.get)
    from raydistill.models.student import load_dual_encoder

    assert load_dual_encoder(cached["student_dir"])[2]["step"] == cached["best_step"]
    assert cached["metrics"]["teacher"]["rsum"] == pytest.approx(summary["metrics"]["teacher"]["rsum"])
    _check_recall(cached["metrics"]["student"])

    # A cache made with other preprocessing is refused, with the reason.
    with pytest.raises(CacheError, match="stale.*preprocessing"):
        run_experiment(tiny_config(env["teacher"], tmp_path, extra=[f"cache.dir={cache_dir}", "data.decode_size=40"]))
