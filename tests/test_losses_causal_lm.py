"""CausalLMLoss: mean over labelled tokens only, checked against a hand-computed value."""

import math

import torch
import torch.nn.functional as F

from vllm_train.losses.causal_lm import CausalLMLoss, causal_lm_loss, shifted_token_logprobs


def test_hand_worked_two_token_example():
    # vocab 2; position 0 predicts label[1]=1 with logits (0, ln 3) -> p = 3/4; position 1 is padding.
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, 1, -100]])
    loss = CausalLMLoss()(logits, labels)
    assert math.isclose(loss.item(), -math.log(0.75), rel_tol=1e-6)


def test_matches_cross_entropy_over_unmasked_tokens_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100  # prompt
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0  # padding whose labels were (wrongly) left as ids
    loss = CausalLMLoss()(logits, labels, attention_mask=mask)
    ref_labels = labels.masked_fill(mask == 0, -100)[:, 1:]
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ref_labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-6)
    # changing the logits at padded/prompt positions' targets cannot change the loss
    logits2 = logits.clone()
    logits2[2, 4:, :] += 100.0
    logits2[0, :2, :] -= 50.0
    assert torch.allclose(CausalLMLoss()(logits2, labels, attention_mask=mask), loss, atol=1e-6)


def test_token_logprobs_and_metrics():
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[0, 2, -100]])
    logps, mask = shifted_token_logprobs(logits, labels)
    assert mask.tolist() == [[True, False]]
    assert torch.allclose(logps, torch.tensor([[math.log(0.25), 0.0]]))
    _, metrics = causal_lm_loss(logits, labels)
    assert metrics["num_tokens"] == 1
