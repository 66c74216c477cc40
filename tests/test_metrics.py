"""Retrieval recall against hand-computed values and a naive per-query loop; chunked == full; COCO folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydistill.method import metrics

KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mean_recall"]


def naive_metrics(sim: np.ndarray, caption_image: list[int]) -> dict[str, float]:
    """Per-query loop with the documented order: descending score, then ascending index."""
    n_images, n_captions = sim.shape
    i2t_ranks = []
    for i in range(n_images):
        order = sorted(range(n_captions), key=lambda c: (-sim[i, c], c))
        i2t_ranks.append(min(order.index(c) for c in range(n_captions) if caption_image[c] == i))
    t2i_ranks = []
    for c in range(n_captions):
        order = sorted(range(n_images), key=lambda i: (-sim[i, c], i))
        t2i_ranks.append(order.index(caption_image[c]))
    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    out["mean_recall"] = out["rsum"] / 6
    return out


def _uneven_captions(n_images: int, rng: np.random.Generator, most: int = 6) -> np.ndarray:
    """1..most captions per image, in shuffled storage order (never blocks of five)."""
    counts = rng.integers(1, most + 1, size=n_images)
    caption_image = np.repeat(np.arange(n_images), counts)
    return rng.permutation(caption_image)


def test_hand_computed_example():
    # 3 images, 4 captions; caption_image = [1, 0, 2, 0].
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.2],  # image 0: best caption 1 (its own) -> rank 0
            [0.8, 0.1, 0.9, 0.0],  # image 1: own caption 0 is second -> rank 1
            [0.7, 0.6, 0.5, 0.9],  # image 2: own caption 2 is fourth -> rank 3
        ]
    )
    out = metrics.retrieval_metrics(sim, torch.tensor([1, 0, 2, 0]))
    # Text->image: caption 0 column [0.1, 0.8, 0.7] -> image 1 first; caption 1 [0.9, 0.1, 0.6] -> image 0
    # first; caption 2 [0.3, 0.9, 0.5] -> image 2 second; caption 3 [0.2, 0.0, 0.9] -> image 0 second.
    assert out["i2t_r1"] == pytest.approx(100 / 3)
    assert out["i2t_r5"] == out["i2t_r10"] == 100.0
    assert out["t2i_r1"] == 50.0
    assert out["t2i_r5"] == out["t2i_r10"] == 100.0
    assert out["rsum"] == pytest.approx(100 / 3 + 200 + 50 + 200)
    assert out["mean_recall"] == pytest.approx(out["rsum"] / 6)
    assert list(out) == KEYS and all(type(v) is float for v in out.values())


def test_ties_rank_the_ground_truth_after_lower_indices():
    sim = np.zeros((3, 4))  # everything ties
    out = metrics.retrieval_metrics(sim, np.array([2, 0, 1, 1]))
    # t2i ranks = ground-truth image index: [2, 0, 1, 1] -> only caption 1 at rank 0.
    assert out["t2i_r1"] == 25.0
    # i2t: image 0's caption 1 has caption 0 before it; image 1's first caption 2 has two; image 2's caption 0 none.
    assert out["i2t_r1"] == pytest.approx(100 / 3)
    # A tie with a higher index does not push the ground truth down.
    sim = np.array([[0.5, 0.5], [0.2, 0.1]])
    out = metrics.retrieval_metrics(sim, np.array([0, 1]))
    assert out["i2t_r1"] == 50.0  # image 0 wins its tie with caption 1; image 1 prefers caption 0


@pytest.mark.parametrize("quantise", [False, True])
def test_random_similarity_matches_naive_loop(quantise):
    rng = np.random.default_rng(3)
    caption_image = _uneven_captions(23, rng)
    sim = rng.normal(size=(23, len(caption_image)))
    sim[caption_image, np.arange(len(caption_image))] += 1.0  # ground truth a bit higher: recalls not trivial
    if quantise:  # many exact ties
        sim = np.round(sim, 0)
    want = naive_metrics(sim, caption_image.tolist())
    got = metrics.retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(caption_image))
    assert got == pytest.approx(want)
    assert metrics.retrieval_metrics(sim, caption_image) == pytest.approx(want)  # numpy input
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(4)
    caption_image = _uneven_captions(31, rng)
    images = torch.from_numpy(rng.normal(size=(31, 8)))
    texts = images[torch.from_numpy(caption_image)] + torch.from_numpy(rng.normal(size=(len(caption_image), 8)))
    full = metrics.retrieval_metrics(F.normalize(images, dim=1) @ F.normalize(texts, dim=1).t(), caption_image)
    assert 0 < full["rsum"] < 600
    for chunk_size in (1, 7, 31, 10_000):
        got = metrics.retrieval_metrics_from_embeddings(images, texts, caption_image, chunk_size=chunk_size)
        assert got == pytest.approx(full), chunk_size
    assert metrics.retrieval_metrics_from_embeddings(images.numpy(), texts.numpy(), caption_image) == pytest.approx(
        full
    )


def test_coco_folds():
    rng = np.random.default_rng(5)
    n_images = 5000
    caption_image = _uneven_captions(n_images, rng, most=2)
    images = torch.from_numpy(rng.normal(size=(n_images, 16)).astype(np.float32))
    noise = torch.from_numpy(rng.normal(size=(len(caption_image), 16)).astype(np.float32))
    texts = images[torch.from_numpy(caption_image)] + 1.2 * noise
    out = metrics.coco_metrics(images, texts, caption_image)
    assert out["5k"] == pytest.approx(metrics.retrieval_metrics_from_embeddings(images, texts, caption_image))
    folds = []
    for f in range(5):
        in_fold = (caption_image >= 1000 * f) & (caption_image < 1000 * (f + 1))
        sim = F.normalize(images[1000 * f : 1000 * (f + 1)], dim=1) @ F.normalize(texts[in_fold], dim=1).t()
        folds.append(metrics.retrieval_metrics(sim, caption_image[in_fold] - 1000 * f))
    want_1k = {key: float(np.mean([fold[key] for fold in folds])) for key in KEYS}
    assert out["1k"] == pytest.approx(want_1k)
    assert out["1k"]["i2t_r1"] > out["5k"]["i2t_r1"]  # fewer distractors
    assert out["5k"]["i2t_r1"] < 100


@pytest.mark.parametrize("n_images", [4000, 5500])
def test_coco_needs_multiple_of_1000_images(n_images):
    with pytest.raises(ValueError, match=f"multiple of 1000 images, at least 5000.*got {n_images}"):
        metrics.coco_metrics(torch.randn(n_images, 2), torch.randn(n_images, 2), torch.arange(n_images))


def test_bad_input_is_rejected():
    sim = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"image indices in \[0, 3\), got range \[0, 3\]"):
        metrics.retrieval_metrics(sim, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="1 of 3 images have no caption"):
        metrics.retrieval_metrics(sim, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"caption_image must be \[4\] integers"):
        metrics.retrieval_metrics(sim, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_metrics(torch.full((3, 4), float("nan")), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="same d"):
        metrics.retrieval_metrics_from_embeddings(torch.randn(3, 4), torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))
