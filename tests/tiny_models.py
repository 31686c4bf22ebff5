"""Tiny random-init models built by tests (nothing is downloaded): the shipped tokenizer, real configs."""

from __future__ import annotations

from pathlib import Path


def build_flat_llama(out: Path, initializer_range: float = 1e-4) -> Path:
    """A 2-layer random-init Llama whose weights are so small that every next-token distribution is
    (nearly) uniform over the vocabulary: the model on which shared sampling noise shows most."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_train.assets import TINY_MODEL
    from vllm_train.models import load_tokenizer

    tok = load_tokenizer(str(TINY_MODEL))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      initializer_range=initializer_range, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tp_llama(out: Path) -> Path:
    """A 2-layer random-init Llama whose heads (2 query, 2 key/value) and MLP split over 2 tensor-parallel
    ranks, with the shipped tokenizer (vLLM's head_dim 64)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_train.assets import TINY_MODEL
    from vllm_train.models import load_tokenizer

    tok = load_tokenizer(str(TINY_MODEL))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("chat_template.jinja",):
        if (TINY_MODEL / name).exists():
            (out / name).write_text((TINY_MODEL / name).read_text())
    return out
