"""The KV cache the RL trainer asks vLLM for on CUDA (engine/kv_budget.py), against hand-worked sizes."""

from __future__ import annotations

import os

import pytest
from transformers import LlamaConfig, Qwen2Config

from vllm_train.config import LoRATrainConfig, RLHFConfig
from vllm_train.engine import kv_budget, llm
from vllm_train.engine.llm import EngineOptions
from vllm_train.trainers import rl_rollouts


@pytest.fixture
def qwen_32b_shape(tmp_path):
    """Qwen2.5-32B's attention shape (64 layers, 8 KV heads of 128), config only: no weights are needed."""
    Qwen2Config(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064, max_position_embeddings=2048).save_pretrained(tmp_path)
    return str(tmp_path)


def test_bytes_per_token_counts_k_and_v_of_every_layer(qwen_32b_shape, tmp_path):
    # 2 (K, V) x 64 layers x 8 heads x 128 dims x 2 bytes = 262144 bytes = 256 KiB per token
    assert kv_budget.kv_bytes_per_token(qwen_32b_shape) == 262144
    assert kv_budget.kv_bytes_per_token(qwen_32b_shape, dtype_bytes=4) == 524288
    # tensor parallel: 8 KV heads over 2 GPUs = 4 per GPU; over 16 GPUs vLLM replicates: 1 per GPU
    assert kv_budget.kv_bytes_per_token(qwen_32b_shape, tensor_parallel_size=2) == 131072
    assert kv_budget.kv_bytes_per_token(qwen_32b_shape, tensor_parallel_size=16) == 262144 // 8
    # no num_key_value_heads / head_dim: every head has K and V of hidden / heads dims
    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=None,
                head_dim=None, intermediate_size=512).save_pretrained(llama)
    assert kv_budget.kv_bytes_per_token(str(llama)) == 2 * 3 * 4 * 64 * 2


def test_rollout_budget_holds_prompts_once_and_each_samples_tokens(qwen_32b_shape):
    # 8 prompts x 1024 + 8 x 8 samples x 128 new tokens = 16384 tokens, x 1.25 = 20480 tokens x 256 KiB = 5 GiB
    assert kv_budget.rollout_kv_cache_gib(qwen_32b_shape, 8, 8, 128) == pytest.approx(5.0)
    # a batch smaller than one sequence of the maximum length (2048) still gets one: vLLM refuses less
    assert kv_budget.rollout_kv_cache_gib(qwen_32b_shape, 1, 1, 1) == pytest.approx(0.5)
    assert kv_budget.rollout_kv_cache_gib(qwen_32b_shape, 1, 1, 1, max_model_len=8192) == pytest.approx(2.0)


def test_rl_engine_sizes_its_kv_cache_on_cuda_only(qwen_32b_shape, monkeypatch):
    config = RLHFConfig(lora_config=LoRATrainConfig(), rollout_batch_size=8, group_size=8, max_new_tokens=128)
    assert rl_rollouts.rollout_engine_options(config, None, qwen_32b_shape).kv_cache_gib is None  # CPU: 0.5 GiB
    monkeypatch.setattr(rl_rollouts, "on_cuda", lambda: True)
    monkeypatch.setattr(llm, "on_cuda", lambda: True)  # serving dtype bf16: 2 bytes per K/V value
    assert rl_rollouts.rollout_engine_options(config, None, qwen_32b_shape).kv_cache_gib == pytest.approx(5.0)
    # two data-parallel ranks: each samples 4 of the 8 prompts (4 x 1024 + 4 x 8 x 128) x 1.25 x 256 KiB
    monkeypatch.setattr(rl_rollouts.distributed, "world_size", lambda: 2)
    assert rl_rollouts.rollout_engine_options(config, None, qwen_32b_shape).kv_cache_gib == pytest.approx(2.5)
    given = EngineOptions(gpu_memory_utilization=0.5)  # options the caller gives are taken as they are
    assert rl_rollouts.rollout_engine_options(config, given, qwen_32b_shape) is given


def test_fixed_kv_size_asks_vllm_only_for_the_memory_free_at_startup(qwen_32b_shape, monkeypatch):
    gib = 1 << 30
    # the H200 of the 7B run: a 7B training copy left 124.88 of 139.8 GiB free, vLLM's 0.92 wanted 128.62;
    # less 2 GiB of headroom for vLLM's own processes: 122.88 / 139.8 = 0.87897 -> 0.878
    assert kv_budget.startup_memory_share(int(124.88 * gib), int(139.8 * gib)) == 0.878
    assert kv_budget.startup_memory_share(int(139.0 * gib), int(139.8 * gib)) == 0.92  # never above vLLM's own
    assert kv_budget.startup_memory_share(0, int(139.8 * gib)) == 0.001

    # what VLLMEngine._build hands vLLM on a (pretended) GPU: the fixed KV size and the free share
    built = {}

    class RecordingLLM:
        def __init__(self, **kwargs):
            built.update(kwargs)

    import vllm

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    monkeypatch.setattr(llm, "on_cuda", lambda: True)
    monkeypatch.setattr(llm.torch.cuda, "mem_get_info", lambda: (int(124.88 * gib), int(139.8 * gib)))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # _build sets vLLM's process variables
    engine = object.__new__(llm.VLLMEngine)  # _build alone: no tokenizer, no adapters
    engine.model_path, engine.options = qwen_32b_shape, EngineOptions(kv_cache_gib=5.0)
    engine._build()
    assert built["kv_cache_memory_bytes"] == 5 * gib and built["gpu_memory_utilization"] == 0.878
    built.clear()
    engine.options = EngineOptions(gpu_memory_utilization=0.3)
    engine._build()
    assert built["gpu_memory_utilization"] == 0.3 and "kv_cache_memory_bytes" not in built
