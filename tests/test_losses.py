"""DSMD losses against naive python-loop references and hand-computed values; gradients; validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raydistill.method import losses

B, D, K = 5, 4, 6
IDS = torch.tensor([3, 3, 8, 1, 8])  # samples 0/1 and 2/4 show the same image


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Unit student embeddings and deliberately un-normalised teacher ones (the losses re-normalise)."""
    return {
        "s_img": _unit(B, D),
        "s_txt": _unit(B, D),
        "t_img": 3.0 * torch.randn(B, D, dtype=torch.float64),
        "t_txt": 0.5 * torch.randn(B, D, dtype=torch.float64),
    }


# ---- naive references (python loops over rows and elements) -------------------------------------------


def _rows(t: torch.Tensor) -> list[list[float]]:
    return t.tolist()


def _normalised(t: torch.Tensor) -> list[list[float]]:
    out = []
    for row in _rows(t):
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / norm for v in row])
    return out


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def naive_feature(s_img, s_txt, t_img, t_txt) -> float:
    total = 0.0
    for s, t in ((_rows(s_img), _normalised(t_img)), (_rows(s_txt), _normalised(t_txt))):
        diffs = [abs(sv - tv) for s_row, t_row in zip(s, t) for sv, tv in zip(s_row, t_row)]
        total += sum(diffs) / len(diffs)
    return total


def naive_cosine(s_img, s_txt, t_img, t_txt) -> float:
    total = 0.0
    for s, t in ((_rows(s_img), _rows(t_img)), (_rows(s_txt), _rows(t_txt))):
        cosines = [_dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b)) for a, b in zip(s, t)]
        total += 1 - (sum(cosines) / len(cosines) + 1) / 2
    return total


def naive_queue_infonce(anchor, positive, queue, tau, ids=None, queue_ids=None) -> float:
    a_rows, p_rows, q_rows = _rows(anchor), _normalised(positive), _normalised(queue)
    per_row = []
    for i, a in enumerate(a_rows):
        logits = [_dot(a, p_rows[i]) / tau]
        for k, q in enumerate(q_rows):
            if ids is not None and queue_ids[k] != -1 and queue_ids[k] == ids[i]:
                continue
            logits.append(_dot(a, q) / tau)
        per_row.append(-logits[0] + math.log(sum(math.exp(v) for v in logits)))
    return sum(per_row) / len(per_row)


def naive_hinge(a, b, margin, max_violation, ids=None) -> float:
    a_rows, b_rows = _rows(a), _normalised(b)
    n = len(a_rows)
    s = [[_dot(a_rows[i], b_rows[j]) for j in range(n)] for i in range(n)]

    def negative(i, j):
        return i != j and (ids is None or ids[i] != ids[j])

    cost_b = [[max(0.0, margin + s[i][j] - s[i][i]) if negative(i, j) else 0.0 for j in range(n)] for i in range(n)]
    cost_a = [[max(0.0, margin + s[i][j] - s[j][j]) if negative(i, j) else 0.0 for j in range(n)] for i in range(n)]
    if max_violation:
        return sum(max(cost_b[i]) for i in range(n)) + sum(max(cost_a[i][j] for i in range(n)) for j in range(n))
    return sum(map(sum, cost_b)) + sum(map(sum, cost_a))


def naive_gt_contrastive(img, txt, scale, ids=None) -> float:
    a, b = _rows(img), _rows(txt)
    n = len(a)
    logits = [[scale * _dot(a[i], b[j]) for j in range(n)] for i in range(n)]

    def ce(row_of, i):
        kept = [row_of(j) for j in range(n) if j == i or ids is None or ids[i] != ids[j]]
        return -row_of(i) + math.log(sum(math.exp(v) for v in kept))

    i2t = sum(ce(lambda j, i=i: logits[i][j], i) for i in range(n)) / n
    t2i = sum(ce(lambda j, i=i: logits[j][i], i) for i in range(n)) / n
    return (i2t + t2i) / 2


# ---- values ------------------------------------------------------------------------------------------------


def test_feature_loss_matches_naive(batch):
    assert losses.feature_loss(**batch).item() == pytest.approx(naive_feature(**batch), rel=1e-12)


def test_cosine_loss_matches_naive_and_hand_values(batch):
    assert losses.cosine_loss(**batch).item() == pytest.approx(naive_cosine(**batch), rel=1e-12)
    x = _unit(3, D)
    assert losses.cosine_loss(x, x, 2 * x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert losses.cosine_loss(x, x, -x, -x).item() == pytest.approx(2.0)
    # Orthogonal student/teacher: each half is 1 - (0 + 1)/2 = 0.5.
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert losses.cosine_loss(e1, e1, e2, e2).item() == pytest.approx(1.0)


@pytest.mark.parametrize("masked", [False, True])
def test_contrastive_loss_matches_naive(batch, masked):
    queue_img, queue_txt = 2.0 * torch.randn(K, D, dtype=torch.float64), torch.randn(K, D, dtype=torch.float64)
    queue_ids = torch.tensor([8, -1, 3, 5, 8, 1])  # hits every batch image at least once; -1 never matches
    ids = IDS if masked else None
    got = losses.contrastive_loss(
        **batch, queue_img=queue_img, queue_txt=queue_txt, temperature=0.07, image_ids=ids,
        queue_image_ids=queue_ids if masked else None,
    )
    want = naive_queue_infonce(batch["s_img"], batch["t_img"], queue_img, 0.07, ids, queue_ids) + naive_queue_infonce(
        batch["s_txt"], batch["t_txt"], queue_txt, 0.07, ids, queue_ids
    )
    assert got.item() == pytest.approx(want, rel=1e-10)
    if masked:  # the mask must matter on this data
        unmasked = losses.contrastive_loss(**batch, queue_img=queue_img, queue_txt=queue_txt, temperature=0.07)
        assert abs(unmasked.item() - got.item()) > 1e-3


def test_contrastive_loss_with_every_negative_masked_is_zero():
    x = _unit(2, D)
    queue = _unit(3, D)
    got = losses.contrastive_loss(
        x, x, x, x, queue, queue, image_ids=torch.tensor([4, 4]), queue_image_ids=torch.tensor([4, 4, 4])
    )
    assert got.item() == pytest.approx(0.0, abs=1e-12)  # only the positive is left: -log(1)


def test_contrastive_loss_hand_value():
    # One sample, anchor = positive = e1, one queue entry e2: l = log(1 + exp((0 - 1) / τ)) per modality.
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    got = losses.contrastive_loss(e1, e1, e1, e1, e2, e2, temperature=0.5)
    assert got.item() == pytest.approx(2 * math.log(1 + math.exp(-2.0)), rel=1e-6)


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_hard_negative_loss_matches_naive(batch, max_violation, masked):
    ids = IDS if masked else None
    got = losses.hard_negative_loss(**batch, margin=0.2, max_violation=max_violation, image_ids=ids)
    s_img, s_txt, t_img, t_txt = batch["s_img"], batch["s_txt"], batch["t_img"], batch["t_txt"]
    want = sum(
        naive_hinge(a, b, 0.2, max_violation, ids)
        for a, b in ((s_img, t_img), (s_txt, t_txt), (s_img, t_txt), (s_txt, t_img))
    )
    assert want > 0
    assert got.item() == pytest.approx(want, rel=1e-10)
    if masked:  # the mask must matter on this data
        unmasked = losses.hard_negative_loss(**batch, margin=0.2, max_violation=max_violation)
        assert abs(unmasked.item() - got.item()) > 1e-3


def test_hard_negative_loss_hand_value():
    # a = [e1, e1], b = [e1, e2]: S = [[1, 0], [1, 0]]; cost_b[1,0] = 1.05, cost_a[0,1] = cost_a[1,0] = 0.05;
    # h = (0 + 1.05) + (0.05 + 0.05) = 1.15, and the four pairs are all (a, b): 4.6.
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert losses.hard_negative_loss(a, a, b, b).item() == pytest.approx(4.6, rel=1e-6)
    # Sum over negatives: with B = 2 there is one negative per row/column, so the same value.
    assert losses.hard_negative_loss(a, a, b, b, max_violation=False).item() == pytest.approx(4.6, rel=1e-6)
    # Both samples show one image: no negative is left.
    assert losses.hard_negative_loss(a, a, b, b, image_ids=torch.tensor([7, 7])).item() == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_ground_truth_contrastive_matches_naive(batch, masked):
    ids = IDS if masked else None
    got = losses.ground_truth_contrastive_loss(batch["s_img"], batch["s_txt"], 10.0, image_ids=ids)
    want = naive_gt_contrastive(batch["s_img"], batch["s_txt"], 10.0, ids)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_ground_truth_contrastive_module():
    img, txt = _unit(4, D).float(), _unit(4, D).float()
    module = losses.GroundTruthContrastive(init_temperature=0.07)
    out = module(img, txt)
    assert list(out) == ["contrastive_gt"]
    assert out["contrastive_gt"].item() == pytest.approx(naive_gt_contrastive(img, txt, 1 / 0.07), rel=1e-5)
    out["contrastive_gt"].backward()
    assert module.log_logit_scale.grad is not None
    capped = losses.GroundTruthContrastive(init_temperature=0.001, max_logit_scale=100)
    assert capped.logit_scale().item() == pytest.approx(100.0)
    fixed = losses.GroundTruthContrastive(learnable=False)
    assert list(fixed.parameters()) == []
    assert "log_logit_scale" in fixed.state_dict()
    with pytest.raises(ValueError, match="init_temperature"):
        losses.GroundTruthContrastive(init_temperature=0.0)


# ---- gradients ---------------------------------------------------------------------------------------------


def test_gradients_reach_student_never_teacher(batch):
    student = {k: v.clone().requires_grad_(True) for k, v in batch.items() if k.startswith("s_")}
    teacher = {k: v.clone().requires_grad_(True) for k, v in batch.items() if k.startswith("t_")}
    queue = torch.randn(K, D, dtype=torch.float64, requires_grad=True)
    terms = [
        losses.feature_loss(**student, **teacher),
        losses.cosine_loss(**student, **teacher),
        losses.contrastive_loss(**student, **teacher, queue_img=queue, queue_txt=queue),
        losses.hard_negative_loss(**student, **teacher, margin=0.5),
    ]
    for term in terms:
        for t in student.values():
            t.grad = None
        term.backward()
        for name, t in student.items():
            assert t.grad is not None and t.grad.abs().sum() > 0, name
    for name, t in teacher.items():
        assert t.grad is None, name
    assert queue.grad is None


def test_objective_gradients_reach_student_never_teacher(batch):
    objective = losses.DSMDObjective(D, queue_size=K).double()
    s_img, s_txt = (batch[k].clone().requires_grad_(True) for k in ("s_img", "s_txt"))
    t_img, t_txt = (batch[k].clone().requires_grad_(True) for k in ("t_img", "t_txt"))
    sum(objective(s_img, s_txt, t_img, t_txt, IDS).values()).backward()
    assert s_img.grad is not None and s_txt.grad is not None
    assert t_img.grad is None and t_txt.grad is None


# ---- the objective module ------------------------------------------------------------------------------------


def test_objective_equals_the_functions(batch):
    objective = losses.DSMDObjective(D, queue_size=K, temperature=0.1, margin=0.3, max_violation=False).double()
    objective.enqueue(batch["t_img"][:3], batch["t_txt"][:3], IDS[:3])
    out = objective(**batch, image_ids=IDS)
    assert list(out) == ["feature", "cosine", "contrastive", "hard_negative"]
    queue_img, queue_txt = objective.queue_img, objective.queue_txt
    want_con = losses.contrastive_loss(
        **batch, queue_img=queue_img.embeddings, queue_txt=queue_txt.embeddings, temperature=0.1,
        image_ids=IDS, queue_image_ids=queue_img.image_ids,
    )
    want_hn = losses.hard_negative_loss(**batch, margin=0.3, max_violation=False, image_ids=IDS)
    assert out["feature"].item() == pytest.approx(losses.feature_loss(**batch).item())
    assert out["cosine"].item() == pytest.approx(losses.cosine_loss(**batch).item())
    assert out["contrastive"].item() == pytest.approx(want_con.item())
    assert out["hard_negative"].item() == pytest.approx(want_hn.item())


def test_objective_mask_switch_reproduces_reference(batch):
    masked = losses.DSMDObjective(D, queue_size=K, mask_same_image=True).double()
    reference = losses.DSMDObjective(D, queue_size=K, mask_same_image=False).double()
    for objective in (masked, reference):
        objective.enqueue(batch["t_img"], batch["t_txt"], IDS)
    off = reference(**batch, image_ids=IDS)
    no_ids = masked(**batch, image_ids=None)
    on = masked(**batch, image_ids=IDS)
    for name in ("contrastive", "hard_negative"):
        assert off[name].item() == pytest.approx(no_ids[name].item())
    assert on["contrastive"].item() != pytest.approx(off["contrastive"].item())


def test_objective_terms_subset_and_unknown_term(batch):
    objective = losses.DSMDObjective(D, queue_size=K, terms=["hard_negative", "feature"])
    out = objective(**{k: v.float() for k, v in batch.items()})
    assert list(out) == ["feature", "hard_negative"]
    assert objective.queue_img is None and list(objective.state_dict()) == []
    objective.enqueue(batch["t_img"].float(), batch["t_txt"].float())  # no queue: nothing to do
    with pytest.raises(ValueError, match=r"unknown term.*'distance'.*allowed.*'feature'.*'hard_negative'"):
        losses.DSMDObjective(D, terms=["feature", "distance"])


def test_objective_queue_state_round_trip(tmp_path, batch):
    objective = losses.DSMDObjective(D, queue_size=K).double()
    objective.enqueue(batch["t_img"], batch["t_txt"], IDS)
    path = tmp_path / "objective.pt"
    torch.save(objective.state_dict(), path)
    restored = losses.DSMDObjective(D, queue_size=K, seed=99).double()
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored.queue_txt.embeddings, objective.queue_txt.embeddings)
    assert torch.equal(restored.queue_img.image_ids, objective.queue_img.image_ids)
    assert int(restored.queue_img.ptr) == B % K
    assert restored(**batch, image_ids=IDS)["contrastive"].item() == objective(**batch, image_ids=IDS)[
        "contrastive"
    ].item()


# ---- validation ------------------------------------------------------------------------------------------------


def test_shape_mismatches_name_the_shapes():
    s, t_wide, t_short = torch.randn(4, 8), torch.randn(4, 16), torch.randn(3, 8)
    for fn in (losses.feature_loss, losses.cosine_loss, losses.hard_negative_loss):
        with pytest.raises(ValueError, match=r"\[4, 8\].*\[4, 16\]"):
            fn(s, s, t_wide, t_wide)
        with pytest.raises(ValueError, match=r"\[3, 8\]"):
            fn(s, s, t_short, s)
    with pytest.raises(ValueError, match=r"queue_img must be \[K, 8\]"):
        losses.contrastive_loss(s, s, s, s, torch.randn(5, 16), torch.randn(5, 16))
    with pytest.raises(ValueError, match="queue_image_ids"):
        losses.contrastive_loss(s, s, s, s, torch.randn(5, 8), torch.randn(5, 8), image_ids=torch.arange(4))
    with pytest.raises(ValueError, match=r"image_ids must be a \[4\] integer"):
        losses.hard_negative_loss(s, s, s, s, image_ids=torch.arange(3))
    with pytest.raises(ValueError, match="built for dim 16"):
        losses.DSMDObjective(16, queue_size=4)(s, s, s, s)


def test_half_precision_teacher_and_queue_are_cast_to_the_student_dtype():
    student, teacher, queue = _unit(3, D).float(), torch.randn(3, D), torch.randn(K, D)
    objective_queue = {"queue_img": queue.half(), "queue_txt": queue.half()}
    got = losses.contrastive_loss(student, student, teacher.half(), teacher.half(), **objective_queue)
    want = losses.contrastive_loss(
        student, student, teacher.half().float(), teacher.half().float(), queue.half().float(), queue.half().float()
    )
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    hinge = losses.hard_negative_loss(student, student, teacher.half(), teacher.half())
    assert hinge.item() == pytest.approx(
        losses.hard_negative_loss(student, student, teacher.half().float(), teacher.half().float()).item(), rel=1e-6
    )
