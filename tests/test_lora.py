"""Our LoRA layers against their oracles: autograd's gradcheck, PEFT's forward and files, and vLLM's
log-probs for an adapter we saved."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_served_logprobs, reference_logprobs
from torch import nn

from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig
from vllm_train.lora.injector import LoRAInjector, fused_output_sizes
from vllm_train.lora.layers import FusedLoRALinear, LoRAWrappedLinear, TrainableLoRALinear
from vllm_train.lora.peft_io import PEFT_PREFIX


def load_base(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return model.eval()


def randomize(params, seed: int, std: float = 0.05) -> None:
    """Non-zero A and B, so a wrong scaling, transpose or slice shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def peft_model_of(tiny_model, config: LoRATrainConfig, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                             lora_dropout=0.0, use_rslora=config.use_rslora)
    model = get_peft_model(load_base(tiny_model), peft_config)
    randomize([p for n, p in model.named_parameters() if "lora_" in n], seed)
    return model.eval()


def our_model_of(tiny_model, config: LoRATrainConfig):
    model = load_base(tiny_model)
    injector = LoRAInjector(config)
    injector.inject(model)
    return model, injector


def peft_names_to_ours(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's in-memory names (``...q_proj.lora_A.default.weight``) -> file names (``...lora_A.weight``)."""
    return {k.replace(".default", ""): v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


# ---- the layer -------------------------------------------------------------------------------------
def test_gradcheck_trainable_lora_linear():
    """gradcheck (float64) with respect to the input and the base output, and B's gradient by hand."""
    torch.manual_seed(0)
    lora = TrainableLoRALinear(6, 5, rank=3, alpha=6).double()
    randomize(lora.parameters(), seed=0, std=0.5)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)  # (batch, seq, in)
    base_output = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)  # (batch, seq, out)
    assert torch.autograd.gradcheck(lambda x, y: lora(x, y), (x, base_output))

    lora(x, base_output).sum().backward()
    hidden = x.detach().reshape(-1, 6) @ lora.lora_a.detach().T  # (tokens, r)
    expected_grad_b = torch.ones(8, 5, dtype=torch.float64).T @ hidden * lora.scaling  # (out, r)
    torch.testing.assert_close(lora.lora_b.grad, expected_grad_b)


def test_gradcheck_parameters_through_layer():
    """gradcheck of the layer's output as a function of its own A and B parameters."""
    lora = TrainableLoRALinear(5, 4, rank=2, alpha=3, use_rslora=True).double()
    randomize(lora.parameters(), seed=1, std=0.5)
    x = torch.randn(3, 5, dtype=torch.float64)
    base_output = torch.randn(3, 4, dtype=torch.float64)

    def as_function_of(a, b):
        return torch.func.functional_call(lora, {"lora_a": a, "lora_b": b}, (x, base_output))

    assert torch.autograd.gradcheck(as_function_of, (lora.lora_a.detach().clone().requires_grad_(True),
                                                     lora.lora_b.detach().clone().requires_grad_(True)))


def test_bf16_activation_fp32_lora_grads_match_plain_autograd():
    """bf16 activations over fp32 LoRA weights: the custom backward (which keeps x in bf16 and computes
    in bf16, like vLLM's kernels) gives autograd's gradients of the same arithmetic, in fp32."""
    torch.manual_seed(0)
    lora = TrainableLoRALinear(32, 24, rank=4, alpha=8)
    randomize(lora.parameters(), seed=9, std=0.2)
    x = torch.randn(3, 5, 32).to(torch.bfloat16).requires_grad_(True)  # (batch, seq, in), bf16 like the base
    grad_out = torch.randn(3, 5, 24)
    out = lora.delta(x)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out)
    ours = (x.grad.clone(), lora.lora_a.grad.clone(), lora.lora_b.grad.clone())

    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = lora.lora_a.detach().clone().requires_grad_(True)
    b_ref = lora.lora_b.detach().clone().requires_grad_(True)
    ref = (x_ref @ a_ref.to(torch.bfloat16).T) @ b_ref.to(torch.bfloat16).T * lora.scaling
    torch.testing.assert_close(out, ref)
    ref.backward(grad_out.to(torch.bfloat16))
    for got, expected in zip(ours, (x_ref.grad, a_ref.grad, b_ref.grad)):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_lora_under_bf16_autocast_follows_the_activation_dtype():
    """Under bf16 autocast (the RL trainer's forward on CUDA) autocast does not pick the dtype: fp32
    activations are computed in fp32, bf16 ones in bf16, and backward (outside autocast) gets
    matching dtypes: it raised "expected mat1 and mat2 to have the same dtype" before."""
    torch.manual_seed(0)
    lora = TrainableLoRALinear(32, 24, rank=4, alpha=8)
    randomize(lora.parameters(), seed=9, std=0.2)
    for dtype in (torch.float32, torch.bfloat16):
        lora.zero_grad()
        x = torch.randn(3, 5, 32).to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lora.delta(x)
        assert out.dtype == dtype
        expected = (x.detach() @ lora.lora_a.to(dtype).T) @ lora.lora_b.to(dtype).T * lora.scaling
        torch.testing.assert_close(out, expected)
        out.backward(torch.randn(3, 5, 24).to(dtype))
        assert lora.lora_a.grad.dtype == lora.lora_b.grad.dtype == torch.float32 and x.grad.dtype == dtype


def test_init_scaling_and_disabled():
    lora = TrainableLoRALinear(64, 32, rank=4, alpha=8)
    assert torch.count_nonzero(lora.lora_b) == 0  # a fresh adapter is the identity
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert lora.lora_a.abs().max() <= bound and lora.lora_a.std() > bound / 4
    assert lora.scaling == 2.0
    assert TrainableLoRALinear(64, 32, rank=4, alpha=8, use_rslora=True).scaling == 4.0
    randomize(lora.parameters(), seed=2)
    x, base_output = torch.randn(3, 64), torch.randn(3, 32)
    assert not torch.equal(lora(x, base_output), base_output)
    lora.disabled = True
    assert lora(x, base_output) is base_output


def test_merge_unmerge_round_trip():
    base = nn.Linear(16, 8, bias=False)
    original = base.weight.detach().clone()
    wrapped = LoRAWrappedLinear(base, TrainableLoRALinear(16, 8, rank=4, alpha=8))
    randomize(wrapped.lora.parameters(), seed=3, std=0.3)
    x = torch.randn(5, 16)
    unmerged = wrapped(x)
    wrapped.merge()
    torch.testing.assert_close(wrapped(x), unmerged, atol=1e-6, rtol=1e-5)
    wrapped.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-7, rtol=0)


# ---- fused layers (vLLM's qkv_proj / gate_up_proj) ---------------------------------------------------
class FusedQKV(nn.Module):
    """A stand-in with the attributes and output of vLLM's QKVParallelLinear (tp=1, float64 capable)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_size: int):
        super().__init__()
        self.input_size, self.total_num_heads, self.total_num_kv_heads = hidden, heads, kv_heads
        self.head_size, self.tp_size = head_size, 1
        self.linear = nn.Linear(hidden, (heads + 2 * kv_heads) * head_size, bias=False)

    def forward(self, x):
        return self.linear(x), None  # vLLM returns (output, output_bias)


def test_gradcheck_injected_fused_layer_matches_unfused_reference():
    torch.manual_seed(0)
    hidden, heads, kv_heads, head_size = 8, 2, 1, 3
    fused = nn.Module()
    fused.qkv_proj = FusedQKV(hidden, heads, kv_heads, head_size).double()
    injector = LoRAInjector(LoRATrainConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    injector.inject(fused)
    assert isinstance(fused.qkv_proj, FusedLoRALinear)
    assert sorted(injector.lora_layers) == ["q_proj", "v_proj"]  # k is not targeted: no trainable LoRA
    assert not fused.qkv_proj.loras["k_proj"].lora_a.requires_grad
    for lora in injector.lora_layers.values():
        lora.double()
    randomize(injector.get_trainable_params(), seed=4, std=0.5)

    x = torch.randn(3, hidden, dtype=torch.float64, requires_grad=True)
    params = injector.get_trainable_params()
    assert torch.autograd.gradcheck(lambda x, *ps: fused.qkv_proj(x)[0], (x, *params))

    # Oracle: separate q/k/v linears (rows of the fused weight), each with its own LoRA.
    weight = fused.qkv_proj.base_layer.linear.weight.detach()  # (q + k + v, hidden)
    q, k, v = torch.split(weight, [heads * head_size, kv_heads * head_size, kv_heads * head_size])
    expected = torch.cat([
        x @ q.T + injector.lora_layers["q_proj"].delta(x),
        x @ k.T,
        x @ v.T + injector.lora_layers["v_proj"].delta(x),
    ], dim=-1)
    output, bias = fused.qkv_proj(x)
    assert bias is None
    torch.testing.assert_close(output, expected)


def test_fused_output_sizes_match_live_vllm_modules(engine):
    """Our per-projection sizes of vLLM's fused layers equal the slices vLLM's own LoRA layers use."""

    def sizes(model):
        found = {}
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("qkv_proj", "gate_up_proj") and hasattr(module, "base_layer"):
                found[name] = (fused_output_sizes(module.base_layer, leaf), list(module.output_slices))
        return found

    found = engine.llm.apply_model(sizes)[0]
    assert len(found) == 8  # 4 layers x (qkv_proj, gate_up_proj)
    for name, (ours, vllms) in found.items():
        assert ours == vllms, name
    assert found["model.layers.0.self_attn.qkv_proj"][0] == [128, 64, 64]  # 2 q heads, 1 kv head, 64 dims
    assert found["model.layers.0.mlp.gate_up_proj"][0] == [384, 384]


# ---- PEFT as the oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_injected_model_matches_peft_logits(tiny_model, use_rslora):
    config = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES), use_rslora=use_rslora)
    peft_model = peft_model_of(tiny_model, config)
    ours, injector = our_model_of(tiny_model, config)
    state = peft_names_to_ours(peft_model)
    assert set(state) == set(injector.peft_state_dict())  # same key names as PEFT's files
    with torch.no_grad():
        for name, lora in injector.lora_layers.items():
            lora.lora_a.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            lora.lora_b.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    expected, got = logits_of(peft_model), logits_of(ours)
    # fp32 rounding order only (our layer adds B's product into the base output inside one addmm; four
    # layers on, logits of up to ~25 differ by ~3e-5); a wrong adapter is off by > 1e-2.
    assert (got - expected).abs().max().item() <= 1e-4
    assert (expected - logits_of(load_base(tiny_model))).abs().max() > 1e-2  # the adapter does matter


def test_disabled_adapter_gives_base_logits_exactly(tiny_model):
    config = LoRATrainConfig(rank=8, target_modules=list(ALL_LINEAR_MODULES))
    ours, injector = our_model_of(tiny_model, config)
    randomize(injector.get_trainable_params(), seed=5)
    base = logits_of(load_base(tiny_model))
    adapted = logits_of(ours)
    with injector.disable_adapter():
        disabled = logits_of(ours)
    assert torch.equal(disabled, base)
    assert torch.equal(logits_of(ours), adapted)  # enabled again on exit


def test_trainable_params_are_only_lora(tiny_model):
    ours, injector = our_model_of(tiny_model, LoRATrainConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in injector.get_trainable_params()}
    assert len(trainable) == 4 * 2 * 2  # 4 layers x (q, v) x (A, B)


def test_our_save_loads_in_peft(tiny_model, tmp_path):
    from peft import PeftModel

    config = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES))
    ours, injector = our_model_of(tiny_model, config)
    randomize(injector.get_trainable_params(), seed=6)
    injector.save(tmp_path / "adapter", tiny_model)
    peft_model = PeftModel.from_pretrained(load_base(tiny_model), tmp_path / "adapter").eval()
    assert (logits_of(peft_model) - logits_of(ours)).abs().max().item() <= 1e-5


def test_peft_save_loads_in_ours(tiny_model, tmp_path):
    config = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES))
    peft_model = peft_model_of(tiny_model, config, seed=7)
    peft_model.save_pretrained(tmp_path / "peft")
    ours, injector = our_model_of(tiny_model, config)
    injector.load(tmp_path / "peft")
    assert (logits_of(ours) - logits_of(peft_model)).abs().max().item() <= 1e-5


def test_our_save_gives_vllm_our_logprobs(tiny_model, engine, tmp_path):
    from vllm_train.evaluation import completion_logprobs

    config = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES))
    ours, injector = our_model_of(tiny_model, config)
    randomize(injector.get_trainable_params(), seed=8)
    ref = engine.load_adapter(injector.save(tmp_path / "adapter", tiny_model), family="test-lora-roundtrip")
    try:
        prompt_ids, completion_ids = [5, 17, 42, 99, 3, 250, 7], [64, 128, 11, 9, 8, 200, 31, 4]
        served = engine.completion_logprobs(prompt_ids, completion_ids, ref)
        base_model = load_base(tiny_model)
        assert_served_logprobs(served, reference_logprobs(ours, prompt_ids, completion_ids),
                               alternative=reference_logprobs(base_model, prompt_ids, completion_ids))
        expected = completion_logprobs(ours, prompt_ids, completion_ids)  # fp32, CPU: the adapter matters
        assert (expected - completion_logprobs(base_model, prompt_ids, completion_ids)).abs().max().item() > 1e-2
    finally:
        engine.remove_adapter(ref)


def test_sync_states_are_the_live_parameters_rebuilt_only_when_storage_changes(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    injector = LoRAInjector(LoRATrainConfig(rank=4, target_modules=list(ALL_LINEAR_MODULES)))
    injector.inject(model)
    state, shards = injector.sync_states()
    assert shards is None and state.keys() == injector.peft_state_dict().keys()
    optimizer = torch.optim.SGD(injector.get_trainable_params(), lr=1.0)
    for p in injector.get_trainable_params():
        p.grad = torch.ones_like(p)
    optimizer.step()  # in place: the same views now hold the new values
    again, _ = injector.sync_states()
    assert again is state
    for key, value in injector.peft_state_dict().items():
        assert torch.equal(again[key], value)
    model.double()  # new storage: the views are built anew, on it
    recast, _ = injector.sync_states()
    assert recast is not state and all(t.dtype == torch.float64 for t in recast.values())
    for key, value in injector.peft_state_dict().items():
        assert torch.equal(recast[key].float(), value)
