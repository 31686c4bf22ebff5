"""Tensor-parallel LoRA training (`vllm_train.lora.tensor_parallel`) on 2 CPU ranks (gloo) against the
same model unsharded in this process: logits, LoRA gradients, one clipped AdamW step, the saved adapter
(and PEFT loading it), and loading a full adapter into the sharded model.

Two tiny random-init models: a Llama with attention and MLP biases and every linear LoRA-targeted (so
the row-parallel bias and all our parallel wrappers run), and a Qwen2 (q/k/v bias) with only q_proj and
v_proj targeted (the other linears go through torch's ColwiseParallel / RowwiseParallel)."""

from __future__ import annotations

import re
import types

import pytest
import torch
from distributed_harness import run_ranks

from vllm_train.config import LoRATrainConfig
from vllm_train.errors import VllmTrainError
from vllm_train.lora.injector import LoRAInjector
from vllm_train.lora.peft_io import ADAPTER_WEIGHTS
from vllm_train.lora.tensor_parallel import check_divisible

TP_SIZE = 2
TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10]])
MAX_GRAD_NORM = 0.05  # below the measured norm, so clipping scales the gradients
LR = 1e-2


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                       attention_bias=True, mlp_bias=True, initializer_range=0.1, tie_word_embeddings=False)


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       initializer_range=0.1, tie_word_embeddings=False)


CASES = {
    "llama": (llama_config, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "qwen2": (qwen2_config, ("q_proj", "v_proj")),
}


def lora_config(targets) -> LoRATrainConfig:
    return LoRATrainConfig(rank=4, alpha=8, target_modules=list(targets))


def load_model(model_dir, targets, adapter_dir=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    injector = LoRAInjector(lora_config(targets))
    injector.inject(model)
    if adapter_dir is not None:
        injector.load(adapter_dir)
    return model, injector


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def train_step(model, injector) -> dict:
    """Logits, the LoRA gradients, the clipped norm and the parameters after one AdamW step (full tensors)."""
    params = injector.get_trainable_params()
    optimizer = torch.optim.AdamW(params, lr=LR)
    out = model(input_ids=TOKENS, labels=TOKENS)
    out.loss.backward()
    grads = [full(p.grad) for p in params]
    norm = full(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
    optimizer.step()
    return {"logits": out.logits.detach(), "grads": grads, "norm": norm, "params": [full(p) for p in params]}


def tp_rank(rank: int, world_size: int, model_dir, targets, adapter_dir, out_dir) -> dict:
    """On each rank: the sharded model's step, its saved adapter, and its logits after re-loading the adapter."""
    from torch.distributed.device_mesh import DeviceMesh

    from vllm_train.lora.tensor_parallel import shard_tensor_parallel

    torch.manual_seed(rank)  # different LoRA A init per rank: the adapter load and rank 0's broadcast win
    model, injector = load_model(model_dir, targets, adapter_dir)
    shard_tensor_parallel(model, DeviceMesh("cpu", list(range(world_size))))
    with injector.disable_adapter():
        base_logits = logits_of(model)
    injector.save(out_dir / "tp_adapter")  # every rank calls (a gather); rank 0 writes
    result = train_step(model, injector)
    result["live_shapes"] = {k: tuple(v.shape) for k, v in injector.peft_state_dict(live=True).items()}
    injector.save(out_dir / "tp_adapter_trained")
    injector.load(adapter_dir)
    result["reloaded_logits"] = logits_of(model)
    result["base_logits"] = base_logits
    return result


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request, tmp_path_factory):
    """(reference: the unsharded run in this process, [rank 0's, rank 1's results], dirs) for one model."""
    from transformers import AutoModelForCausalLM

    make_config, targets = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config()).save_pretrained(root / "model")
    model, injector = load_model(root / "model", targets)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in injector.get_trainable_params():  # nonzero B: the LoRA changes the logits
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    injector.save(root / "adapter")
    reference = {"initial_logits": logits_of(model)}
    with injector.disable_adapter():
        reference["base_logits"] = logits_of(model)
    reference.update(train_step(model, injector))
    injector.save(root / "single_adapter_trained")
    reference["final_logits"] = logits_of(model)
    ranks = run_ranks(tp_rank, TP_SIZE, root / "model", targets, root / "adapter", root, timeout=180)
    return reference, ranks, root


def max_diff(a, b) -> float:
    if isinstance(a, list):
        return max(max_diff(x, y) for x, y in zip(a, b, strict=True))
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_logits_match_unsharded(runs):
    reference, ranks, _ = runs
    lora_effect = max_diff(reference["initial_logits"], reference["base_logits"])
    assert lora_effect > 1e-2  # the oracle can fail: a dropped or mis-sliced LoRA moves the logits this much
    for result in ranks:
        assert max_diff(result["logits"], reference["initial_logits"]) <= 1e-5
        assert max_diff(result["base_logits"], reference["base_logits"]) <= 1e-5  # disable_adapter


def test_lora_gradients_match_unsharded(runs):
    reference, ranks, _ = runs
    assert min(g.abs().max().item() for g in reference["grads"]) > 0
    for result in ranks:
        assert max_diff(result["grads"], reference["grads"]) <= 1e-5
        assert abs(result["norm"].item() - reference["norm"].item()) <= 1e-5  # clip_grad_norm_'s global norm
    assert reference["norm"].item() > MAX_GRAD_NORM  # so the step below ran on clipped gradients


def test_adamw_step_matches_unsharded(runs):
    reference, ranks, _ = runs
    for result in ranks:
        assert max_diff(result["params"], reference["params"]) <= 1e-5


def read_weights(adapter_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter_dir / ADAPTER_WEIGHTS)


def test_saved_adapter_is_the_single_rank_adapter(runs):
    """The TP save of the loaded weights is the 1-rank save they came from; after the step, the 1-rank
    run's save up to the step's fp32 noise."""
    reference, ranks, root = runs
    for tp_name, single_name, tolerance in [("tp_adapter", "adapter", 1e-6),
                                            ("tp_adapter_trained", "single_adapter_trained", 1e-5)]:
        tp, single = read_weights(root / tp_name), read_weights(root / single_name)
        assert list(tp) == list(single)
        assert {k: v.shape for k, v in tp.items()} == {k: v.shape for k, v in single.items()}
        assert max_diff([tp[k] for k in tp], [single[k] for k in tp]) <= tolerance
    for result in ranks:  # peft_state_dict(live=True) under TP: the full tensors too
        assert result["live_shapes"] == {k: tuple(v.shape) for k, v in single.items()}


def test_peft_loads_the_trained_tp_adapter(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference, _, root = runs
    base = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, root / "tp_adapter_trained").eval()
    assert max_diff(logits_of(peft_model), reference["final_logits"]) <= 1e-4


def test_loading_a_full_adapter_into_the_sharded_model(runs):
    reference, ranks, _ = runs
    assert max_diff(reference["final_logits"], reference["initial_logits"]) > 1e-3  # the step moved them
    for result in ranks:
        assert max_diff(result["reloaded_logits"], reference["initial_logits"]) <= 1e-5


@pytest.mark.parametrize("sizes,tp_size,field", [
    ((4, 2, 128), 3, "num_attention_heads (4)"),
    ((4, 2, 128), 4, "num_key_value_heads (2)"),
    ((4, 4, 90), 4, "intermediate_size (90)"),
])
def test_refuses_sizes_that_do_not_split(sizes, tp_size, field):
    heads, kv_heads, intermediate = sizes
    config = types.SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   intermediate_size=intermediate)
    with pytest.raises(VllmTrainError, match=re.escape(f"size {tp_size} does not divide the model's {field}")):
        check_divisible(types.SimpleNamespace(config=config), tp_size)


# ---- the spawn harness itself ------------------------------------------------------------------------
def failing_rank(rank: int, world_size: int, how: str) -> int:
    import os

    if rank == 1 and how == "raise":
        raise ValueError("rank one's own failure")
    if rank == 1 and how == "exit":
        os._exit(3)
    return rank


@pytest.mark.parametrize("how,expected", [("raise", "ValueError: rank one's own failure"),
                                          ("exit", "exited with code 3 without reporting")])
def test_harness_fails_with_the_child_traceback(how, expected):
    with pytest.raises(RuntimeError, match="rank 1 failed") as failure:
        run_ranks(failing_rank, 2, how, timeout=120)
    assert expected in str(failure.value)


def test_harness_returns_each_rank_value():
    assert run_ranks(failing_rank, 2, "succeed", timeout=120) == [0, 1]
