"""End to end on a real local Ray instance, a real MLflow SQLite store and real files.

One Ray instance serves the module. Each run is tiny (a 0.05 M-parameter student, 120 synthetic images),
so what is exercised is the machinery: teacher actor pool, cache, Ray Train, eval and MLflow (recovery from
killed workers, actors and drivers: test_reliability.py, test_resume_cli.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from e2e_helpers import TEACHER_DIM, make_tiny_teacher, tiny_config
from raydistill.pipeline.cache import CacheError, EmbeddingCache
from raydistill.pipeline.runner import embed, run_experiment

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
    assert summary["resumed_from_step"] is None

    # The final checkpoint holds the whole training state.
    state = torch.load(Path(summary["checkpoint"]) / "state.pt", weights_only=True)
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


def test_stream_run_with_write_through_then_cache_mode_runs_the_teacher_once(env, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    # Two epochs of a 96-image training split: the first pass embeds and writes through, the second hits.
    cfg = tiny_config(env["teacher"], tmp_path, extra=[f"cache.dir={cache_dir}", "train.steps=null",
                                                       "train.epochs=2"], steps=1)
    summary = run_experiment(cfg)
    # A local instance runs no preemption watcher (runner.LOCAL_RAY_ENV; tests/conftest.py sets it as
    # `raydistill run` does).
    actors = _actor_classes()
    assert {"TrainController", "RayTrainWorker"} <= actors and "PreemptionWatcher" not in actors
    cache = EmbeddingCache(str(cache_dir))
    done = cache.complete_splits()
    assert set(done) == {"train", "test"}
    n_images = done["train"]["images"] + done["test"]["images"]
    n_captions = done["train"]["captions"] + done["test"]["captions"]
    assert summary["teacher_images_embedded"] == n_images
    assert summary["teacher_captions_embedded"] == n_captions
    assert summary["cache_hits"] == done["train"]["images"]  # epoch 2 read every training image from the cache
    assert summary["dataset_images"] == n_images and summary["dataset_captions"] == n_captions
    _check_stream_run(summary, planned=2 * (done["train"]["captions"] // 32))

    # embed resumes: train and test are complete, so only the validation split (never used by the run) is new.
    again = embed(cfg)
    assert again["splits"]["train"] == done["train"] and again["splits"]["test"] == done["test"]
    assert again["teacher_images_embedded"] == again["splits"]["val"]["images"] > 0
    assert embed(cfg)["teacher_images_embedded"] == 0
    # A cache-mode run never instantiates the teacher.
    cached = run_experiment(tiny_config(env["teacher"], tmp_path, extra=[f"cache.dir={cache_dir}", "cache.mode=cache"]))
    assert cached["teacher_images_embedded"] == 0
    assert cached["steps"] == 6
    assert cached["metrics"]["teacher"]["rsum"] == pytest.approx(summary["metrics"]["teacher"]["rsum"])
    _check_recall(cached["metrics"]["student"])

    # Small evaluation splits are read and decoded in the driver (eval.local_max_images), larger ones through
    # Ray Data: both give the same evaluation set.
    from dataclasses import fields

    from raydistill.models.tokenizers import load_tokenizer
    from raydistill.pipeline.counters import Counters
    from raydistill.pipeline.datasets import read_records
    from raydistill.pipeline.runner import TeacherSide, eval_sets

    tokenizer = load_tokenizer(Path(summary["run_dir"]) / "tokenizer")
    sets = []
    for local_max in (10_000, 0):
        c = tiny_config(env["teacher"], tmp_path, extra=[f"cache.dir={cache_dir}", "cache.mode=cache",
                                                         f"eval.local_max_images={local_max}"])
        records = read_records(c)
        sets.append(eval_sets(c, {"test": records["test"]}, TeacherSide(c, records), Counters().start(),
                              tokenizer)["test"])
    assert sets[0].n_images == done["test"]["images"]
    for f in fields(sets[0]):
        np.testing.assert_array_equal(getattr(sets[0], f.name), getattr(sets[1], f.name), err_msg=f.name)

    # A cache made with other preprocessing is refused, with the reason.
    with pytest.raises(CacheError, match="stale.*preprocessing"):
        run_experiment(tiny_config(env["teacher"], tmp_path, extra=[f"cache.dir={cache_dir}", "data.decode_size=40"]))


def test_teacher_in_the_driver_embeds_like_the_actor_pool(env, tmp_path: Path) -> None:
    # With a CPU pool and no placement the driver loads the teacher (no probe task) and embeds small evaluation
    # splits itself, with the actors' code: same embeddings, same counts, same cache as the actor pool.
    from dataclasses import fields

    from raydistill.models.tokenizers import build_wordpiece_tokenizer
    from raydistill.pipeline.counters import Counters
    from raydistill.pipeline.datasets import read_records
    from raydistill.pipeline.runner import TeacherSide, eval_sets

    results = {}
    for in_driver in (True, False):
        cfg = tiny_config(env["teacher"], tmp_path, extra=[f"cache.dir={tmp_path / f'cache-{in_driver}'}",
                                                           f"teacher.in_driver={str(in_driver).lower()}"])
        records = read_records(cfg)
        tokenizer = build_wordpiece_tokenizer([c for r in records["train"] for c in r["captions"]], vocab_size=200)
        side = TeacherSide(cfg, records)
        assert (side.local is not None) == in_driver
        side.cache.open(side.fingerprint, side.dim)
        counters = Counters().start()
        sets = eval_sets(cfg, {"test": records["test"], "val": records["val"]}, side, counters, tokenizer)
        results[in_driver] = (side, sets, counters.get())

    (local, local_sets, local_counts), (pool, pool_sets, pool_counts) = results[True], results[False]
    assert local.fingerprint == pool.fingerprint and local.dim == pool.dim == TEACHER_DIM
    n_images = sum(s.n_images for s in local_sets.values())
    n_captions = sum(s.n_captions for s in local_sets.values())
    for counts in (local_counts, pool_counts):
        assert counts["teacher_images_embedded"] == n_images and counts["teacher_captions_embedded"] == n_captions
    assert local.cache.complete_splits() == pool.cache.complete_splits()
    for split in ("test", "val"):
        for f in fields(local_sets[split]):
            a, b = getattr(local_sets[split], f.name), getattr(pool_sets[split], f.name)
            if np.asarray(a).dtype.kind == "f":
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{split}.{f.name}")
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{split}.{f.name}")
