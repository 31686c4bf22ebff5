"""A model directory checked up front, before any model or engine loads it (`check_model_dir`).

Every command that takes --model runs it once (`commands._common.resolve_model_args`, `serve`). Without it a
broken directory fails deep inside transformers or a vLLM engine process, after minutes, as a traceback (a
config that does not describe the weights, no weights, a value like ``num_hidden_layers: "four"``, an unknown
``model_type``, a corrupt ``tokenizer.json``, a tokenizer that needs a missing library, a chat template that
does not parse or raises). Here each is one line naming the file, through `loading.library_errors`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vllm_train.errors import VllmTrainError
from vllm_train.files import parse_json, read_text
from vllm_train.loading import library_errors

# JSON files of a model directory that its loaders parse (a malformed one is named with its line)
JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "model.safetensors.index.json")
# config.json sizes that must be positive integers (in the config, or in its text_config)
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "head_dim", "max_position_embeddings")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def check_model_dir(path: str | Path, chat_template: Path | None = None) -> None:
    """One line for the first problem of the model directory `path`; `chat_template`: the --chat-template
    file that will render its chats (else the tokenizer's own template, if any)."""
    path = Path(path)
    parsed = {name: parse_json(read_text(path / name), str(path / name)) for name in JSON_FILES
              if (path / name).exists()}
    config = parsed.get("config.json")
    if not isinstance(config, dict):
        raise VllmTrainError(f"{path}: not a model directory (no config.json holding a mapping)")
    _check_config_values(config, path / "config.json")
    weights = _weight_files(path, parsed.get("model.safetensors.index.json"))
    _check_shapes(path, weights)
    _check_tokenizer(path, chat_template)


def _check_config_values(config: dict, where: Path) -> None:
    from transformers import CONFIG_MAPPING

    for values in (config, config.get("text_config")):
        for name in SIZE_FIELDS:
            value = values.get(name) if isinstance(values, dict) else None
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise VllmTrainError(f"{where}: field '{name}' is {value!r}, expected an integer >= 1")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise VllmTrainError(f"{where}: model_type {model_type!r} is not a model transformers knows (custom "
                             f"modelling code is not run)")


def _weight_files(path: Path, index: dict | None) -> list[Path]:
    """The weight files a load reads: an index's shards (each must exist), else those in the directory."""
    if index is not None:
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        missing = [s for s in shards if not (path / s).is_file()]
        if not shards or missing:
            raise VllmTrainError(f"{path / 'model.safetensors.index.json'}: shard "
                                 f"{missing[0] if missing else '(none listed)'} is missing")
        return [path / s for s in shards]
    found = sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)})
    if not found:
        raise VllmTrainError(f"{path}: no weight files (model.safetensors, or pytorch_model.bin)")
    return found


def _check_shapes(path: Path, weights: list[Path]) -> None:
    """Each safetensors tensor's shape against the model config.json describes (built on the meta device:
    no memory); only names both hold are compared (tied or extra heads are the loader's business)."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in meta_model(path).state_dict().items()}
    for file in (f for f in weights if f.suffix == ".safetensors"):
        with library_errors(file), safe_open(str(file), "pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key in expected and expected[key] != shape:
                    raise VllmTrainError(f"{file}: tensor '{key}' is {shape}, but {path / 'config.json'} describes "
                                         f"{expected[key]}: the config is not these weights'")


def meta_model(path: str | Path):
    """The causal LM that `path`'s config.json describes, on the meta device: its modules and shapes, no
    memory and no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with library_errors(Path(path) / "config.json"):
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)


def _check_tokenizer(path: Path, chat_template: Path | None) -> None:
    """The tokenizer loads, and the chat template that will render chats parses and renders a short chat."""
    from transformers import AutoTokenizer

    with library_errors(f"{path}: tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer("1 + 1?")["input_ids"]:  # transformers makes an empty tokenizer when its files are missing
            raise VllmTrainError(f"{path}: the tokenizer has no vocabulary (tokenizer.json or tokenizer.model "
                                 f"missing?): it turns text into no tokens")
    template = read_text(chat_template) if chat_template else getattr(tokenizer, "chat_template", None)
    if not template:
        return
    where = chat_template or next(
        (path / n for n in ("chat_template.jinja", "tokenizer_config.json") if (path / n).is_file()), path)
    chat = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    with library_errors(where):
        tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False)
        tokenizer.apply_chat_template(chat[:1], chat_template=template, tokenize=False, add_generation_prompt=True)


# ---- what the safetensors headers say (nothing loaded): every command, through models.resolve_model ----
def check_safetensors(path: Path) -> dict[str, dict]:
    """The file's header parses and the file holds every byte the header promises: a truncated or
    overwritten weights file fails here with one line, not deep inside a loader. Returns the header's
    tensors (name -> {"dtype", "shape", "data_offsets"})."""
    size = path.stat().st_size
    problem, tensors = None, {}
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_len <= size - 8:
            problem = "no valid header"
        else:
            try:
                tensors = {k: t for k, t in json.loads(f.read(header_len)).items() if k != "__metadata__"}
                end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
                if 8 + header_len + end > size:
                    problem = f"{size} bytes, the header describes {8 + header_len + end}"
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                problem = "unreadable header"
    if problem:
        raise VllmTrainError(f"{path}: truncated or corrupt safetensors weights ({problem})")
    return tensors


INTEGER_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")  # safetensors' names
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# An output head by the names models give it (a sequence classifier's, as `vllm-train rm` saves, included).
OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight", "output_layer.weight", "score.weight")


def check_weights_match_config(config_path: Path, config: dict, tensors: dict[str, tuple[dict, Path]]) -> None:
    """Refuse, in one line naming the file and the field, a model directory whose safetensors weights (their
    headers: nothing is loaded) cannot be what its config.json describes: integer weights without a
    quantization_config, another number of layers, attention projections or embeddings of other sizes, no
    output head although tie_word_embeddings is false. A loader would train or serve such a model anyway,
    on random or garbage weights. Multimodal configs (text_config) are checked for dtypes only."""
    if not tensors:
        return  # .bin weights, or a hub id whose files are not here yet: the loader checks those
    if "quantization_config" not in config:
        for name, (info, file) in tensors.items():
            if info.get("dtype") in INTEGER_DTYPES and name.endswith((".weight", ".bias")):
                raise VllmTrainError(f"{file}: tensor {name} is {info['dtype']} (integers), but {config_path} "
                                     f"describes a floating-point model (no quantization_config)")
    if "text_config" in config:
        return
    _check_header_layers(config_path, config, {name for name in tensors})
    _check_header_shapes(config_path, config, tensors)
    if config.get("tie_word_embeddings") is False and not any(name.endswith(OUTPUT_HEADS) for name in tensors):
        raise VllmTrainError(f"{config_path}: tie_word_embeddings is false, but the weights hold no output head "
                             f"(lm_head.weight): the model would answer with a random one")


def _check_header_layers(config_path: Path, config: dict, names: set[str]) -> None:
    layers = config.get("num_hidden_layers")
    found = {int(m.group(1)) for name in names if (m := LAYER_RE.search(name))}
    if not isinstance(layers, int) or not found:
        return
    extra = config.get("num_nextn_predict_layers") or 0  # DeepSeek's multi-token-prediction layers follow
    missing = sorted(set(range(layers)) - found)
    if missing or max(found) + 1 not in (layers, layers + extra):
        raise VllmTrainError(f"{config_path}: num_hidden_layers is {layers}, but the weights hold layers "
                             f"{min(found)}..{max(found)}" + (f" without {missing[0]}" if missing else ""))


def _check_header_shapes(config_path: Path, config: dict, tensors: dict[str, tuple[dict, Path]]) -> None:
    """Embeddings against hidden_size; q_proj / k_proj against num_attention_heads / num_key_value_heads x
    head_dim (not for latent attention, whose projections are shaped otherwise)."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not (isinstance(hidden, int) and isinstance(heads, int)) or "kv_lora_rank" in config:
        return
    head_dim = config.get("head_dim") or hidden // heads
    expected = {"embed_tokens.weight": (None, hidden, "vocabulary, hidden_size"),
                "self_attn.q_proj.weight": (heads * head_dim, hidden, "num_attention_heads x head_dim, hidden_size"),
                "self_attn.k_proj.weight": (config.get("num_key_value_heads", heads) * head_dim, hidden,
                                            "num_key_value_heads x head_dim, hidden_size")}
    for name, (info, file) in tensors.items():
        suffix = next((s for s in expected if name.endswith(s)), None)
        if suffix is None:
            continue
        rows, cols, field = expected[suffix]
        shape = info.get("shape") or []
        if len(shape) == 2 and (shape[1] != cols or rows not in (None, shape[0])):
            want = f"({rows}, {cols})" if rows else f"(vocabulary, {cols})"
            raise VllmTrainError(f"{file}: tensor {name} has shape {tuple(shape)}, but {config_path} says {want} "
                                 f"({field})")
