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


# ---- the architecture matrix (tests/test_model_families.py) ---------------------------------------
def _family_config(family: str, vocab: int, eos: int, pad: int, **overrides):
    """The real transformers config of `family`, tiny (2 layers, hidden 128, head_dim 64), keeping what
    sets the family apart: tied embeddings, biases, q/k norm, soft-capping, sliding windows, scaled
    embeddings, HF-fused projections, experts. `overrides`: config fields that replace the tiny ones
    (benchmarks/family_matrix.py gives each family its real size this way)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                  eos_token_id=eos, pad_token_id=pad, bos_token_id=None)

    def make(config_class, **specific):
        return config_class(**{**common, **specific, **overrides})

    if family == "llama3":  # Llama 3.2: llama3 rope scaling, tied embeddings
        return make(tf.LlamaConfig, head_dim=64, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    if family == "qwen2.5":  # q/k/v biases, tied embeddings
        return make(tf.Qwen2Config, tie_word_embeddings=True, use_sliding_window=False)
    if family == "qwen3":  # q/k RMSNorm, explicit head_dim, tied embeddings
        return make(tf.Qwen3Config, head_dim=64, tie_word_embeddings=True, use_sliding_window=False)
    if family == "mistral":  # sliding-window attention (window shorter than the test's sequences)
        return make(tf.MistralConfig, head_dim=64, sliding_window=8, tie_word_embeddings=False)
    if family == "phi3":  # HF-side fused qkv_proj and gate_up_proj
        return make(tf.Phi3Config, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "gemma2":  # attention and final-logit soft-capping, alternating sliding window, scaled embeddings
        return make(tf.Gemma2Config, head_dim=64, query_pre_attn_scalar=64, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    if family == "gemma3":  # text-only Gemma 3: q/k norm, local/global rope, sliding window, scaled embeddings
        cfg = make(tf.Gemma3TextConfig, head_dim=64, query_pre_attn_scalar=64, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
        cfg.architectures = ["Gemma3ForCausalLM"]
        return cfg
    if family == "qwen3-moe":  # 4 experts, top-2, q/k norm
        return make(tf.Qwen3MoeConfig, head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                    decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False)
    raise ValueError(f"unknown family {family}")


MATRIX_FAMILIES = ("llama3", "qwen2.5", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "qwen3-moe")


def build_family(family: str, out: Path, overrides: dict | None = None, dtype: str = "float32",
                 device: str = "cpu") -> Path:
    """A random-init model of `family` (one of MATRIX_FAMILIES) with the shipped tokenizer and chat
    template, saved in `dtype`: 2 layers, or the size `overrides` give (see `_family_config`). `device`:
    where the weights are initialised (on a GPU a multi-billion-parameter init takes seconds, not minutes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_train.assets import TINY_MODEL
    from vllm_train.models import load_tokenizer

    tok = load_tokenizer(str(TINY_MODEL))
    torch.manual_seed(0)
    cfg = _family_config(family, len(tok), tok.eos_token_id, tok.pad_token_id, **(overrides or {}))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text((TINY_MODEL / "chat_template.jinja").read_text())
    return out
