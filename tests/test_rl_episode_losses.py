"""Multi-turn completions through the RL losses: environment tokens inside a completion (tool results,
user replies) carry completion mask 0 and count nowhere -- hand-worked values, autograd's gradient."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_train.losses import grpo, ppo
from vllm_train.trainers.rl_policy import CompletionBatch
from vllm_train.trainers.rl_rollouts import Rollout

approx = pytest.approx


def _rollout(completions, masks):
    n = len(completions)
    return Rollout(prompts=["p"] * n, examples=[{}] * n, prompt_ids=[[1, 2]] * n, completion_ids=completions,
                   completions=[""] * n, vllm_logps=[[-1.0] * len(c) for c in completions], sync_ms=0.0,
                   seconds=0.0, completion_masks=masks)


def test_completion_mask_is_padding_times_model_tokens():
    batch = CompletionBatch.of(_rollout([[5, 6, 7, 8, 9], [5, 6, 7]], [[1, 1, 0, 0, 1], [1, 0, 1]]), [0, 1])
    assert batch.mask_BT.tolist() == [[True, True, False, False, True], [True, False, True, False, False]]
    assert batch.sequences[1] == [1, 2, 5, 6, 7]  # environment tokens stay in the forward's input


def test_two_episode_grpo_update_masks_environment_tokens_hand_worked():
    # Two episodes of one prompt, rewards 1 and 0: A = +-0.5 / (std 0.70711 + 1e-4) = +-a.
    # Per-token ratios (env tokens get wild ratios: counted, they would change the loss):
    #   episode 0, mask 1 1 0 0 1, ratios 1.1 0.9 [5 5] 1.0, A = +a: -a * mean(1.1, 0.9, 1.0) = -a
    #   episode 1, mask 1 0 1,     ratios 1.1 [5] 1.3,       A = -a: +a * mean(1.1, min-clip max(1.3, 1.2)) = 1.2a
    # GRPO: mean over each sequence's tokens, then over sequences -> (-a + 1.2a) / 2 = 0.1a
    batch = CompletionBatch.of(_rollout([[5, 6, 7, 8, 9], [5, 6, 7]], [[1, 1, 0, 0, 1], [1, 0, 1]]), [0, 1])
    torch.manual_seed(0)
    logits_BTV = torch.randn(2, 5, 11, requires_grad=True)
    logps_BT = torch.log_softmax(logits_BTV, -1).gather(-1, batch.tokens_BT[..., None])[..., 0]
    ratios = torch.tensor([[1.1, 0.9, 5.0, 5.0, 1.0], [1.1, 5.0, 1.3, 9.0, 9.0]])
    old_BT = logps_BT.detach() - ratios.log()
    adv_B = grpo.group_advantages(torch.tensor([[1.0, 0.0]])).flatten()
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert adv_B.tolist() == approx([a, -a])
    loss, _ = grpo.grpo_loss(logps_BT, old_BT, adv_B, batch.mask_BT)
    assert loss.item() == approx(0.1 * a, rel=1e-5)
    loss.backward()
    env = ~batch.mask_BT
    assert torch.count_nonzero(logits_BTV.grad[env]) == 0  # exactly zero on environment tokens and padding
    assert (logits_BTV.grad[batch.mask_BT].abs().sum(-1) > 0).all()  # and not on the model's


def test_ppo_on_episodes_skips_environment_tokens_hand_worked():
    # mask 1 0 1 (one env token between two model tokens), score 1 on the last model token, no KL:
    # gamma .9, lambda .5, V = .5 [9] .7: A2 = 1 - .7 = .3; t=0's next step is t=2 (the env token skipped):
    # d0 = .9 * .7 - .5 = .13; A0 = .13 + .45 * .3 = .265; the env token: A = 0, return 0.
    mask = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    rewards = ppo.kl_shaped_rewards(torch.tensor([1.0]), torch.zeros(1, 4), mask, 0.0)
    assert rewards.tolist() == [[0.0, 0.0, 1.0, 0.0]]  # on the last *model* token, not at mask.sum() - 1
    adv, ret = ppo.gae(rewards, torch.tensor([[0.5, 9.0, 0.7, 3.0]]), mask, 0.9, 0.5)
    assert adv[0].tolist() == approx([0.265, 0.0, 0.3, 0.0])
    assert ret[0].tolist() == approx([0.765, 0.0, 1.0, 0.0])
    # the mismatch metric and the importance weights read model tokens only
    sampler = torch.tensor([[-1.0, -50.0, -1.0, 0.0]], dtype=torch.float64)
    trainer = torch.tensor([[-1.5, 0.0, -0.5, 0.0]])
    assert ppo.masked_mean((trainer - sampler).abs(), mask).item() == approx(0.5)
    assert ppo.truncated_importance_weights(trainer, sampler, mask, 2.0)[0].tolist() == \
        approx([math.exp(-0.5), 0.0, math.exp(0.5), 0.0])


@pytest.mark.parametrize("loss_fn", [grpo.grpo_loss, grpo.dr_grpo_loss, grpo.token_mean_loss])
def test_single_turn_losses_unchanged_by_an_all_ones_completion_mask(loss_fn):
    completions = [[5, 6, 7], [5, 6], [7], [5, 6, 7, 8]]
    plain = CompletionBatch.of(_rollout(completions, None), [0, 1, 2, 3])
    ones = CompletionBatch.of(_rollout(completions, [[1] * len(c) for c in completions]), [0, 1, 2, 3])
    assert torch.equal(plain.mask_BT, ones.mask_BT)
    torch.manual_seed(1)
    logps, old, ref = (torch.randn(4, 4) for _ in range(3))
    adv = torch.randn(4)
    kwargs = dict(ref_logps_BT=ref, kl_coef=0.1, is_weights_BT=torch.rand(4, 4))
    assert torch.equal(loss_fn(logps, old, adv, plain.mask_BT, **kwargs)[0],
                       loss_fn(logps, old, adv, ones.mask_BT, **kwargs)[0])
