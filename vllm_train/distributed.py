"""Runs under torchrun: the process group, the data-parallel and tensor-parallel groups, each rank's
share of a batch, gradient and metric reductions, and which rank writes.

``torchrun --nproc-per-node N -m vllm_train sft ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; `init` then
joins the group (nccl on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU). A plain process is a
world of one, and every function here is then a no-op: single-process runs behave exactly as before.

Data parallelism is an explicit all-reduce of the LoRA gradients after each accumulation group, not
DDP: the base is frozen, the trainable tensors are a few megabytes, and one flat all-reduce per
optimizer step (instead of DDP's per-bucket hooks during backward) keeps accumulation, the loss
normalisation by the *global* token count and the reward-head/value-head parameters in plain code.
The cost is that the reduction does not overlap the backward: for LoRA it is one small message.

Tensor parallel (``tensor_parallel_size`` K > 1): the ranks form a (world/K) x K mesh; each row of K
consecutive ranks is one tensor-parallel group (its model linears sharded, `lora.tensor_parallel`, and
one vLLM engine spanning it) and sees the same data. Batch shares, gradient and metric reductions then
run over the data-parallel group (the ranks with the same position in their TP group), never inside a
TP group, where every rank holds the same batch.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from vllm_train.errors import VllmTrainError

# How long a collective may wait for a rank that stopped answering before the run fails (instead of
# hanging): torchrun already ends the other ranks when one exits with an error; this bounds the rest.
TIMEOUT = timedelta(seconds=float(os.environ.get("VLLM_TRAIN_DIST_TIMEOUT", "1800")))

_data_parallel_group = None  # None: the whole world (no tensor parallelism)
_tensor_parallel_mesh = None


def record_error(line: str) -> None:
    """Under torchrun: this rank's one error line into the error file torchrun's agent reads
    (TORCHELASTIC_ERROR_FILE), so that its failure report names the cause instead of "To enable traceback
    see ...". torchrun still prints its own report; a rank cannot stop that."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,  # torchrun's layout
                                                                       "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass  # the line is on stderr already


def requested() -> bool:
    """True when this process is a torchrun rank (torchrun sets RANK and WORLD_SIZE), even a world of one:
    vLLM then has to join our process group instead of making its own -- its own, under torchrun's
    environment, hung for minutes at start on the H200 machine (``torchrun --nproc-per-node 1``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init() -> None:
    """Join the torchrun process group if this is a torchrun rank and the group is not up yet."""
    if not requested() or dist.is_initialized():
        return
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise VllmTrainError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {var} is not set: "
                                 f"launch with torchrun (torchrun --nproc-per-node N -m vllm_train ...)")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)


def tensor_parallel_mesh(tensor_parallel_size: int):
    """The 1-D device mesh of this rank's tensor-parallel group (None for K = 1); every rank must call
    it, with the same K. Also makes the data-parallel group the one the reductions below use."""
    global _data_parallel_group, _tensor_parallel_mesh
    if tensor_parallel_size == 1:
        return None
    if _tensor_parallel_mesh is not None and _tensor_parallel_mesh.size() == tensor_parallel_size:
        return _tensor_parallel_mesh
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % tensor_parallel_size:
        raise VllmTrainError(f"tensor_parallel_size: {tensor_parallel_size} does not divide the {world} rank(s) "
                             f"(launch with torchrun --nproc-per-node a multiple of it)")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu",
                            (world // tensor_parallel_size, tensor_parallel_size), mesh_dim_names=("dp", "tp"))
    _data_parallel_group, _tensor_parallel_mesh = mesh.get_group("dp"), mesh["tp"]
    return _tensor_parallel_mesh


def global_world_size() -> int:
    """All ranks of the launch (data- x tensor-parallel)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def world_size() -> int:
    """The data-parallel world: ranks that see different data (all ranks without tensor parallelism)."""
    return dist.get_world_size(_data_parallel_group) if dist.is_initialized() else 1


def rank() -> int:
    """This rank's index in the data-parallel world (shared by the ranks of one tensor-parallel group)."""
    return dist.get_rank(_data_parallel_group) if dist.is_initialized() else 0


def is_main() -> bool:
    """The rank that writes metrics, checkpoints, plots and the adapter, and shows progress bars."""
    return not dist.is_initialized() or dist.get_rank() == 0


def local_share(items: list, what: str = "batch") -> list:
    """This rank's contiguous share of a global batch (rank r takes the r-th of `world_size` equal parts)."""
    n, size = len(items), world_size()
    if size == 1:
        return items
    if n % size:
        raise VllmTrainError(f"{what} of {n} does not split evenly over {size} data-parallel ranks")
    per_rank = n // size
    return items[rank() * per_rank:(rank() + 1) * per_rank]


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_grads(params: list[torch.nn.Parameter], *extras: float) -> list[float]:
    """Sum the gradients of `params` over ranks (each rank's loss is already divided by the *global*
    normaliser) in one flat message; `extras` (floats such as the step's loss) travel in the same
    message and come back summed. A parameter without a gradient counts as zeros on that rank."""
    if world_size() == 1:
        return list(extras)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # a tensor-parallel parameter's gradient is a DTensor: reduce this rank's shard of it
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
    device = _reduce_device()
    flat = torch.cat([g.detach().reshape(-1).to(device, torch.float32) for g in grads]
                     + [torch.tensor(extras, dtype=torch.float32, device=device)])
    dist.all_reduce(flat, group=_data_parallel_group)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
    return flat[offset:].tolist()


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over ranks (keys must be the same, in the same order, on every rank)."""
    if world_size() == 1 or not values:
        return dict(values)
    flat = torch.tensor(list(values.values()), dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(flat, group=_data_parallel_group)
    return dict(zip(values, flat.tolist()))


def all_reduce_min(value: int) -> int:
    """The smallest of the ranks' values (a count they must agree on)."""
    if world_size() == 1:
        return value
    flat = torch.tensor([value], dtype=torch.int64, device=_reduce_device())
    dist.all_reduce(flat, op=dist.ReduceOp.MIN, group=_data_parallel_group)
    return int(flat.item())


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (for per-rank means over equal shares)."""
    summed = all_reduce_sum(values)
    return {k: v / world_size() for k, v in summed.items()}


def barrier() -> None:
    """Wait for every rank (of the whole world)."""
    if dist.is_initialized():
        dist.barrier()


def close() -> None:
    """Leave the torchrun process group (at the end of a command). A plain process keeps its group: it
    is the one an in-process vLLM engine made for itself."""
    global _data_parallel_group, _tensor_parallel_mesh
    if requested() and dist.is_initialized():
        dist.destroy_process_group()
    _data_parallel_group = _tensor_parallel_mesh = None
