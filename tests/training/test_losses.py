"""Alignment losses against values computed by hand on small fixed tensors."""

import math

import pytest
import torch

from training import losses as L

LN = math.log


def _softplus(x):  # -logsigmoid(x)
    return math.log1p(math.exp(-x))


def test_sequence_logprobs_sum_label_tokens_after_the_shift():
    # pos 0 predicts token 1 uniformly (log 0.5); pos 1 puts 0.75 on token 0; pos 2 predicts nothing.
    logits = torch.tensor([[[0.0, 0.0], [LN(3), 0.0], [9.0, -9.0]]])
    both = L.sequence_logprobs(logits, torch.tensor([[-100, 1, 0]]))
    last = L.sequence_logprobs(logits, torch.tensor([[-100, -100, 0]]))
    assert both.tolist() == pytest.approx([LN(0.5 * 0.75)])
    assert last.tolist() == pytest.approx([LN(0.75)])
    logp, mask = L.token_logprobs(logits, torch.tensor([[-100, -100, 0]]))
    assert mask.tolist() == [[False, True]] and logp[0, 0] == 0


def test_dpo_sigmoid_rewards_margin_accuracy():
    # pair 0: chosen ratio +1, rejected ratio -1 (h = 2); pair 1: chosen ratio -1, rejected ratio 0 (h = -1)
    out = L.dpo_loss(
        torch.tensor([-1.0, -3.0]),
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        beta=0.5,
    )
    assert float(out.loss) == pytest.approx((_softplus(1.0) + _softplus(-0.5)) / 2)
    assert out.chosen_rewards.tolist() == [0.5, -0.5] and out.rejected_rewards.tolist() == [-0.5, 0.0]
    assert float(out.margin) == pytest.approx((1.0 - 0.5) / 2)
    assert float(out.accuracy) == 0.5


def test_dpo_label_smoothing_and_ipo():
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))  # h = 2
    smooth = L.dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert float(smooth.loss) == pytest.approx(0.9 * _softplus(1.0) + 0.1 * _softplus(-1.0))
    assert float(L.dpo_loss(*args, beta=0.5, loss_type="ipo").loss) == pytest.approx((2 - 1) ** 2)
    assert float(L.dpo_loss(*args, beta=0.25, loss_type="ipo").loss) == pytest.approx((2 - 2) ** 2)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(*args, beta=0.5, loss_type="exo")


def test_dpo_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-4.0, -7.5, -0.3])
    out = L.dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert float(out.loss) == pytest.approx(math.log(2)) and float(out.accuracy) == 0.0


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    L.dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=1.0).loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_bradley_terry_with_and_without_margin():
    out = L.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert float(out.loss) == pytest.approx((_softplus(1.0) + _softplus(-1.0)) / 2)
    assert float(out.accuracy) == 0.5 and float(out.margin) == pytest.approx(0.0)
    with_margin = L.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert float(with_margin.loss) == pytest.approx(math.log(2))


def test_gae_monte_carlo_and_discounted():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3)
    adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5]) and ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # gamma 0.9, lambda 0.5: A2 = 0.5; A1 = -0.05 + 0.45 * 0.5; A0 = -0.05 + 0.45 * A1
    adv, _ = L.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.02875, 0.175, 0.5])


def test_gae_masked_position_is_terminal_and_leaks_nothing():
    rewards, values = torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.5, 9.0]])
    adv, ret = L.gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.175, 0.5, 0.0]) and ret[0].tolist() == pytest.approx([0.675, 1.0, 0.0])


def test_masked_mean_var_and_whiten():
    x, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])
    assert float(L.masked_mean(x, mask)) == pytest.approx(2.0)
    assert float(L.masked_var(x, mask)) == pytest.approx(2 / 3)
    s = math.sqrt(1.5)
    assert L.whiten(x, mask).tolist() == pytest.approx([-s, 0.0, s, 0.0], abs=1e-6)
    assert L.whiten(x, mask, shift_mean=False).tolist() == pytest.approx([2 - s, 2.0, 2 + s, 0.0], abs=1e-6)
    rows = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    assert L.masked_mean(rows, torch.tensor([[1, 1], [1, 0]]), dim=1).tolist() == [2.0, 5.0]


def test_ppo_policy_loss_clips_and_reports():
    logprobs, old = torch.log(torch.tensor([[1.5, 0.5, 3.0]])), torch.zeros(1, 3)
    adv, mask = torch.ones(1, 3), torch.tensor([[1, 1, 0]])
    out = L.ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # token 0: ratio 1.5 clipped to 1.2 (active); token 1: ratio 0.5, the unclipped -0.5 is larger.
    assert float(out.loss) == pytest.approx((-1.2 - 0.5) / 2)
    assert float(out.clip_fraction) == 0.5
    assert float(out.approx_kl) == pytest.approx((0.5 - LN(1.5) - 0.5 - LN(0.5)) / 2)


def test_ppo_value_loss_clipped():
    loss, frac = L.ppo_value_loss(
        torch.tensor([[2.0, 0.0]]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[0.0, 1.0]]),
        torch.ones(1, 2),
        clip_eps=0.5,
    )
    assert float(loss) == pytest.approx(0.5 * (4 + 1) / 2) and float(frac) == 0.0
    loss, frac = L.ppo_value_loss(
        torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), clip_eps=0.2
    )
    assert float(loss) == pytest.approx(0.5 * 0.8**2) and float(frac) == 1.0


def test_kl_estimators():
    lp, ref = torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)])
    assert float(L.kl_penalty(lp, ref, "k1")) == pytest.approx(LN(2))
    assert float(L.kl_penalty(lp, ref, "k3")) == pytest.approx(0.5 - 1 + LN(2))
    assert float(L.kl_penalty(lp, lp, "k3")) == 0.0
    with pytest.raises(ValueError, match="k2"):
        L.kl_penalty(lp, ref, "k2")


def test_entropy_from_logits():
    ent = L.entropy_from_logits(torch.tensor([[0.0, 0.0, 0.0, 0.0], [LN(3), 0.0, -1e4, -1e4]]))
    assert ent.tolist() == pytest.approx([LN(4), -(0.75 * LN(0.75) + 0.25 * LN(0.25))], abs=1e-6)


def test_grpo_group_relative_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-4)
    assert L.grpo_advantages(rewards, 4).tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0])
    assert L.grpo_advantages(rewards, 4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="groups of 3"):
        L.grpo_advantages(rewards, 3)


def test_value_clip_fraction_counts_only_values_outside_the_range():
    old = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    # Inside the range (rounding of old + (v - old) would make the clipped error win at random), then outside.
    values = torch.tensor([[0.1 + 1e-7, 0.2 - 3e-8, 0.3 + 0.5, 0.4]])
    returns = torch.tensor([[5.0, -5.0, 2.0, 0.4]])
    _, fraction = L.ppo_value_loss(values, old, returns, torch.ones(1, 4), clip_eps=0.2)
    assert float(fraction) == pytest.approx(0.25)  # only the third moved by more than clip_eps (and clipping binds)
