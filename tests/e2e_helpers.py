"""Shared pieces of the end-to-end tests: a tiny teacher saved in raydistill's format, tiny run configs, and
the uninterrupted training a resumed run must equal, computed without Ray."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raydistill.config import Config, load_config
from raydistill.data.source import caption_files
from raydistill.data.sources import read_karpathy

REPO = Path(__file__).resolve().parents[1]
TEACHER_DIM = 32


def make_tiny_teacher(path: Path) -> Path:
    """A randomly initialised `test`-preset dual encoder with its own WordPiece vocabulary, saved as a teacher."""
    from raydistill.models.student import build_student, save_dual_encoder
    from raydistill.models.tokenizers import build_wordpiece_tokenizer

    words = "a the small large red green blue yellow circle square triangle star left right above below of"
    tok = build_wordpiece_tokenizer([words] * 4, vocab_size=80)
    model = build_student("test", embed_dim=TEACHER_DIM, vocab_size=len(tok))
    save_dual_encoder(model, path, tokenizer=tok)
    return path


def tiny_overrides(teacher: Path, output_dir: Path, steps: int = 6, batch: int = 32) -> list[str]:
    """Overrides that turn configs/quick.yaml into a run of a few seconds of compute."""
    return [
        f"output_dir={output_dir}",
        "teacher.kind=raydistill",
        f"teacher.checkpoint={teacher}",
        "teacher.pool.batch_size=32",
        "student.preset=test",
        "student.vocab_size=120",
        "data.synth.n_images=120",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.checkpoint_every=3",
        "train.log_every=2",
        "distill.queue_size=100",
        "ray.no_progress_timeout_s=300",
        "ray.shuffle_partitions=2",  # a few hundred rows: 16 sort partitions would be 16 tasks for nothing
    ]


def tiny_config(teacher: Path, output_dir: Path, extra: list[str] | None = None, **kw) -> Config:
    return load_config(REPO / "configs" / "quick.yaml", tiny_overrides(teacher, output_dir, **kw) + (extra or []))


# ------------------------------------------------------------------------------------------------ resume
BATCH = 32  # train.batch_size of tiny_config


def _column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def decoded_rows(records: list[dict[str, Any]], sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Records as the decoded image-level batch the pipeline builds (numpy columns + one image column per size)."""
    from raydistill.pipeline.rows import decode_batch

    keys = ("image_id", "path", "data", "captions", "caption_ids", "split")
    batch = {k: _column([r.get(k) for r in records]) for k in keys}
    return decode_batch(batch, sizes=sizes, on_bad_image="fail", max_bad_fraction=0.0, max_pixels=10**8)


def cached_rows(cache_dir: Path, split: str) -> list[dict[str, Any]]:
    """Every row of one split of an embedding cache, read in this process (tiny caches only)."""
    from raydistill.pipeline.cache import EmbeddingCache

    rows = []
    for path in EmbeddingCache(str(cache_dir)).part_files(split):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


class _Rows:
    """Caption rows held in memory, read as a Ray dataset's ``iter_batches`` reads them: exact windows."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str) -> Any:
        n = len(self.rows["pixels"])
        for start in range(0, n, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.rows.items()}


def _epoch_rows(cfg: Any, cache_dir: Path, tokenizer: Any, epoch: int) -> _Rows:
    """One epoch's caption rows without Ray: the cached training rows (the teacher's embeddings as the run
    used them), in the epoch's seeded order, decoded at the student's size, one row per caption."""
    from raydistill.models.student import get_preset
    from raydistill.pipeline.plans import _order_key, student_decode_size
    from raydistill.pipeline.rows import explode_batch

    cached = {r["image_id"]: r for r in cached_rows(cache_dir, "train")}
    keyed = _order_key({"image_id": np.asarray(list(cached), dtype=object)}, cfg.train.seed, epoch)
    order = [image_id for _, image_id in sorted(zip(keyed["order"], keyed["image_id"]))]
    records = [cached[i] for i in order]
    batch = decoded_rows(records, {"pixels": student_decode_size(cfg)})
    batch["t_img"] = np.stack([np.asarray(r["t_img"], np.float32) for r in records])
    batch["t_txt"] = _column([np.asarray(r["t_txt"], np.float32) for r in records])
    max_len = cfg.student.max_len or get_preset(cfg.student.preset).max_len
    return _Rows(explode_batch(batch, tokenizer, max_len, True))


def uninterrupted_reference(cfg: Any, run_dir: Path, cache_dir: Path, planned: int
                             ) -> tuple[Any, dict[int, dict[str, float]]]:
    """The same training without Ray, interruptions or concurrency: the same rows in the same order."""
    from raydistill.models.tokenizers import load_tokenizer
    from raydistill.pipeline.train_loop import epoch_batches
    from raydistill.pipeline.trainer import Trainer

    tokenizer = load_tokenizer(run_dir / "tokenizer")
    threads = torch.get_num_threads()
    # One thread, as in the Train worker (one CPU; the thread count changes the order of float additions, and
    # so the last bits of the results).
    assert cfg.train.cpus_per_worker == 1
    torch.set_num_threads(1)
    try:
        seed = cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        trainer = Trainer(cfg, TEACHER_DIM, len(tokenizer), planned, torch.device("cpu"))
        outputs: dict[int, dict[str, float]] = {}
        while trainer.step < planned:
            rows = _epoch_rows(cfg, cache_dir, tokenizer, trainer.epoch)
            for batch in epoch_batches(rows, 0, seed, trainer.epoch, BATCH, cfg.train.shuffle_buffer):
                out = trainer.train_step(batch)
                outputs[trainer.step] = out
                if trainer.step >= planned:
                    break
            if trainer.step < planned:
                trainer.epoch += 1
                trainer.epoch_start_step = trainer.step
    finally:
        torch.set_num_threads(threads)
    return trainer, outputs




def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Two training states (nested dicts of tensors and numbers) are equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def read_records(cfg: Any) -> dict[str, list[dict[str, Any]]]:
    """The synthetic source's records by split, read in this process (the pipeline reads them in Ray tasks)."""
    (_, json_path, image_root, _), = caption_files(cfg)
    by_split: dict[str, list[dict[str, Any]]] = {}
    for record in read_karpathy(json_path, image_root):
        by_split.setdefault(record["split"], []).append(record)
    return by_split
