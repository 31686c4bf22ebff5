"""A model directory checked up front, before any model or engine loads it (`check_model_dir`).

Every command that takes --model runs it once (`commands._common.resolve_model_args`, `serve`). Without it a
broken directory fails deep inside transformers or a vLLM engine process, after minutes, as a traceback (a
config that does not describe the weights, no weights, a value like ``num_hidden_layers: "four"``, an unknown
``model_type``, a corrupt ``tokenizer.json``, a tokenizer that needs a missing library, a chat template that
does not parse or raises). Here each is one line naming the file, through `loading.library_errors`.
"""

from __future__ import annotations

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
