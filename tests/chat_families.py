"""Tokenizers dressed as model families' chat formats, built offline for the agent tests.

Nothing is downloaded: each family is the shipped toy byte-level BPE tokenizer plus that family's
special tokens (single ids, as in the real vocabularies) and a chat template in `tests/chat_templates/`.
The templates are our own, written here -- not copies of the published ones: each reproduces only its
family's token layout (special tokens, separators, where tool schemas, tool calls and tool results go,
Qwen3's reasoning blocks), which is what token-exactness depends on; the toy vocabulary only changes how
plain text splits.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"

# family -> (template file, special tokens, added non-special tokens, bos, eos, end-of-turn token)
FAMILIES: dict[str, tuple[str, list[str], list[str], str | None, str, str]] = {
    "toy": ("", [], [], None, "<|end|>", "<|end|>"),
    "qwen2.5": ("qwen2.5.jinja", ["<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>"],
                None, "<|im_end|>", "<|im_end|>"),
    "qwen3": ("qwen3.jinja", ["<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>", "<think>", "</think>"],
              None, "<|im_end|>", "<|im_end|>"),
    "llama3.1": ("llama3.1.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                    "<|eom_id|>", "<|python_tag|>"], [],
                 "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    # Gemma's tokenizer eos is <eos>; a turn ends with <end_of_turn> (generation_config's second eos id)
    "gemma2": ("gemma2.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], [], "<bos>", "<eos>",
               "<end_of_turn>"),
}


def family_tokenizer(family: str):
    """The toy tokenizer dressed as `family` ("toy": the shipped tokenizer and template as they are)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from vllm_train.assets import TINY_MODEL
    from vllm_train.models import load_tokenizer

    if family == "toy":
        return load_tokenizer(str(TINY_MODEL))
    template, special, added, bos, eos, _ = FAMILIES[family]
    backend = Tokenizer.from_file(str(TINY_MODEL / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<|pad|>")
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def end_of_turn_id(tokenizer, family: str) -> int:
    return tokenizer.convert_tokens_to_ids(FAMILIES[family][5])
