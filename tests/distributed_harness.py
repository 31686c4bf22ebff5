"""Run a function on N CPU ranks joined by a gloo process group, for tests of distributed code.

    results = run_ranks(fn, world_size, *args, timeout=120)

spawns `world_size` fresh processes (multiprocessing "spawn", so nothing of the test process but
`sys.path` is inherited), sets up ``torch.distributed`` with gloo on a free localhost port in each,
calls ``fn(rank, world_size, *args)`` and returns the ranks' return values, ordered by rank.

- `fn` and `args` must be picklable: a module-level function of an importable module (a test module
  works: the children get the test process's ``sys.path``).
- A return value comes back pickled through a queue (tensors are copied, not shared): keep it small.
- A child that raises fails the call with a RuntimeError carrying the child's traceback; a child that
  dies without reporting, or ranks that do not all report within `timeout` seconds (a hung collective),
  fail it too. Every child still running then is terminated.
- Each rank runs `threads_per_rank` intra-op threads (test machines have few cores).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta


def free_port() -> int:
    """A localhost TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_child(fn, rank: int, world_size: int, port: int, results, threads: int, timeout: float, args) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, threads_per_rank: int = 1) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each on its own
    gloo rank in a spawned process. Raises RuntimeError (a child's traceback) or TimeoutError."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run_child, daemon=True,
                         args=(fn, rank, world_size, port, results, threads_per_rank, timeout, args))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    values, failures = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size and not failures:
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:g} s")
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue_module.Empty:
                for rank, proc in enumerate(procs):  # died without reporting (a crash, a kill)
                    if rank not in values and proc.exitcode not in (None, 0):
                        failures[rank] = f"exited with code {proc.exitcode} without reporting"
                continue
            if ok:
                values[rank] = payload
            else:
                failures[rank] = payload
    finally:
        finished = len(values) == world_size
        for proc in procs:
            proc.join(timeout=5 if finished else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    if failures:
        raise RuntimeError("\n".join(f"rank {rank} failed:\n{tb}" for rank, tb in sorted(failures.items())))
    return [pickle.loads(values[rank]) for rank in range(world_size)]
