"""Retrieval evaluation: embed a split's images once and its captions once, then recall both ways.

The split arrives as :class:`EvalSet` (decoded images, tokenised captions, the caption -> image index and,
when a teacher was involved, the teacher's embeddings of the same images and captions, so the teacher's own
recall is reported as the ceiling from the same data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raydistill.method.metrics import retrieval_metrics_from_embeddings


@dataclass
class EvalSet:
    """One evaluation split, ready for the student (and the teacher's embeddings, if any)."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    input_ids: np.ndarray  # int64 [M, L]
    attention_mask: np.ndarray  # int64 [M, L]
    caption_image: np.ndarray  # int64 [M]: index into images
    image_ids: list[str] = field(default_factory=list)
    caption_ids: list[str] = field(default_factory=list)
    t_img: np.ndarray | None = None  # float32 [N, d]
    t_txt: np.ndarray | None = None  # float32 [M, d]

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.caption_image)


def build_eval_set(rows: list[dict[str, Any]], tokenizer: Any, max_len: int) -> EvalSet:
    """Assemble decoded image rows (``image``, ``captions``, ``caption_ids``, optional ``t_img``/``t_txt``).

    Rows are sorted by image id so the result does not depend on the order Ray delivered them in.
    """
    from raydistill.models.tokenizers import encode_texts

    if not rows:
        raise ValueError("the evaluation split has no decodable images")
    rows = sorted(rows, key=lambda r: str(r["image_id"]))
    captions: list[str] = []
    caption_ids: list[str] = []
    caption_image: list[int] = []
    t_txt: list[np.ndarray] = []
    with_teacher = "t_img" in rows[0]
    for i, row in enumerate(rows):
        caps = [str(c) for c in row["captions"]]
        captions.extend(caps)
        caption_ids.extend(str(c) for c in row["caption_ids"])
        caption_image.extend([i] * len(caps))
        if with_teacher:
            t_txt.append(np.asarray(row["t_txt"], np.float32).reshape(len(caps), -1))
    input_ids, attention_mask = encode_texts(tokenizer, captions, max_len)
    return EvalSet(
        images=np.stack([np.asarray(r["image"], np.uint8) for r in rows]),
        input_ids=input_ids,
        attention_mask=attention_mask,
        caption_image=np.asarray(caption_image, np.int64),
        image_ids=[str(r["image_id"]) for r in rows],
        caption_ids=caption_ids,
        t_img=np.stack([np.asarray(r["t_img"], np.float32) for r in rows]) if with_teacher else None,
        t_txt=np.concatenate(t_txt) if with_teacher else None,
    )


@torch.inference_mode()
def embed_eval_set(model: Any, data: EvalSet, device: torch.device, batch_size: int = 256) -> dict[str, Any]:
    """Student embeddings of every image and caption, with the embedding throughput measured."""
    model.eval()
    start = time.perf_counter()
    img = []
    for i in range(0, data.n_images, batch_size):
        pixels = model.preprocess_images(data.images[i : i + batch_size]).to(device)
        img.append(model.encode_image(pixels).float().cpu())
    img_s = time.perf_counter() - start
    start = time.perf_counter()
    txt = []
    for i in range(0, data.n_captions, batch_size):
        ids = torch.from_numpy(data.input_ids[i : i + batch_size]).to(device)
        mask = torch.from_numpy(data.attention_mask[i : i + batch_size]).to(device)
        txt.append(model.encode_text(ids, mask).float().cpu())
    txt_s = time.perf_counter() - start
    return {
        "image_emb": torch.cat(img),
        "text_emb": torch.cat(txt),
        "images_per_s": data.n_images / max(img_s, 1e-9),
        "captions_per_s": data.n_captions / max(txt_s, 1e-9),
    }


def evaluate_student(model: Any, data: EvalSet, device: torch.device, eval_cfg: dict[str, Any]) -> dict[str, float]:
    """Recall@1/5/10 both ways, RSUM, mean recall, and embedding throughput of a student on a split."""
    was_training = model.training
    emb = embed_eval_set(model, data, device, eval_cfg.get("batch_size", 256))
    if was_training:
        model.train()
    metrics = retrieval_metrics_from_embeddings(
        emb["image_emb"], emb["text_emb"], torch.from_numpy(data.caption_image), chunk_size=eval_cfg.get("chunk_size", 1024)
    )
    metrics["images_per_s"] = emb["images_per_s"]
    metrics["captions_per_s"] = emb["captions_per_s"]
    return metrics


def evaluate_teacher(data: EvalSet, chunk_size: int = 1024) -> dict[str, float]:
    """The teacher's recall on the split from its cached embeddings (the ceiling a student approaches)."""
    if data.t_img is None or data.t_txt is None:
        raise ValueError("this evaluation set carries no teacher embeddings")
    return retrieval_metrics_from_embeddings(
        torch.from_numpy(data.t_img), torch.from_numpy(data.t_txt), torch.from_numpy(data.caption_image), chunk_size=chunk_size
    )
