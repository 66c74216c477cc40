"""Retrieval evaluation: stream a split's images and captions through the student once, then recall both ways.

The split arrives as batches of decoded image rows (``pixels`` at the student's size, ``captions``, and when a
teacher was involved its embeddings ``t_img`` / ``t_txt``), from a Ray dataset
(:func:`raydistill.pipeline.plans.eval_dataset`) or from rows in memory (:func:`batches_from_rows`). Only the
embeddings are kept (``[images + captions, d]`` floats: what recall needs), never the pixels, so a split's
size costs memory in proportion to its embeddings. The teacher's recall on the same rows is the ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raydistill.method.metrics import retrieval_metrics_from_embeddings


@dataclass
class SplitEmbeddings:
    """What one pass over a split leaves: embeddings, the caption -> image index, and the forward time."""

    image_emb: torch.Tensor | None  # [N, d] student
    text_emb: torch.Tensor | None  # [M, d] student
    caption_image: torch.Tensor  # int64 [M]: index into the images
    t_img: torch.Tensor | None  # [N, d] teacher
    t_txt: torch.Tensor | None  # [M, d] teacher
    image_seconds: float = 0.0
    text_seconds: float = 0.0

    @property
    def n_images(self) -> int:
        return int(self.caption_image.max()) + 1 if len(self.caption_image) else 0

    @property
    def n_captions(self) -> int:
        return len(self.caption_image)


def batches_from_rows(rows: list[dict[str, Any]], batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Decoded image rows held in memory, as the batches :func:`embed_split` reads (for small splits)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield {key: [row[key] for row in chunk] for key in chunk[0]}


@torch.inference_mode()
def embed_split(batches: Iterable[dict[str, Any]], model: Any | None, tokenizer: Any, max_len: int,
                device: torch.device) -> SplitEmbeddings:
    """One pass over a split's batches: the student's embeddings (when ``model`` is given) and the teacher's.

    Raises:
        ValueError: the split had no decodable images.
    """
    from raydistill.models.tokenizers import encode_texts

    if model is not None:
        was_training = model.training
        model.eval()
    img, txt, t_img, t_txt, caption_image = [], [], [], [], []
    image_seconds = text_seconds = 0.0
    n_images = 0
    for batch in batches:
        captions = [[str(c) for c in list(caps)] for caps in batch["captions"]]
        for k, caps in enumerate(captions):
            caption_image.extend([n_images + k] * len(caps))
        n_images += len(captions)
        if "t_img" in batch:
            t_img.append(torch.as_tensor(np.stack([np.asarray(x, np.float32) for x in batch["t_img"]])))
            t_txt.extend(torch.from_numpy(np.array(x, np.float32).reshape(len(c), -1))
                         for x, c in zip(batch["t_txt"], captions))
        if model is None:
            continue
        start = time.perf_counter()
        pixels = model.preprocess_images(np.stack([np.asarray(p, np.uint8) for p in batch["pixels"]])).to(device)
        img.append(model.encode_image(pixels).float().cpu())
        image_seconds += time.perf_counter() - start
        ids, mask = encode_texts(tokenizer, [c for caps in captions for c in caps], max_len)
        start = time.perf_counter()
        txt.append(model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float().cpu())
        text_seconds += time.perf_counter() - start
    if model is not None and was_training:
        model.train()
    if n_images == 0:
        raise ValueError("the evaluation split has no decodable images")
    return SplitEmbeddings(
        image_emb=torch.cat(img) if img else None,
        text_emb=torch.cat(txt) if txt else None,
        caption_image=torch.as_tensor(caption_image, dtype=torch.int64),
        t_img=torch.cat(t_img) if t_img else None,
        t_txt=torch.cat(t_txt) if t_txt else None,
        image_seconds=image_seconds,
        text_seconds=text_seconds,
    )


def student_metrics(emb: SplitEmbeddings, chunk_size: int = 1024) -> dict[str, float]:
    """Recall@1/5/10 both ways, RSUM, mean recall, and embedding throughput of the student."""
    if emb.image_emb is None or emb.text_emb is None:
        raise ValueError("this pass embedded no student")
    metrics = retrieval_metrics_from_embeddings(emb.image_emb, emb.text_emb, emb.caption_image, chunk_size=chunk_size)
    metrics["images_per_s"] = emb.n_images / max(emb.image_seconds, 1e-9)
    metrics["captions_per_s"] = emb.n_captions / max(emb.text_seconds, 1e-9)
    return metrics


def teacher_metrics(emb: SplitEmbeddings, chunk_size: int = 1024) -> dict[str, float]:
    """The teacher's recall on the split from its embeddings (the ceiling a student approaches)."""
    if emb.t_img is None or emb.t_txt is None:
        raise ValueError("this split carries no teacher embeddings")
    return retrieval_metrics_from_embeddings(emb.t_img, emb.t_txt, emb.caption_image, chunk_size=chunk_size)


def dataset_batches(ds: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    """A Ray dataset's rows as numpy batches for :func:`embed_split`."""
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")
