"""The shipped tiny-llama-2kv: tiny-llama with its KV head repeated into two, so README's tensor-parallel
command runs on a laptop. Oracle: tiny-llama itself (with its weights rounded to bf16, as shipped here)."""

from __future__ import annotations

import torch

from vllm_train.assets import TINY_MODEL, TINY_TP_MODEL


def test_two_kv_heads_and_the_same_function_as_tiny_llama(tokenizer):
    from transformers import AutoModelForCausalLM

    from vllm_train.model_dir import check_model_dir

    check_model_dir(TINY_TP_MODEL)
    assert (TINY_TP_MODEL / "model.safetensors").stat().st_size < 2 * 2**20
    two_kv = AutoModelForCausalLM.from_pretrained(TINY_TP_MODEL, dtype=torch.float32)
    assert two_kv.config.num_key_value_heads == two_kv.config.num_attention_heads == 2
    one_kv = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    one_kv.to(torch.bfloat16).to(torch.float32)  # the shipped copy's weights are bf16
    chat = [{"role": "user", "content": "What is 47 + 38?"}, {"role": "assistant", "content": "85"}]
    ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(chat, tokenize=False))["input_ids"]])
    with torch.no_grad():
        diff = (two_kv(ids).logits - one_kv(ids).logits).abs().max().item()
    assert diff < 2e-2, diff  # logits of magnitude ~30; attention with 2 KV heads sums in another order
