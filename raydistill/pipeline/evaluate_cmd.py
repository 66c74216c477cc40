"""`raydistill eval`: retrieval recall of a saved student and/or the configured teacher on one split."""

from __future__ import annotations

from typing import Any

import torch

from raydistill.config import Config
from raydistill.pipeline.counters import Counters
from raydistill.pipeline.evaluate import dataset_batches, embed_split, student_metrics, teacher_metrics
from raydistill.pipeline.plans import DataPlan, decoded, embed_splits
from raydistill.pipeline.progress import log
from raydistill.pipeline.ray_env import init_ray


def evaluate_command(cfg: Config, student: str | None = None, teacher: bool = False,
                     split: str | None = None) -> dict[str, Any]:
    """Evaluate on ``split`` (default ``data.test_split``); returns ``{"split", "metrics": {name: recall}}``.

    With ``teacher`` the split goes through the embedding cache (embedded first if the cache lacks it), and the
    student, if given, is evaluated on the same rows.
    """
    from raydistill.data.source import check_source, count_splits, source_dataset, source_identity

    if not student and not teacher:
        raise ValueError("raydistill eval needs --student DIR and/or --teacher")
    split = split or cfg.data.test_split
    check_source(cfg)
    model = tokenizer = None
    if student:
        from raydistill.models.student import load_dual_encoder

        model, tokenizer, _ = load_dual_encoder(student)
    init_ray(cfg)
    counters = Counters().start()
    out: dict[str, Any] = {"split": split, "metrics": {}}
    if teacher:
        from raydistill.pipeline.teacher_side import open_teacher_side

        stream = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"mode": "stream"})})
        side = open_teacher_side(stream, source_identity(cfg))
        if split not in side.cache.complete_splits():
            plan = DataPlan(cfg=cfg, teacher=side, tokenizer=None, max_len=0, student_size=0, counters=counters,
                            train_from="stream", expected=count_splits(cfg, [split]))
            embed_splits(plan, [split])
        rows = side.cache.split_dataset(split)
        out["cache_dir"] = side.cache.uri
    else:
        rows = source_dataset(cfg, [split])
    if model is not None:
        size = int(model.config.resize_size or model.config.image_size)
        rows = decoded(rows, cfg, {"pixels": size}, counters, count_bad=not teacher)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model is not None:
        log(f"evaluating the student from {student} on split {split!r}")
        model = model.to(device)
    emb = embed_split(dataset_batches(rows, cfg.eval.batch_size), model, tokenizer,
                      model.config.max_len if model is not None else 0, device)
    if model is not None:
        out["metrics"]["student"] = student_metrics(emb, cfg.eval.chunk_size)
        out["student_params"] = int(model.num_parameters())
    if teacher:
        out["metrics"]["teacher"] = teacher_metrics(emb, cfg.eval.chunk_size)
    totals = counters.get()
    out["images"] = emb.n_images
    out["teacher_images_embedded"] = int(totals.get("teacher_images_embedded", 0))
    return out
