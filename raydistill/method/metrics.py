"""Image–text retrieval recall (R@1/5/10 both ways, RSUM, mean recall), exact and in bounded memory.

Captions are matched to images by ``caption_image[j]`` (the index of caption j's image), so an image can
have any number of captions, stored anywhere; nothing assumes blocks of five.

Ranking and ties: candidates are ordered by descending similarity, and among equal similarities by
ascending index (a stable sort). The rank of a ground truth g is therefore
``#{c : s[c] > s[g]} + #{c < g : s[c] == s[g]}``: a ground truth that ties with other candidates is
ranked after the tied candidates of lower index and before those of higher index. For image→text the rank
of an image is the best rank among its captions. A query is a hit at K when its rank is < K.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)
FOLD_SIZE = 1000


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _caption_index(caption_image: Any, n_images: int, n_captions: int) -> torch.Tensor:
    """Validated ``[n_captions]`` int64 image index per caption; every image must have a caption."""
    index = _as_tensor(caption_image, "caption_image")
    if index.shape != (n_captions,) or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(
            f"caption_image must be [{n_captions}] integers (one image index per caption), got shape "
            f"{list(index.shape)} dtype {index.dtype}"
        )
    index = index.to(torch.int64)
    if n_captions and (int(index.min()) < 0 or int(index.max()) >= n_images):
        raise ValueError(
            f"caption_image values must be image indices in [0, {n_images}), got range "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    uncaptioned = n_images - int(torch.unique(index).numel())
    if uncaptioned:
        raise ValueError(f"{uncaptioned} of {n_images} images have no caption; image->text recall is undefined")
    return index


def _check_finite(values: torch.Tensor) -> None:
    if not torch.isfinite(values).all():
        raise ValueError("scores or embeddings contain NaN or infinite values; ranks would be meaningless")


def _rank_of(block: torch.Tensor, score: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rank of candidate ``index[q]`` (score ``score[q]``) in column q of ``block`` ``[n_candidates, m]``.

    Candidates lie along dim 0, where CPU reductions are fastest; counts are int32 for the same reason.
    Ties are few in practice (each column ties at least with its own candidate), so they are counted from
    the list of tied positions rather than with a second dense mask; with massively tied scores that list
    can hold up to ``2 × block.numel()`` int64 values.
    """
    above = (block > score[None, :]).sum(dim=0, dtype=torch.int32).to(torch.int64)
    tied_rows, tied_cols = (block == score[None, :]).nonzero(as_tuple=True)
    before = tied_rows < index[tied_cols]
    return above + torch.bincount(tied_cols[before], minlength=block.shape[1])


def _image_to_text_ranks(block: torch.Tensor, first_image: int, caption_image: torch.Tensor) -> torch.Tensor:
    """Best ground-truth rank of images ``first_image ..`` given ``block = texts @ images_chunkᵀ``.

    The best-ranked ground truth of an image is its caption with the highest score, the lowest caption
    index among equal scores; it is found from the captions' own scores (one per caption), not the block.
    """
    n_captions, m = block.shape
    local = caption_image - first_image
    mine = (local >= 0) & (local < m)
    captions = torch.nonzero(mine).squeeze(1)
    local = local[mine]
    own_score = block[captions, local]
    best = torch.full((m,), float("-inf"), dtype=block.dtype, device=block.device)
    best = best.scatter_reduce(0, local, own_score, reduce="amax")
    at_best = own_score == best[local]
    best_index = torch.full((m,), n_captions, dtype=torch.int64, device=block.device)
    best_index = best_index.scatter_reduce(0, local[at_best], captions[at_best], reduce="amin")
    return _rank_of(block, best, best_index)


def _text_to_image_ranks(block: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Ranks for captions given ``block = images @ texts_chunkᵀ``, ``[n_images, m]``, and their images ``[m]``."""
    own_score = block[truth, torch.arange(block.shape[1], device=block.device)]
    return _rank_of(block, own_score, truth)


def _summarise(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in RECALL_KS:
            out[f"{direction}_r{k}"] = 100.0 * float((ranks < k).double().mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    out["mean_recall"] = out["rsum"] / (2 * len(RECALL_KS))
    return out


def retrieval_metrics(similarity: Any, caption_image: Any) -> dict[str, float]:
    """Recall@{1,5,10} both ways, RSUM and mean recall from a full similarity matrix.

    Args:
        similarity: ``[n_images, n_captions]`` scores (torch or numpy), higher is more similar.
        caption_image: ``[n_captions]`` index of each caption's image.

    Returns:
        ``i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 rsum mean_recall`` as percentages (python floats).
        Ties are broken as described in the module docstring.

    Raises:
        ValueError: On a bad shape, out-of-range or missing caption indices, or non-finite scores.
    """
    sim = _as_tensor(similarity, "similarity")
    if sim.dim() != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarity must be a non-empty [n_images, n_captions] matrix, got {list(sim.shape)}")
    if not sim.is_floating_point():
        sim = sim.double()
    _check_finite(sim)
    index = _caption_index(caption_image, sim.shape[0], sim.shape[1]).to(sim.device)
    # The same chunked path as for embeddings: bounded temporaries, candidates along dim 0.
    chunk = 1024
    i2t = [
        _image_to_text_ranks(sim[start : start + chunk].t().contiguous(), start, index)
        for start in range(0, sim.shape[0], chunk)
    ]
    t2i = [
        _text_to_image_ranks(sim[:, start : start + chunk], index[start : start + chunk])
        for start in range(0, sim.shape[1], chunk)
    ]
    return _summarise(torch.cat(i2t), torch.cat(t2i))


def retrieval_metrics_from_embeddings(
    image_emb: Any, text_emb: Any, caption_image: Any, chunk_size: int = 1024
) -> dict[str, float]:
    """Same result as :func:`retrieval_metrics` on cosine similarities, without the full matrix.

    Embeddings are L2-normalised, then similarities are computed ``chunk_size`` rows (images) or columns
    (captions) at a time, so at most ``chunk_size × max(n_images, n_captions)`` scores exist at once
    (COCO 5K: 1024 × 25,000 float32 ≈ 100 MB plus comparison masks of the same shape). Runs on the
    embeddings' device.

    Args:
        image_emb: ``[n_images, d]`` image embeddings (torch or numpy).
        text_emb: ``[n_captions, d]`` caption embeddings.
        caption_image: ``[n_captions]`` index of each caption's image.
        chunk_size: Rows or columns of the similarity computed at once.

    Returns:
        The same dictionary as :func:`retrieval_metrics`.
    """
    images = _as_tensor(image_emb, "image_emb")
    texts = _as_tensor(text_emb, "text_emb")
    if images.dim() != 2 or texts.dim() != 2 or images.shape[1] != texts.shape[1] or not len(images) or not len(texts):
        raise ValueError(
            f"image_emb and text_emb must be non-empty [n, d] with the same d, got {list(images.shape)} and "
            f"{list(texts.shape)}"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not images.is_floating_point():
        images = images.float()
    texts = texts.to(device=images.device, dtype=images.dtype)
    images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    index = _caption_index(caption_image, images.shape[0], texts.shape[0]).to(images.device)
    # Unit vectors have bounded dot products: finite embeddings give finite scores, so check them once.
    _check_finite(images)
    _check_finite(texts)
    i2t = []
    for start in range(0, images.shape[0], chunk_size):
        block = texts @ images[start : start + chunk_size].t()
        i2t.append(_image_to_text_ranks(block, start, index))
    t2i = []
    for start in range(0, texts.shape[0], chunk_size):
        block = images @ texts[start : start + chunk_size].t()
        t2i.append(_text_to_image_ranks(block, index[start : start + chunk_size]))
    return _summarise(torch.cat(i2t), torch.cat(t2i))


def coco_metrics(
    image_emb: Any, text_emb: Any, caption_image: Any, chunk_size: int = 1024
) -> dict[str, dict[str, float]]:
    """COCO's two protocols: the whole test set ("5k") and the mean over folds of 1,000 images ("1k").

    Fold f holds images ``1000f .. 1000f + 999`` (consecutive, in the given order) and every caption of
    those images, wherever it is stored. For COCO's 5,000 test images that is the standard five folds; a
    larger multiple of 1,000 uses all its folds, and "5k" then means the whole set.

    Args:
        image_emb: ``[n_images, d]`` image embeddings; n_images a multiple of 1,000 and at least 5,000.
        text_emb: ``[n_captions, d]`` caption embeddings.
        caption_image: ``[n_captions]`` index of each caption's image.
        chunk_size: See :func:`retrieval_metrics_from_embeddings`.

    Returns:
        ``{"5k": metrics, "1k": metrics averaged over folds}``.

    Raises:
        ValueError: If n_images is not a multiple of 1,000 of at least 5,000.
    """
    images = _as_tensor(image_emb, "image_emb")
    texts = _as_tensor(text_emb, "text_emb")
    n_images = images.shape[0]
    if n_images < 5 * FOLD_SIZE or n_images % FOLD_SIZE:
        raise ValueError(
            f"coco_metrics needs a multiple of {FOLD_SIZE} images, at least {5 * FOLD_SIZE} (COCO 5K test), "
            f"got {n_images}"
        )
    index = _caption_index(caption_image, n_images, texts.shape[0])
    full = retrieval_metrics_from_embeddings(images, texts, index, chunk_size)
    folds = []
    for start in range(0, n_images, FOLD_SIZE):
        in_fold = (index >= start) & (index < start + FOLD_SIZE)
        folds.append(
            retrieval_metrics_from_embeddings(
                images[start : start + FOLD_SIZE], texts[in_fold.to(texts.device)], index[in_fold] - start, chunk_size
            )
        )
    averaged = {key: sum(fold[key] for fold in folds) / len(folds) for key in full}
    return {"5k": full, "1k": averaged}
