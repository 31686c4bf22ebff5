"""How much KV cache an engine needs for a batch of sequences, so that on the GPU vLLM takes that much and
no more (``EngineOptions.kv_cache_gib``), instead of a share of the GPU that the trainer then lacks.

vLLM's default sizing takes ``gpu_memory_utilization`` of the GPU and gives everything its weights and
activations leave to the KV cache: 0.3 of an H200 is ~40 GiB, of which a 0.5B model's RL batch of
128 sequences x 300 tokens uses under 1 GiB, and a 32B model's weights alone do not fit in it. A batch
that needs more than the budget is still served correctly: vLLM queues or preempts the excess sequences
(slower, never wrong), so the estimate may be rough.
"""

from __future__ import annotations

import functools

from transformers import AutoConfig

GIB = 1 << 30
PROMPT_TOKENS_ALLOWANCE = 1024  # per prompt: the RL trainer does not bound prompt lengths
STARTUP_HEADROOM_GIB = 2
MARGIN = 1.25  # block rounding (16-token blocks), partly filled blocks, prompts longer than the allowance


@functools.lru_cache(maxsize=8)
def _text_config(model_path: str):
    """The model's (text) config, read once: the RL trainer sizes its engine's options more than once."""
    return AutoConfig.from_pretrained(model_path).get_text_config()


def kv_bytes_per_token(model_path: str, dtype_bytes: int = 2, tensor_parallel_size: int = 1) -> int:
    """Bytes of K and V one token takes on one GPU, over all layers of the model at `model_path` (full
    attention assumed on every layer: sliding-window layers take less, so this is an upper bound). Under
    tensor parallelism each GPU holds its share of the KV heads, at least one (vLLM replicates the heads
    when there are fewer than GPUs)."""
    config = _text_config(model_path)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * max(1, kv_heads // tensor_parallel_size) * head_dim * dtype_bytes


def max_sequence_tokens(model_path: str, max_model_len: int | None = None) -> int:
    """The longest sequence the engine accepts: vLLM refuses to start unless one fits in its KV cache."""
    if max_model_len:
        return max_model_len
    config = _text_config(model_path)
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def rollout_kv_cache_gib(model_path: str, prompts: int, group_size: int, max_new_tokens: int,
                         dtype_bytes: int = 2, max_model_len: int | None = None,
                         tensor_parallel_size: int = 1) -> float:
    """GiB of KV cache per GPU for one RL rollout: each prompt's blocks once (vLLM's prefix caching shares
    them across its group), each sample's new tokens, with a margin; at least one sequence of the engine's
    maximum length."""
    tokens = prompts * PROMPT_TOKENS_ALLOWANCE + prompts * group_size * max_new_tokens
    tokens = max(int(tokens * MARGIN), max_sequence_tokens(model_path, max_model_len))
    return tokens * kv_bytes_per_token(model_path, dtype_bytes, tensor_parallel_size) / GIB


def startup_memory_share(free_bytes: int, total_bytes: int, vllm_default: float = 0.92) -> float:
    """The `gpu_memory_utilization` to give vLLM next to a fixed KV size (`kv_cache_memory_bytes`).

    With a fixed KV size vLLM skips its memory profiling and the share sizes nothing, but it still refuses to
    start unless that share of the GPU is free at startup. Its default (0.92) is not free once a training
    copy of the base sits on the GPU (a 7B base in bf16 leaves 124.9 of 139.8 GiB): ask for what is free
    now less STARTUP_HEADROOM_GIB (what vLLM's own processes take before it looks: a CUDA context each,
    NCCL buffers), rounded down to 1/1000, and let the weights and the KV cache fail on their own if they
    do not fit.
    """
    share = (free_bytes - STARTUP_HEADROOM_GIB * GIB) / total_bytes
    return max(0.001, min(vllm_default, int(1000 * share) / 1000))
