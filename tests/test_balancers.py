"""Loss balancers against their rules, computed by hand here; state round trips; validation."""

from __future__ import annotations

import math

import pytest
import torch

from raydistill.method import balancers

NAMES4 = ["feature", "cosine", "contrastive", "hard_negative"]
NAMES3 = ["a", "b", "c"]
SEQUENCE3 = [[1.0, 2.0, 4.0], [0.5, 2.0, 2.0], [0.5, 1.0, 2.0], [0.25, 1.0, 1.0]]


def _losses(names, values, requires_grad=False):
    return {n: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for n, v in zip(names, values)}


def _weights(balancer, names, values):
    """One balancer step; the weights in ``names`` order."""
    _, weights = balancer(_losses(names, values))
    return [weights[n] for n in names]


def test_dsmd_reference_example():
    balancer = balancers.make_balancer("dsmd", names=NAMES4, k=10, temperature=1.0)
    values = [0.04, 0.35, 11.0, 2.0]
    total, weights = balancer(_losses(NAMES4, values))
    assert list(weights) == NAMES4 and list(weights.values()) == [1.0, 1.0, 1.0, 1.0]
    assert total.item() == pytest.approx(sum(values))
    for _ in range(2):  # from the second step on: (k / n) * M / L_j = 2.5 * 11 / L_j
        total, weights = balancer(_losses(NAMES4, values))
        assert [weights[n] for n in NAMES4] == pytest.approx([687.5, 78.5714285, 2.5, 13.75], rel=1e-6)
        assert total.item() == pytest.approx(4 * 27.5, rel=1e-6)  # every weighted term equals (k / n) * M


def test_dsmd_equalises_magnitudes_on_a_changing_sequence():
    balancer = balancers.make_balancer("dsmd", names=NAMES3, k=6.0)
    _weights(balancer, NAMES3, SEQUENCE3[0])
    for values in SEQUENCE3[1:]:
        largest = max(values)
        assert _weights(balancer, NAMES3, values) == pytest.approx([6.0 / 3 * largest / v for v in values], rel=1e-6)


def test_dsmd_weights_carry_no_gradient():
    balancer = balancers.make_balancer("dsmd", names=NAMES3)
    balancer(_losses(NAMES3, SEQUENCE3[0]))
    losses = _losses(NAMES3, SEQUENCE3[1], requires_grad=True)
    total, weights = balancer(losses)
    total.backward()
    for name in NAMES3:  # d total / d L_j is the weight itself: the weight did not depend on L_j in autograd
        assert losses[name].grad.item() == pytest.approx(weights[name])


def test_dsmd_rate_rule_by_hand():
    balancer = balancers.make_balancer("dsmd_rate", names=NAMES3, k=10, temperature=1.0)
    assert _weights(balancer, NAMES3, SEQUENCE3[0]) == [1.0, 1.0, 1.0]
    # Step 2: L = [0.5, 2, 2], M = 2, a = [4, 1, 1], r = L / L_prev = [0.5, 1, 0.5].
    z = 2 * math.exp(0.5) + math.exp(1.0)
    want = [10 * math.exp(0.5) / z * 4, 10 * math.exp(1.0) / z * 1, 10 * math.exp(0.5) / z * 1]
    assert _weights(balancer, NAMES3, SEQUENCE3[1]) == pytest.approx(want, rel=1e-6)
    # Step 3: L = [0.5, 1, 2], M = 2, a = [4, 2, 1], r = [1, 0.5, 1].
    z = 2 * math.exp(1.0) + math.exp(0.5)
    want = [10 * math.exp(1.0) / z * 4, 10 * math.exp(0.5) / z * 2, 10 * math.exp(1.0) / z * 1]
    assert _weights(balancer, NAMES3, SEQUENCE3[2]) == pytest.approx(want, rel=1e-6)


def test_dwa_rule_by_hand():
    balancer = balancers.make_balancer("dwa", names=NAMES3)  # K = n = 3, T = 2
    assert _weights(balancer, NAMES3, SEQUENCE3[0]) == [1.0, 1.0, 1.0]
    assert _weights(balancer, NAMES3, SEQUENCE3[1]) == [1.0, 1.0, 1.0]
    # Step 3 uses r = L(2) / L(1) = [0.5, 1, 0.5], not the current losses.
    z = 2 * math.exp(0.25) + math.exp(0.5)
    want = [3 * math.exp(0.25) / z, 3 * math.exp(0.5) / z, 3 * math.exp(0.25) / z]
    assert _weights(balancer, NAMES3, SEQUENCE3[2]) == pytest.approx(want, rel=1e-6)
    # Step 4: r = L(3) / L(2) = [1, 0.5, 1].
    z = 2 * math.exp(0.5) + math.exp(0.25)
    want = [3 * math.exp(0.5) / z, 3 * math.exp(0.25) / z, 3 * math.exp(0.5) / z]
    total, weights = balancer(_losses(NAMES3, SEQUENCE3[3]))
    assert [weights[n] for n in NAMES3] == pytest.approx(want, rel=1e-6)
    assert total.item() == pytest.approx(sum(w * v for w, v in zip(want, SEQUENCE3[3])), rel=1e-6)


def test_dwa_k_and_temperature():
    balancer = balancers.make_balancer("dwa", names=NAMES3, k=6.0, temperature=1.0)
    for values in SEQUENCE3[:2]:
        balancer(_losses(NAMES3, values))
    z = 2 * math.exp(0.5) + math.exp(1.0)
    want = [6 * math.exp(0.5) / z, 6 * math.exp(1.0) / z, 6 * math.exp(0.5) / z]
    assert _weights(balancer, NAMES3, SEQUENCE3[2]) == pytest.approx(want, rel=1e-6)


def test_fixed_weights():
    assert _weights(balancers.make_balancer("fixed", names=NAMES3), NAMES3, SEQUENCE3[0]) == [1.0, 1.0, 1.0]
    by_name = balancers.make_balancer("fixed", names=NAMES3, weights={"c": 0.5, "a": 2.0, "b": 0.0})
    total, weights = by_name(_losses(NAMES3, SEQUENCE3[0]))
    assert weights == {"a": 2.0, "b": 0.0, "c": 0.5}
    assert total.item() == pytest.approx(2.0 * 1.0 + 0.0 * 2.0 + 0.5 * 4.0)
    by_list = balancers.make_balancer("fixed", names=NAMES3, weights=[2.0, 0.0, 0.5])
    assert _weights(by_list, NAMES3, SEQUENCE3[1]) == [2.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="exactly the loss names"):
        balancers.make_balancer("fixed", names=NAMES3, weights={"a": 1.0})
    with pytest.raises(ValueError, match="2 weights given for 3 losses"):
        balancers.make_balancer("fixed", names=NAMES3, weights=[1.0, 2.0])


def test_uncertainty_value_gradients_and_parameters():
    balancer = balancers.make_balancer("uncertainty", names=["x", "y"])
    params = list(balancer.parameters())
    assert len(params) == 1 and params[0] is balancer.log_variance
    with torch.no_grad():
        balancer.log_variance.copy_(torch.tensor([0.5, -1.0]))
    losses = _losses(["x", "y"], [2.0, 3.0], requires_grad=True)
    total, weights = balancer(losses)
    assert total.item() == pytest.approx(math.exp(-0.5) * 2 + 0.5 + math.exp(1.0) * 3 - 1.0, rel=1e-6)
    assert weights == pytest.approx({"x": math.exp(-0.5), "y": math.exp(1.0)}, rel=1e-6)
    total.backward()
    assert losses["x"].grad.item() == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert losses["y"].grad.item() == pytest.approx(math.exp(1.0), rel=1e-6)
    # d/ds_j [exp(-s_j) L_j + s_j] = 1 - exp(-s_j) L_j
    assert balancer.log_variance.grad.tolist() == pytest.approx([1 - math.exp(-0.5) * 2, 1 - math.exp(1.0) * 3])


@pytest.mark.parametrize("kind", sorted(balancers.BALANCERS))
def test_state_round_trip_continues_identically(tmp_path, kind):
    original = balancers.make_balancer(kind, names=NAMES3)
    if kind == "uncertainty":
        with torch.no_grad():
            original.log_variance.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for values in SEQUENCE3[:3]:
        original(_losses(NAMES3, values))
    path = tmp_path / "balancer.pt"
    torch.save(original.state_dict(), path)
    restored = balancers.make_balancer(kind, names=NAMES3)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.step == original.step == 3
    assert _weights(restored, NAMES3, SEQUENCE3[3]) == _weights(original, NAMES3, SEQUENCE3[3])


def test_state_of_other_names_or_kind_is_rejected():
    state = balancers.make_balancer("dsmd", names=NAMES3).state_dict()
    with pytest.raises(ValueError, match="names"):
        balancers.make_balancer("dsmd", names=["a", "b", "z"]).load_state_dict(state)
    with pytest.raises(ValueError, match="'dsmd'"):
        balancers.make_balancer("dsmd_rate", names=NAMES3).load_state_dict(state)


@pytest.mark.parametrize("kind", sorted(balancers.BALANCERS))
def test_non_finite_loss_names_term_and_step(kind):
    balancer = balancers.make_balancer(kind, names=NAMES3)
    balancer(_losses(NAMES3, SEQUENCE3[0]))
    with pytest.raises(FloatingPointError, match=r"'b' is nan at balancer step 1"):
        balancer(_losses(NAMES3, [1.0, float("nan"), 1.0]))
    with pytest.raises(FloatingPointError, match=r"'c' is inf at balancer step 1"):
        balancer(_losses(NAMES3, [1.0, 1.0, float("inf")]))


def test_bad_kind_params_and_names():
    with pytest.raises(ValueError, match=r"unknown balancer kind 'gradnorm'.*'dsmd'.*'dsmd_rate'.*'dwa'.*'fixed'"):
        balancers.make_balancer("gradnorm", names=NAMES3)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['kk'\]"):
        balancers.make_balancer("dsmd", names=NAMES3, kk=3)
    balancer = balancers.make_balancer("dsmd", names=NAMES3)
    with pytest.raises(ValueError, match=r"missing \['c'\], unexpected \['d'\]"):
        balancer(_losses(["a", "b", "d"], [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="distinct"):
        balancers.make_balancer("dsmd", names=["a", "a"])
