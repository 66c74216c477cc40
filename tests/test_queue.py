"""EmbeddingQueue: seeded start, FIFO order with wrap-around, oversized batches, masking, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raydistill.method import losses
from raydistill.method.queue import EmbeddingQueue


class NaiveQueue:
    """Reference: a list of slots written one row at a time, pointer wrapping at the end."""

    def __init__(self, initial: torch.Tensor) -> None:
        self.rows = [row.clone() for row in initial]
        self.ids = [-1] * len(self.rows)
        self.ptr = 0

    def enqueue(self, emb: torch.Tensor, ids: torch.Tensor) -> None:
        for row, image_id in zip(emb, ids.tolist()):
            self.rows[self.ptr] = F.normalize(row, dim=0)
            self.ids[self.ptr] = image_id
            self.ptr = (self.ptr + 1) % len(self.rows)


def test_initial_state_is_seeded_unit_vectors():
    queue = EmbeddingQueue(size=7, dim=3, seed=5)
    assert queue.embeddings.shape == (7, 3)
    assert torch.allclose(queue.embeddings.norm(dim=1), torch.ones(7))
    assert queue.image_ids.dtype == torch.int64 and queue.image_ids.tolist() == [-1] * 7
    assert int(queue.ptr) == 0
    assert torch.equal(EmbeddingQueue(7, 3, seed=5).embeddings, queue.embeddings)
    assert not torch.equal(EmbeddingQueue(7, 3, seed=6).embeddings, queue.embeddings)
    assert set(queue.state_dict()) == {"embeddings", "image_ids", "ptr"}


def test_fifo_order_and_wrap_around_by_hand():
    queue = EmbeddingQueue(size=5, dim=2)
    rows = torch.tensor([[float(i + 1), 0.0] for i in range(7)])  # normalise to e1; ids tell them apart
    queue.enqueue(rows[:3], torch.tensor([10, 11, 12]))
    assert queue.image_ids.tolist() == [10, 11, 12, -1, -1] and int(queue.ptr) == 3
    queue.enqueue(rows[3:7], torch.tensor([13, 14, 15, 16]))
    # Slots 3, 4 take 13, 14; then the two oldest (10, 11) are overwritten by 15, 16.
    assert queue.image_ids.tolist() == [15, 16, 12, 13, 14] and int(queue.ptr) == 2
    assert torch.allclose(queue.embeddings, torch.tensor([[1.0, 0.0]] * 5))


def test_batch_larger_than_queue_keeps_its_newest_rows():
    queue = EmbeddingQueue(size=4, dim=2)
    queue.enqueue(torch.randn(1, 2), torch.tensor([100]))  # ptr 1
    queue.enqueue(torch.randn(6, 2), torch.arange(6))
    # One row at a time from slot 1: rows 0..5 land on slots 1,2,3,0,1,2; the survivors are 2..5.
    assert queue.image_ids.tolist() == [3, 4, 5, 2] and int(queue.ptr) == 3
    queue.enqueue(torch.randn(1, 2), torch.tensor([200]))  # the oldest survivor (2) goes first
    assert queue.image_ids.tolist() == [3, 4, 5, 200]


def test_random_sequence_matches_naive_queue():
    generator = torch.Generator().manual_seed(1)
    queue = EmbeddingQueue(size=6, dim=3, seed=2)
    naive = NaiveQueue(queue.embeddings)
    next_id = 0
    for _ in range(12):
        n = int(torch.randint(0, 10, (1,), generator=generator))
        emb = 2 * torch.randn(n, 3, generator=generator)
        ids = torch.arange(next_id, next_id + n)
        next_id += n
        queue.enqueue(emb, ids)
        naive.enqueue(emb, ids)
        assert queue.image_ids.tolist() == naive.ids
        assert int(queue.ptr) == naive.ptr
        assert torch.allclose(queue.embeddings, torch.stack(naive.rows), atol=1e-6)


def test_enqueue_without_ids_stores_minus_one_and_detaches():
    queue = EmbeddingQueue(size=3, dim=2)
    emb = torch.randn(2, 2, requires_grad=True)
    queue.enqueue(emb)
    assert queue.image_ids.tolist() == [-1, -1, -1]
    assert not queue.embeddings.requires_grad
    assert torch.allclose(queue.embeddings[:2], F.normalize(emb.detach(), dim=1))


def test_queue_masking_in_contrastive_loss():
    """Entries enqueued for an image are dropped from that image's negatives, and only those."""
    queue_img, queue_txt = EmbeddingQueue(4, 2, seed=0), EmbeddingQueue(4, 2, seed=1)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    queue_img.enqueue(torch.cat([e1, e2]), torch.tensor([7, 9]))
    queue_txt.enqueue(torch.cat([e1, e2]), torch.tensor([7, 9]))
    anchor = e1
    got = losses.contrastive_loss(
        anchor, anchor, anchor, anchor, queue_img.embeddings, queue_txt.embeddings, temperature=1.0,
        image_ids=torch.tensor([7]), queue_image_ids=queue_img.image_ids,
    )

    def expected(queue: EmbeddingQueue) -> float:
        # Negatives: slot 1 (image 9) and the two random initial slots 2, 3; slot 0 (image 7) is dropped.
        logits = [1.0] + [float(anchor[0] @ queue.embeddings[k]) for k in (1, 2, 3)]
        return -logits[0] + math.log(sum(math.exp(v) for v in logits))

    assert got.item() == pytest.approx(expected(queue_img) + expected(queue_txt), rel=1e-6)


def test_state_dict_round_trip(tmp_path):
    queue = EmbeddingQueue(5, 3, seed=0)
    queue.enqueue(torch.randn(7, 3), torch.arange(7))
    path = tmp_path / "queue.pt"
    torch.save(queue.state_dict(), path)
    restored = EmbeddingQueue(5, 3, seed=123)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for name in ("embeddings", "image_ids", "ptr"):
        assert torch.equal(getattr(restored, name), getattr(queue, name)), name
    batch = torch.randn(2, 3)
    queue.enqueue(batch, torch.tensor([50, 51]))
    restored.enqueue(batch, torch.tensor([50, 51]))
    assert torch.equal(restored.embeddings, queue.embeddings)
    assert restored.image_ids.tolist() == queue.image_ids.tolist()


def test_bad_input_is_rejected():
    queue = EmbeddingQueue(4, 3)
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 3\], got \(2, 4\)"):
        queue.enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"image_ids must be \[2\]"):
        queue.enqueue(torch.randn(2, 3), torch.arange(3))
    with pytest.raises(ValueError, match="integers"):
        queue.enqueue(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="size >= 1"):
        EmbeddingQueue(0, 3)
