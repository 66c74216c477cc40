"""A FIFO memory of teacher embeddings (with their image ids), the negatives of the contrastive term.

The queue is training state: its buffers (embeddings, image ids, write pointer) are in ``state_dict`` and
are restored with the checkpoint. Under data parallelism every rank enqueues the batch gathered from all
ranks, so every rank holds the same queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.method import distributed

EMPTY_IMAGE_ID = -1
"""Image id of a slot that holds no real sample yet (the random initial vectors); it never matches."""


class EmbeddingQueue(nn.Module):
    """FIFO queue of ``size`` L2-normalised embeddings of dimension ``dim``.

    Starts as random unit vectors drawn from a generator seeded with ``seed`` (so every rank, and a rerun,
    starts from the same queue) with image id :data:`EMPTY_IMAGE_ID`. ``enqueue`` overwrites the oldest
    entries, wrapping around at the end; a batch of any size is accepted (one larger than the queue keeps
    its last ``size`` rows). The state after ``enqueue`` is exactly that of writing the rows one at a time.

    Args:
        size: Number of entries K.
        dim: Embedding dimension d.
        seed: Seed of the initial random vectors.

    Buffers:
        embeddings: ``[K, d]`` float tensor, unit rows.
        image_ids: ``[K]`` int64, the image each entry came from (-1 for the initial random vectors).
        ptr: int64 scalar, index of the oldest entry (the next one to overwrite).
    """

    embeddings: torch.Tensor
    image_ids: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        if int(size) < 1 or int(dim) < 1:
            raise ValueError(f"EmbeddingQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.size = int(size)
        self.dim = int(dim)
        generator = torch.Generator().manual_seed(int(seed))
        initial = F.normalize(torch.randn(self.size, self.dim, generator=generator), dim=-1)
        self.register_buffer("embeddings", initial)
        self.register_buffer("image_ids", torch.full((self.size,), EMPTY_IMAGE_ID, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, image_ids: torch.Tensor | None = None) -> None:
        """Writes a batch (gathered from all ranks, in rank order) over the oldest entries.

        Args:
            embeddings: ``[B, d]`` teacher embeddings of the local batch; stored detached and L2-normalised.
            image_ids: ``[B]`` integer image ids of those rows; ``None`` stores -1 (never masked).

        Raises:
            ValueError: If the shapes do not match ``[B, d]`` and ``[B]``.
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"EmbeddingQueue.enqueue: embeddings must be [B, {self.dim}], got {tuple(embeddings.shape)}"
            )
        if image_ids is None:
            image_ids = torch.full((embeddings.shape[0],), EMPTY_IMAGE_ID, dtype=torch.int64)
        if image_ids.shape != (embeddings.shape[0],):
            raise ValueError(
                f"EmbeddingQueue.enqueue: image_ids must be [{embeddings.shape[0]}] to match embeddings "
                f"{tuple(embeddings.shape)}, got {tuple(image_ids.shape)}"
            )
        if image_ids.is_floating_point():
            raise ValueError(f"EmbeddingQueue.enqueue: image_ids must be integers, got dtype {image_ids.dtype}")
        device = self.embeddings.device
        rows = distributed.all_gather_cat(F.normalize(embeddings.detach().float(), dim=-1).to(device))
        ids = distributed.all_gather_cat(image_ids.detach().to(device=device, dtype=torch.int64))
        count = rows.shape[0]
        if count == 0:
            return
        # The result equals writing the rows one at a time; of a batch longer than the queue only the
        # newest `size` rows survive, so only those are written, where the one-at-a-time loop leaves them.
        kept = min(count, self.size)
        first = (self.ptr + count - kept) % self.size
        slots = (first + torch.arange(kept, device=device)) % self.size
        self.embeddings[slots] = rows[-kept:].to(self.embeddings.dtype)
        self.image_ids[slots] = ids[-kept:]
        self.ptr.copy_((self.ptr + count) % self.size)
