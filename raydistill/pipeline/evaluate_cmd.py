"""`raydistill eval`: retrieval recall of a saved student and/or the configured teacher on one split."""

from __future__ import annotations

from typing import Any

import torch

from raydistill.config import Config
from raydistill.pipeline import datasets as dsets
from raydistill.pipeline.counters import Counters
from raydistill.pipeline.evaluate import build_eval_set, evaluate_student, evaluate_teacher
from raydistill.pipeline.runner import TeacherSide, embed_split, init_ray, log


def evaluate_command(cfg: Config, student: str | None = None, teacher: bool = False,
                     split: str | None = None) -> dict[str, Any]:
    """Evaluate on ``split`` (default ``data.test_split``); returns ``{"split", "metrics": {name: recall}}``."""
    if not student and not teacher:
        raise ValueError("raydistill eval needs --student DIR and/or --teacher")
    split = split or cfg.data.test_split
    init_ray(cfg)
    all_records = dsets.read_records(cfg)
    if split not in all_records:
        raise ValueError(f"split {split!r} not in the data; splits present: {sorted(all_records)}")
    records = all_records[split]
    counters = Counters().start()
    out: dict[str, Any] = {"split": split, "metrics": {}}
    teacher_rows = None
    if teacher:
        side = TeacherSide(cfg, all_records)
        side.cache.open(side.fingerprint, side.dim)
        if split in side.cache.complete_splits():
            teacher_rows = dsets.decoded(dsets.from_cache(side.cache, split), cfg, counters).take_all()
        else:
            teacher_rows = embed_split(cfg, side, split, records, counters, collect=True)
        out["cache_dir"] = side.cache.uri
    if student:
        from raydistill.models.student import load_dual_encoder

        model, tokenizer, extra = load_dual_encoder(student)
        rows = teacher_rows or dsets.decoded(dsets.records_dataset(records), cfg, counters).take_all()
        data = build_eval_set(rows, tokenizer, model.config.max_len)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log(f"evaluating the student from {student} on {data.n_images} images / {data.n_captions} captions")
        out["metrics"]["student"] = evaluate_student(model.to(device), data, device, cfg.eval.model_dump())
        out["student_params"] = int(model.num_parameters())
    if teacher_rows is not None:
        from raydistill.models.tokenizers import build_wordpiece_tokenizer

        # Teacher recall needs only the cached embeddings; the tokenizer here just fills the student columns.
        tok = build_wordpiece_tokenizer([c for r in teacher_rows for c in r["captions"]], vocab_size=200)
        data = build_eval_set(teacher_rows, tok, 8)
        out["metrics"]["teacher"] = evaluate_teacher(data, cfg.eval.chunk_size)
    totals = counters.get()
    out["images"] = len(records) - int(totals.get("bad_images", 0))
    out["teacher_images_embedded"] = int(totals.get("teacher_images_embedded", 0))
    return out
