"""What each vLLM server replica gets beyond our own flags: the user's api_server arguments (checked against
the flags `replicas._replica_command` sets), its GPUs, and its CPU cores. Pure functions: no vLLM, no torch."""

from __future__ import annotations

from collections.abc import Sequence

from vllm_train.engine import gateway
from vllm_train.errors import VllmTrainError

# api_server flags that `_replica_command` sets itself -> the `vllm-train serve` option that sets them
# (None: fixed by vllm-train). Passing one again would silently override ours (vLLM's last value wins).
RESERVED_FLAGS: dict[str, str | None] = {
    "--model": "--model", "--served-model-name": "--served-model-name", "--host": "--host", "--port": "--port",
    "--max-lora-rank": "--max-lora-rank", "--max-loras": "--max-loras", "--max-cpu-loras": "--max-cpu-loras",
    "--dtype": "--dtype", "--tensor-parallel-size": "--tensor-parallel-size", "-tp": "--tensor-parallel-size",
    "--enforce-eager": "--enforce-eager / --no-enforce-eager", "--max-model-len": "--max-model-len",
    "--logprobs-mode": "--logprobs-mode", "--gpu-memory-utilization": "--gpu-memory-utilization",
    "--device-memory-utilization": "--gpu-memory-utilization", "--kv-cache-memory-bytes": "--kv-cache-gib",
    "--api-key": "--api-key or $" + gateway.API_KEY_ENV,
    "--enable-lora": None, "--middleware": None, "--worker-extension-cls": None, "--disable-uvicorn-access-log": None,
    "--disable-log-stats": None,
    # Left at 1: one engine and one API server per replica (the gateway's aliases live in that process,
    # and the replica sees only its own GPUs); more of them are more replicas.
    "--data-parallel-size": "--replicas", "-dp": "--replicas", "--api-server-count": "--replicas", "-asc": "--replicas",
}


def check_passthrough(args: Sequence[str]) -> None:
    """Refuse api_server arguments that would override what `_replica_command` sets (vLLM's spellings:
    ``--flag=value``, ``--no-flag``, underscores, unambiguous abbreviations)."""
    if args and not str(args[0]).startswith("-"):
        raise VllmTrainError(f"vLLM argument {args[0]!r}: vLLM arguments start with a flag and go after a "
                             f"literal -- (e.g. -- --max-num-seqs 64)")
    for arg in args:
        arg = str(arg)
        if not arg.startswith("-") or arg == "-" or arg[1:2].isdigit():  # a value, or a negative number
            continue
        flag = arg.split("=", 1)[0].replace("_", "-")
        positive = "--" + flag[len("--no-"):] if flag.startswith("--no-") else flag
        hits = [r for r in RESERVED_FLAGS if r in (flag, positive) or (r.startswith("--") and len(flag) > 3
                                                                    and r.startswith(flag))]
        if hits:
            instead = RESERVED_FLAGS[hits[0]]
            use = f"use vllm-train serve's {instead} instead" if instead else "vllm-train fixes it"
            raise VllmTrainError(f"vLLM argument {arg} after --: vllm-train serve sets {hits[0]} itself; {use}")


def gpu_assignment(replicas: int, tensor_parallel: int, devices: int, visible: str | None = None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES of each replica: its own `tensor_parallel` consecutive devices of the `devices`
    visible ones (`visible`: the launcher's CUDA_VISIBLE_DEVICES), or None when single-GPU replicas
    outnumber the GPUs and share them (each with a share of the memory)."""
    ids = visible.split(",") if visible else [str(i) for i in range(devices)]
    if replicas * tensor_parallel > devices:
        if tensor_parallel == 1:
            return None
        raise VllmTrainError(f"--replicas {replicas} x --tensor-parallel-size {tensor_parallel} needs "
                             f"{replicas * tensor_parallel} GPUs; {devices} are visible")
    return [",".join(ids[i * tensor_parallel:(i + 1) * tensor_parallel]) for i in range(replicas)]


def cpu_binding(replicas: int, tensor_parallel: int, cpus: Sequence[int]) -> list[str] | None:
    """VLLM_CPU_OMP_THREADS_BIND of each replica: its own cores, split between its tensor-parallel ranks
    ("0,1|2,3"), instead of every replica binding the same ones (and vLLM's automatic binding wants a NUMA
    node per rank); "nobind" with fewer cores than ranks; None (vLLM's default) for one rank."""
    ranks = replicas * tensor_parallel
    if ranks == 1:
        return None
    per = len(cpus) // ranks
    if per < 1:
        return ["nobind"] * replicas
    groups = [",".join(map(str, cpus[r * per:(r + 1) * per])) for r in range(ranks)]
    return ["|".join(groups[i * tensor_parallel:(i + 1) * tensor_parallel]) for i in range(replicas)]
