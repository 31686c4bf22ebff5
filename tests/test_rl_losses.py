"""RL losses and advantages against hand-worked values (numbers worked out on paper in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_train.losses import grpo, ppo

approx = pytest.approx


def test_gae_hand_worked():
    # gamma 0.9, lambda 0.5, reward 1 on the last of three tokens, V = .5 .6 .7:
    # d2 = 1 - .7 = .3;  d1 = .9*.7 - .6 = .03;  d0 = .9*.6 - .5 = .04
    # A2 = .3;  A1 = .03 + .45*.3 = .165;  A0 = .04 + .45*.165 = .11425;  R = A + V
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = ppo.gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), 0.9, 0.5)
    assert adv[0].tolist() == approx([0.11425, 0.165, 0.3])
    assert ret[0].tolist() == approx([0.61425, 0.765, 1.0])


def test_gae_ignores_padding_and_is_monte_carlo_at_gamma_lambda_one():
    # row 0: gamma = lambda = 1 -> A_t = (sum of future rewards) - V_t = 1 - V
    # row 1: two real tokens then padding (value 9 there must not leak): d1 = 2 - 1 = 1, d0 = 0 + 1 - 1 = 0
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    assert adv[0].tolist() == approx([0.5, 0.4, 0.3])
    assert adv[1].tolist() == approx([1.0, 1.0, 0.0])
    assert ret[1].tolist() == approx([2.0, 2.0, 0.0])


def test_clipped_policy_loss_hand_worked():
    # ratios 1.5, 0.5, 1.1 with A = +1, +1, -1 and clip 0.2:
    #   min(1.5, 1.2) = 1.2;  min(0.5, 0.8) = 0.5;  min(-1.1, -1.1) = -1.1  -> loss = -(1.2 + 0.5 - 1.1) / 3
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    weights = torch.full((1, 3), 1 / 3)
    loss, m = ppo.clipped_policy_loss(logps, torch.zeros(1, 3), adv, weights, 0.2, 0.2)
    assert loss.item() == approx(-0.2)
    assert m["clipfrac"] == approx(1 / 3)
    # DAPO's asymmetric clip: the upper bound moves to 1.28 -> -(1.28 + 0.5 - 1.1) / 3
    loss_high, _ = ppo.clipped_policy_loss(logps, torch.zeros(1, 3), adv, weights, 0.2, 0.28)
    assert loss_high.item() == approx(-(1.28 + 0.5 - 1.1) / 3)
    # truncated importance weights multiply each token's loss
    loss_is, _ = ppo.clipped_policy_loss(logps, torch.zeros(1, 3), adv, weights, 0.2, 0.2,
                                         is_weights_BT=torch.tensor([[2.0, 1.0, 0.0]]))
    assert loss_is.item() == approx(-(2 * 1.2 + 0.5) / 3)


def test_clipped_value_loss_hand_worked():
    # V = 2, V_old = 1, R = 3, clip .5: clipped V = 1.5; max((2-3)^2, (1.5-3)^2) = 2.25; x 0.5 = 1.125
    loss, m = ppo.clipped_value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]),
                                     torch.ones(1, 1, dtype=torch.bool), 0.5)
    assert loss.item() == approx(1.125)
    assert m["value_clipfrac"] == 1.0


def test_kl_estimators_and_shaped_rewards():
    # p = .5, q = .25: k1 = log 2; k3 = q/p - 1 - log(q/p) = .5 - 1 + log 2
    lp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    assert ppo.kl_per_token(lp, ref, "k1").item() == approx(math.log(2))
    assert ppo.kl_per_token(lp, ref, "k3").item() == approx(0.5 - 1 + math.log(2))
    # -0.5 * KL on every real token, score on the last real one
    r = ppo.kl_shaped_rewards(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 0.3]]),
                              torch.tensor([[1, 1, 0]], dtype=torch.bool), 0.5)
    assert r[0].tolist() == approx([-0.05, 0.9, 0.0])


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # mean 2, population variance 2/3 -> +-1/sqrt(2/3) = +-1.2247; padding -> 0
    assert ppo.masked_whiten(x, mask)[0].tolist() == approx([-1.224744, 0.0, 1.224744, 0.0], abs=1e-5)


def test_group_advantages_grpo_dr_grpo_rloo():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # mean .5, sample std sqrt(4 * .25 / 3) = .57735 -> +-0.866
    assert grpo.group_advantages(rewards)[0].tolist() == approx([0.8659, -0.8659, -0.8659, 0.8659], abs=2e-4)
    # Dr.GRPO: centred only
    assert grpo.group_advantages(rewards, scale_by_std=False)[0].tolist() == approx([0.5, -0.5, -0.5, 0.5])
    # RLOO: 1 - (1 + 0 + 0) / 3 = 2/3;  0 - (1 + 0 + 1) / 3 = -2/3
    assert grpo.rloo_advantages(rewards)[0].tolist() == approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # an all-equal group has zero advantage (and no NaN from std = 0)
    assert grpo.group_advantages(torch.ones(1, 4)).abs().max().item() == 0.0


def test_dynamic_sampling_filter():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert grpo.informative_groups(rewards).tolist() == [False, True, False]


def test_aggregations_hand_worked():
    # Two sequences, lengths 1 and 3, ratio 1 (token loss = -A), A = 2 and 1:
    #   GRPO  (sequence means, then mean):  (-2 + -1) / 2          = -1.5
    #   DAPO  (token mean):                 -(2 + 3 * 1) / 4         = -1.25
    #   Dr.GRPO (sum / (2 seqs * 4 max)):   -(2 + 3) / 8             = -0.625
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([2.0, 1.0])
    assert grpo.grpo_loss(logps, logps, adv, mask)[0].item() == approx(-1.5)
    assert grpo.token_mean_loss(logps, logps, adv, mask)[0].item() == approx(-1.25)
    size = grpo.BatchSize(2, 4, 4)
    assert grpo.dr_grpo_loss(logps, logps, adv, mask, size=size)[0].item() == approx(-0.625)


@pytest.mark.parametrize("loss_fn", [grpo.grpo_loss, grpo.dr_grpo_loss, grpo.token_mean_loss])
def test_micro_batches_add_up_to_the_minibatch_loss(loss_fn):
    torch.manual_seed(0)
    logps, old = torch.randn(6, 5) * 0.1, torch.randn(6, 5) * 0.1
    mask = torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    adv, ref = torch.randn(6), torch.randn(6, 5) * 0.1
    size = grpo.BatchSize.of(mask, 5)
    full, _ = loss_fn(logps, old, adv, mask, size=size, ref_logps_BT=ref, kl_coef=0.1)
    parts = sum(loss_fn(logps[i], old[i], adv[i], mask[i], size=size, ref_logps_BT=ref[i], kl_coef=0.1)[0]
                for i in (slice(0, 2), slice(2, 6)))
    assert parts.item() == approx(full.item(), abs=1e-6)


def test_ppo_loss_combines_policy_and_value():
    mask = torch.ones(1, 2, dtype=torch.bool)
    z = torch.zeros(1, 2)
    # ratio 1, A = (1, 3): policy loss -2; values 0 vs returns (1, 1): value loss .5; total -2 + .5 * .5
    loss, m = ppo.ppo_loss(z, z, torch.tensor([[1.0, 3.0]]), z, z, torch.ones(1, 2), mask, clip=0.2,
                           value_clip=0.2, value_coef=0.5)
    assert m["policy_loss"] == approx(-2.0)
    assert m["value_loss"] == approx(0.5)
    assert loss.item() == approx(-1.75)
