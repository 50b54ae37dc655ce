"""DPO variants (hinge, robust, cDPO) and the reference-free SimPO and ORPO against closed forms: values
and gradients computed by hand on small fixed tensors."""

import math

import pytest
import torch

from training import losses as L


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _softplus(x):  # -logsigmoid(x)
    return math.log1p(math.exp(-x))


def _leaf(*values):
    return torch.tensor(values, requires_grad=True)


def _dpo(loss_type, beta, eps=0.0, chosen=(-1.0,), rejected=(-3.0,)):
    """One backward of dpo_loss with the reference at -2 for both sides; (out, d/dchosen, d/drejected)."""
    c, r = _leaf(*chosen), _leaf(*rejected)
    ref = torch.full((len(chosen),), -2.0)
    out = L.dpo_loss(c, r, ref, ref, beta=beta, loss_type=loss_type, label_smoothing=eps)
    out.loss.backward()
    return out, c.grad.tolist(), r.grad.tolist()


def test_hinge_is_relu_of_one_minus_beta_h_with_its_gradient():
    # h = 2 (chosen ratio +1, rejected -1): beta 0.25 -> 1 - 0.5 = 0.5, slope -beta on chosen, +beta on rejected
    out, gc, gr = _dpo("hinge", 0.25)
    assert out.loss.item() == pytest.approx(0.5)
    assert gc == pytest.approx([-0.25]) and gr == pytest.approx([0.25])
    # beta 1: 1 - 2 < 0, the pair is past the margin: no loss, no gradient
    out, gc, gr = _dpo("hinge", 1.0)
    assert out.loss.item() == 0.0 and gc == [0.0] and gr == [0.0]
    # two pairs averaged: h = 2 and h = -1 (chosen ratio -1, rejected 0) at beta 0.5 -> (0 + 1.5) / 2
    out, gc, gr = _dpo("hinge", 0.5, chosen=(-1.0, -3.0), rejected=(-3.0, -2.0))
    assert out.loss.item() == pytest.approx(0.75) and gc == pytest.approx([0.0, -0.25]) and gr == [0.0, 0.25]


def test_robust_matches_its_formula_and_gradient():
    beta, eps, h = 0.5, 0.2, 2.0
    z = beta * h
    out, gc, _ = _dpo("robust", beta, eps)
    want = ((1 - eps) * _softplus(z) - eps * _softplus(-z)) / (1 - 2 * eps)  # logsigmoid(-z) = -softplus(-z)
    assert out.loss.item() == pytest.approx(want)
    # d/dz: ((1 - eps)(sig(z) - 1) - eps sig(z)) / (1 - 2 eps) = sig(z) - (1 - eps) / (1 - 2 eps); dz/dchosen = beta
    assert gc == pytest.approx([beta * (_sig(z) - (1 - eps) / (1 - 2 * eps))])
    # eps = 0 is plain DPO
    assert _dpo("robust", beta)[0].loss.item() == pytest.approx(_dpo("sigmoid", beta)[0].loss.item())


def test_robust_is_unbiased_under_label_noise():
    # Its expectation over a flip with probability eps is the clean loss -logsigmoid(z): the point of it.
    beta, eps = 0.5, 0.2
    kept = _dpo("robust", beta, eps)[0].loss.item()
    flipped = _dpo("robust", beta, eps, chosen=(-3.0,), rejected=(-1.0,))[0].loss.item()
    assert (1 - eps) * kept + eps * flipped == pytest.approx(_softplus(beta * 2.0))


def test_cdpo_label_smoothing_gradient():
    beta, eps, z = 0.5, 0.1, 1.0
    _, gc, gr = _dpo("sigmoid", beta, eps)
    # d/dz of -(1 - eps) logsig(z) - eps logsig(-z) = -(1 - eps)(1 - sig(z)) + eps sig(z) = sig(z) - (1 - eps)
    assert gc == pytest.approx([beta * (_sig(z) - (1 - eps))]) and gr == pytest.approx([-beta * (_sig(z) - (1 - eps))])


def test_unknown_loss_type_names_the_known_ones():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        _dpo("exo", 0.5)


def test_mean_logprobs_divide_by_the_label_tokens():
    # pos 0 predicts token 1 uniformly (log 0.5); pos 1 puts 0.75 on token 0 (same logits as test_losses)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [9.0, -9.0]]]).repeat(2, 1, 1)
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 0]])
    assert L.mean_logprobs(logits, labels).tolist() == pytest.approx(
        [(math.log(0.5) + math.log(0.75)) / 2, math.log(0.75)]
    )


def test_simpo_value_rewards_and_gradient():
    chosen, rejected = _leaf(-0.5, -2.0), _leaf(-1.5, -1.0)  # mean log-probs
    out = L.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    # pair 0: 2 * 1 - 0.5 = 1.5; pair 1: 2 * -1 - 0.5 = -2.5
    assert out.loss.item() == pytest.approx((_softplus(1.5) + _softplus(-2.5)) / 2)
    assert out.chosen_rewards.tolist() == [-1.0, -4.0] and out.rejected_rewards.tolist() == [-3.0, -2.0]
    assert float(out.accuracy) == 0.5 and float(out.margin) == pytest.approx((2.0 - 2.0) / 2)
    out.loss.backward()
    # d/dchosen_i = -beta (1 - sig(u_i)) / 2 (the mean over 2 pairs), d/drejected_i the opposite
    want = [-2.0 * (1 - _sig(u)) / 2 for u in (1.5, -2.5)]
    assert chosen.grad.tolist() == pytest.approx(want) and rejected.grad.tolist() == pytest.approx([-w for w in want])


def test_simpo_gamma_shifts_the_loss_of_equal_responses():
    same = torch.tensor([-1.0])
    assert L.simpo_loss(same, same, beta=2.0, gamma=0.0).loss.item() == pytest.approx(math.log(2))
    assert L.simpo_loss(same, same, beta=2.0, gamma=1.0).loss.item() == pytest.approx(_softplus(-1.0))


def test_log_odds_of_a_probability():
    p = torch.tensor([0.5, 0.2, 0.9])
    assert L.log_odds(p.log()).tolist() == pytest.approx([0.0, math.log(0.25), math.log(9.0)], abs=1e-6)


def test_orpo_value_statistics_and_gradient():
    pc, pr, beta = 0.5, 0.2, 0.25  # geometric-mean token probabilities of chosen and rejected
    chosen, rejected = _leaf(math.log(pc)), _leaf(math.log(pr))
    out = L.orpo_loss(chosen, rejected, beta=beta)
    ratio = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))  # log 4
    assert float(out.log_odds) == pytest.approx(math.log(4.0))
    assert float(out.nll) == pytest.approx(-math.log(pc))
    assert out.loss.item() == pytest.approx(-math.log(pc) + beta * _softplus(ratio))
    assert float(out.accuracy) == 1.0 and out.chosen_rewards.tolist() == pytest.approx([math.log(pc)])
    out.loss.backward()
    # d log odds / d mean_logp = 1 / (1 - p); d(-logsig(ratio))/d ratio = -(1 - sig(ratio))
    push = beta * (1 - _sig(ratio))
    assert chosen.grad.item() == pytest.approx(-1 - push / (1 - pc))
    assert rejected.grad.item() == pytest.approx(push / (1 - pr))


def test_orpo_stays_finite_at_certainty():
    # A chosen side the model is sure of (mean log-prob 0) has infinite odds; the loss must stay usable.
    chosen = _leaf(0.0)
    out = L.orpo_loss(chosen, torch.tensor([math.log(0.5)]), beta=0.1)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and math.isfinite(chosen.grad.item())
