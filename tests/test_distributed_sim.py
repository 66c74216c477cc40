"""Two simulated ranks (CPU processes, gloo): identical balancer weights, identical queues, uneven gathers.

One spawn (two processes) runs every scenario and saves what each rank saw; the tests below compare the
ranks with each other and with a single-process computation on the combined data.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydistill.method import balancers, distributed, losses
from raydistill.method.queue import EmbeddingQueue

WORLD = 2
NAMES = ["feature", "cosine", "contrastive", "hard_negative"]
KINDS = ["dsmd", "dsmd_rate", "dwa", "uncertainty", "fixed"]
# Per rank, per step: deliberately different local loss values.
LOCAL_LOSSES = [
    [[0.04, 0.35, 11.0, 2.0], [0.03, 0.30, 10.0, 1.5], [0.02, 0.33, 9.0, 1.0], [0.02, 0.2, 8.5, 0.9]],
    [[0.08, 0.15, 9.0, 6.0], [0.05, 0.10, 9.5, 2.5], [0.04, 0.07, 7.0, 3.0], [0.03, 0.1, 7.5, 2.1]],
]
QUEUE_SIZE, DIM = 5, 3
BATCH_SIZES = [[2, 3], [1, 4], [0, 2], [3, 3]]  # [step][rank]: uneven, one empty


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = BATCH_SIZES[step][rank]
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, DIM, generator=generator), torch.arange(n) + 1000 * step + 100 * rank


def _loss_dict(values: list[float], requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(v, requires_grad=requires_grad) for n, v in zip(NAMES, values)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, object] = {
            "world": [distributed.world_size(), distributed.rank(), int(distributed.is_distributed())]
        }
        # (c) gathers with unequal (and empty) first dimensions; mean.
        local = torch.arange(6 * rank, 6 * rank + 2 * (1 + 2 * rank), dtype=torch.float32).reshape(-1, 2)
        results["gather"] = distributed.all_gather_cat(local)
        results["gather_empty"] = distributed.all_gather_cat(torch.ones(0, 2) if rank == 0 else torch.ones(2, 2))
        results["mean"] = distributed.all_reduce_mean(torch.tensor([1.0, 2.0]) * (rank + 1))
        # (a) balancers fed different local losses.
        for kind in KINDS:
            balancer = balancers.make_balancer(kind, NAMES)
            weights = []
            for values in LOCAL_LOSSES[rank]:
                step_losses = _loss_dict(values, requires_grad=True)
                total, step_weights = balancer(step_losses)
                total.backward()
                weights.append([step_weights[n] for n in NAMES])
            results[f"weights/{kind}"] = weights
            if kind == "uncertainty":
                results["uncertainty_grad"] = balancer.log_variance.grad.clone()
        # (b) queues fed different local batches.
        queue = EmbeddingQueue(QUEUE_SIZE, DIM, seed=0)
        objective = losses.DSMDObjective(DIM, queue_size=QUEUE_SIZE)
        for step in range(len(BATCH_SIZES)):
            emb, ids = _batch(step, rank)
            queue.enqueue(emb, ids)
            objective.enqueue(emb, -emb, ids)
        results["queue"] = dict(queue.state_dict())
        results["objective"] = dict(objective.state_dict())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("dist")
    context = mp.spawn(_worker, args=(str(root / "init"), str(root)), nprocs=WORLD, join=False)
    # A guard against a hung collective, not a timing assertion: generous, then stop our own workers.
    for _ in range(240):
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.terminate()
        pytest.fail("simulated ranks did not finish (hung collective?)")
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ranks_see_the_process_group(ranks):
    assert [r["world"] for r in ranks] == [[2, 0, 1], [2, 1, 1]]
    assert distributed.world_size() == 1 and distributed.rank() == 0 and not distributed.is_distributed()


def test_all_gather_cat_with_unequal_sizes(ranks):
    want = torch.cat([torch.arange(0, 2).reshape(1, 2), torch.arange(6, 12).reshape(3, 2)]).float()
    for r in ranks:
        assert torch.equal(r["gather"], want)
        assert torch.equal(r["gather_empty"], torch.ones(2, 2))
        assert torch.equal(r["mean"], torch.tensor([1.5, 3.0]))


@pytest.mark.parametrize("kind", KINDS)
def test_balancer_weights_identical_across_ranks(ranks, kind):
    rank0, rank1 = ranks[0][f"weights/{kind}"], ranks[1][f"weights/{kind}"]
    assert rank0 == rank1
    # ...and equal to one process fed the rank-averaged losses.
    single = balancers.make_balancer(kind, NAMES)
    averaged = [[(a + b) / 2 for a, b in zip(*step)] for step in zip(*LOCAL_LOSSES)]
    want = []
    for values in averaged:
        _, step_weights = single(_loss_dict(values))
        want.append([step_weights[n] for n in NAMES])
    assert sum(rank0, []) == pytest.approx(sum(want, []), rel=1e-5)
    if kind in ("dsmd", "dsmd_rate", "dwa"):  # local losses alone would have given other weights
        local_only = balancers.make_balancer(kind, NAMES)
        local = [[local_only(_loss_dict(v))[1][n] for n in NAMES] for v in LOCAL_LOSSES[0]]
        assert local[-1] != pytest.approx(rank0[-1], rel=1e-3)


def test_uncertainty_gradients_identical_across_ranks(ranks):
    grad0, grad1 = ranks[0]["uncertainty_grad"], ranks[1]["uncertainty_grad"]
    assert torch.equal(grad0, grad1)
    # Four steps with s = 0 (no optimizer step): d/ds_j = sum over steps of (1 - mean_ranks L_j).
    want = [sum(1 - (a[j] + b[j]) / 2 for a, b in zip(*LOCAL_LOSSES)) for j in range(len(NAMES))]
    assert grad0.tolist() == pytest.approx(want, rel=1e-5)


def test_queues_identical_across_ranks(ranks):
    for key in ("queue", "objective"):
        state0, state1 = ranks[0][key], ranks[1][key]
        assert state0.keys() == state1.keys()
        for name in state0:
            assert torch.equal(state0[name], state1[name]), (key, name)
    # Both equal a single queue fed rank 0's batch then rank 1's, each step. By hand for the ids: 12 rows
    # written before the last step (ptr 2); the last step's 6 rows 3000-3002, 3100-3102 land on slots
    # 2, 3, 4, 0, 1, 2, so 3000 is overwritten by 3102.
    single = EmbeddingQueue(QUEUE_SIZE, DIM, seed=0)
    for step in range(len(BATCH_SIZES)):
        parts = [_batch(step, r) for r in range(WORLD)]
        single.enqueue(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    assert torch.allclose(ranks[0]["queue"]["embeddings"], single.embeddings)
    assert ranks[0]["queue"]["image_ids"].tolist() == single.image_ids.tolist() == [3100, 3101, 3102, 3001, 3002]
    assert int(ranks[0]["queue"]["ptr"]) == int(single.ptr) == math.fsum(map(sum, BATCH_SIZES)) % QUEUE_SIZE
    assert ranks[0]["objective"]["queue_img.image_ids"].tolist() == single.image_ids.tolist()
