"""The one place that talks to ``torch.distributed``: rank queries, gather and mean across workers.

Loss, queue and balancer code receive tensors and call these helpers; they never call
``torch.distributed`` themselves. Every helper is the identity (or a constant) when no process group is
initialised, so the same code runs in one process, under Ray Train DDP, or under ``torchrun``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a default process group is initialised (``torch.distributed`` available and set up)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of workers in the default process group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This worker's rank in the default process group; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from every rank along dim 0, in rank order, without gradient.

    Ranks may hold different numbers of rows (the last batch of an epoch, an uneven split): the sizes are
    gathered first, every rank pads to the largest, and the padding is cut off after the gather. All other
    dimensions, the dtype and the device must agree across ranks.

    Args:
        x: Local tensor with at least one dimension.

    Returns:
        ``x`` detached when not distributed; otherwise the concatenation over ranks, identical on every rank.

    Raises:
        ValueError: If ``x`` is a scalar.
    """
    if x.dim() == 0:
        raise ValueError(f"all_gather_cat needs a tensor with a first dimension, got shape {tuple(x.shape)}")
    x = x.detach()
    n_ranks = world_size()
    if n_ranks == 1:
        return x
    local_size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(local_size) for _ in range(n_ranks)]
    dist.all_gather(sizes, local_size)
    counts = [int(size.item()) for size in sizes]
    largest = max(counts)
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(n_ranks)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(gathered, counts)], dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``x`` over all ranks, without gradient; ``x`` itself is left unchanged.

    Args:
        x: Tensor of the same shape, dtype and device on every rank.

    Returns:
        A new tensor holding the mean (``x`` detached and copied when not distributed).
    """
    out = x.detach().clone()
    n_ranks = world_size()
    if n_ranks == 1:
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / n_ranks
