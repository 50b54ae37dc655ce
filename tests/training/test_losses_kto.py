"""KTO against closed forms: values and gradients computed by hand on small fixed tensors, the reference
point from mismatched rows (detached, clamped at 0), batches of one kind only."""

import math

import pytest
import torch

from training import losses as L


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _dsig(x):
    return _sig(x) * (1 - _sig(x))


def _leaf(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_reference_point_is_the_clamped_mean_kl_without_gradient():
    policy_kl, ref_kl = _leaf(-2.5, -1.0, -4.0), torch.tensor([-3.0, -2.0, -4.0], dtype=torch.float64)
    z0 = L.kto_reference_point(policy_kl, ref_kl)
    assert z0.item() == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert not z0.requires_grad
    # the policy below the reference on average: no negative reference point
    assert L.kto_reference_point(_leaf(-5.0, -1.0), torch.tensor([-3.0, -2.0], dtype=torch.float64)).item() == 0.0


def test_mixed_batch_values_and_gradients():
    beta, wd, wu = 0.5, 1.0, 2.0
    policy, ref = _leaf(-1.0, -3.0), torch.tensor([-2.0, -2.0], dtype=torch.float64)
    policy_kl = _leaf(-2.5, -1.5)
    z0 = L.kto_reference_point(policy_kl, torch.tensor([-3.0, -2.0], dtype=torch.float64))  # 0.5
    out = L.kto_loss(
        policy, ref, torch.tensor([True, False]), z0, beta=beta, desirable_weight=wd, undesirable_weight=wu
    )
    out.loss.backward()
    # row 0 desirable: r = 1, beta (r - z0) = 0.25; row 1 undesirable: r = -1, beta (z0 - r) = 0.75
    assert out.loss.item() == pytest.approx((wd * (1 - _sig(0.25)) + wu * (1 - _sig(0.75))) / 2)
    # d/dr of w (1 - sig(beta g)): -w beta sig'(.) for g = r - z0, +w beta sig'(.) for g = z0 - r; / 2 rows
    assert policy.grad.tolist() == pytest.approx([-wd * beta * _dsig(0.25) / 2, wu * beta * _dsig(0.75) / 2])
    assert policy_kl.grad is None  # z0 carries no gradient back to the mismatched rows
    assert out.rewards.tolist() == pytest.approx([0.5, -0.5]) and out.reference_point.item() == pytest.approx(0.5)


def test_only_desirable_rows_and_the_clamped_reference_point():
    beta = 0.1
    policy, ref = _leaf(-1.0, -4.0, -2.0), torch.tensor([-1.5, -3.0, -2.0], dtype=torch.float64)
    # mismatched rows less likely under the policy than under the reference: mean -1, clamped to 0
    z0 = L.kto_reference_point(torch.tensor([-6.0, -5.0]), torch.tensor([-5.0, -4.0]))
    assert z0.item() == 0.0
    out = L.kto_loss(policy, ref, torch.tensor([True, True, True]), z0, beta=beta, desirable_weight=1.5)
    out.loss.backward()
    ratios = [0.5, -1.0, 0.0]
    assert out.loss.item() == pytest.approx(sum(1.5 * (1 - _sig(beta * r)) for r in ratios) / 3)
    assert policy.grad.tolist() == pytest.approx([-1.5 * beta * _dsig(beta * r) / 3 for r in ratios])


def test_only_undesirable_rows_push_the_policy_down():
    policy, ref = _leaf(-2.0, -2.0), torch.tensor([-2.0, -1.0], dtype=torch.float64)
    out = L.kto_loss(policy, ref, torch.tensor([False, False]), 0.25, beta=1.0, undesirable_weight=0.5)
    out.loss.backward()
    gains = [0.25 - 0.0, 0.25 + 1.0]  # z0 - r
    assert out.loss.item() == pytest.approx(sum(0.5 * (1 - _sig(g)) for g in gains) / 2)
    assert policy.grad.tolist() == pytest.approx([0.5 * _dsig(g) / 2 for g in gains])
    assert all(g > 0 for g in policy.grad.tolist())  # descending lowers the undesirable rows' log-probs
