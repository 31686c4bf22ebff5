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


def _reference_token_logprobs(hidden_NH, weight_VH, tokens_N, temperature):
    logits_NV = (hidden_NH @ weight_VH.T).float() / temperature
    return torch.log_softmax(logits_NV, dim=-1).gather(-1, tokens_N[:, None])[:, 0]


def test_chunked_token_logprobs_pass_gradcheck_across_chunks():
    from vllm_train.losses.causal_lm import token_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(11, (7,))
    # 3 rows per chunk (33 // 11): chunks of 3, 3 and 1 rows; gradients for hidden and weight both
    fn = lambda h, w: token_logprobs(h, w, tokens, temperature=0.7, max_chunk_elements=33)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_chunked_token_logprobs_equal_the_full_log_softmax():
    from vllm_train.losses.causal_lm import token_logprobs

    torch.manual_seed(1)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16)
    tokens = torch.randint(300, (50,))
    upstream = torch.randn(50)
    ours = token_logprobs(hidden, weight, tokens, temperature=1.3, max_chunk_elements=300 * 8)  # 7 chunks
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    reference = _reference_token_logprobs(hidden, weight, tokens, 1.3)
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), hidden)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=0, atol=1e-5)
    assert ours.dtype == torch.float32
