"""`vllm-train service` with 1, 4, 16 tenants doing SFT steps at once, driven by the unmodified tinker SDK
(one thread per tenant: forward_backward + optim_step, then wait), on one in-process service.

Reports per tenant count: aggregate trained tokens/s (input tokens of every forward/backward, all tenants,
over the wall time), per-tenant step latency p50/p95 (submit -> both results back), forward/backward passes
the worker ran (fewer than requests = tenants batched into one pass), and `save_weights_for_sampler`
latency p50/p95 through the SDK with the server-side slot write (`sync_adapter`) p50 beside it; peak memory
(GPU: torch's peak allocation; CPU: the process's max RSS).

`--baseline` also runs the same tenants as separate processes, one per tenant, started together: each loads
its own base (`vllm_train.models.load_policy`, the single-adapter trainer's stack: rank 8, alpha 32,
attention + MLP, as the service's tenants), runs the same SFT steps (summed cross-entropy, torch AdamW) on
the same data, and reports its tokens, its step loop's start and end time and its max RSS. Aggregate
tokens/s = all tokens / (last end - first start); memory = the processes' RSS summed. Compare with
`--no-sampling` (the service process then holds no vLLM engine either).

    python benchmarks/service.py --tenants 1,4,16 --steps 10 --out benchmarks/results/service_cpu.json
    python benchmarks/service.py --tenants 1,4 --steps 10 --no-sampling --baseline --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import threading
import time


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def sft_data(tokenizer, records: list[dict], count: int, offset: int):
    from tinker import types

    data = []
    for r in (records[(offset + i) % len(records)] for i in range(count)):
        ids = tokenizer.encode(tokenizer.apply_chat_template(r["messages"], tokenize=False))
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}))
    return data


def run_tenants(url: str, key: str, model: str, tenants: int, steps: int, batch: int, records: list[dict],
                service) -> dict:
    import tinker
    from tinker import types

    client = tinker.ServiceClient(base_url=url, api_key=key)
    trainers = [client.create_lora_training_client(base_model=model, rank=8, seed=i, train_unembed=False).result()
                for i in range(tenants)]
    tokenizer = trainers[0].get_tokenizer()
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    start = threading.Barrier(tenants + 1)

    def tenant(index: int, trainer) -> None:
        start.wait()
        for step in range(steps):
            data = sft_data(tokenizer, records, batch, (index * steps + step) * batch)
            t0 = time.perf_counter()
            fwd_bwd = trainer.forward_backward(data, "cross_entropy")
            optim = trainer.optim_step(types.AdamParams(learning_rate=1e-4))
            fwd_bwd.result(), optim.result()
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += sum(d.model_input.length for d in data)

    threads = [threading.Thread(target=tenant, args=(i, t)) for i, t in enumerate(trainers)]
    passes_before = len(service.worker.batches)
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    passes = len(service.worker.batches) - passes_before
    saves, syncs = [], []
    if service.sampler is not None:
        for i in range(3):
            for trainer in trainers[:4]:
                t1 = time.perf_counter()
                trainer.save_weights_for_sampler(f"bench-{tenants}-{i}").result()
                saves.append(time.perf_counter() - t1)
                syncs.append(service.sampler.publish_seconds[-1])
    for trainer in trainers:  # free the slots for the next tenant count
        service.trainer.unload(service.trainer.runs[trainer.model_id])
        if service.sampler is not None:
            service.sampler.forget(trainer.model_id)
    return {"tenants": tenants, "steps": steps, "batch": batch, "wall_s": wall, "tokens_per_s": tokens[0] / wall,
            "step_p50_ms": 1e3 * percentile(latencies, 0.5), "step_p95_ms": 1e3 * percentile(latencies, 0.95),
            "requests": tenants * steps, "fwd_bwd_passes": passes,
            "save_for_sampler_p50_ms": 1e3 * percentile(saves, 0.5) if saves else None,
            "save_for_sampler_p95_ms": 1e3 * percentile(saves, 0.95) if saves else None,
            "slot_sync_p50_ms": 1e3 * statistics.median(syncs) if syncs else None}


def one_tenant_process(model: str, steps: int, batch: int, index: int, tenants: int) -> None:
    """A tenant as its own process (see the module docstring); prints one JSON line."""
    import torch

    from vllm_train.assets import data_file
    from vllm_train.config import LoRATrainConfig
    from vllm_train.data.causal_lm import IGNORE_INDEX
    from vllm_train.lora.multi_model import ATTENTION_MODULES, MLP_MODULES
    from vllm_train.models import label_logprobs, load_policy

    torch.manual_seed(index)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tenants))  # the processes share the cores
    config = LoRATrainConfig(rank=8, alpha=32, target_modules=[*ATTENTION_MODULES, *MLP_MODULES], precision="fp32")
    model_, tokenizer, injector = load_policy(model, config)
    optimizer = torch.optim.AdamW(injector.get_trainable_params(), lr=1e-4, betas=(0.9, 0.95), eps=1e-12,
                                  weight_decay=0.0)
    records = [json.loads(line) for line in open(data_file("sft_train.jsonl"))]
    tokens, started = 0, time.time()
    for step in range(steps):  # one padded pass per step, as the service's worker makes one per batch
        data = sft_data(tokenizer, records, batch, (index * steps + step) * batch)
        T = max(d.model_input.length for d in data)
        # the full sequences (input + last target) with labels, as the SFT trainer's batches are
        ids_BT = torch.zeros(len(data), T + 1, dtype=torch.long)
        labels_BT = torch.full((len(data), T + 1), IGNORE_INDEX, dtype=torch.long)
        attention_BT = torch.zeros(len(data), T + 1, dtype=torch.long)
        for row, d in enumerate(data):
            n, targets = d.model_input.length, d.loss_fn_inputs["target_tokens"].tolist()
            ids_BT[row, :n + 1] = torch.tensor(d.model_input.to_ints() + targets[-1:])
            labels_BT[row, 1:n + 1] = torch.tensor(targets)
            attention_BT[row, :n + 1] = 1
        logps_BT1, mask_BT1 = label_logprobs(model_, ids_BT, attention_BT, labels_BT)
        (-logps_BT1[mask_BT1].sum()).backward()  # the trainer's chunked head: no (B, T, V) logits
        tokens += int(mask_BT1.sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"tokens": tokens, "start": started, "end": time.time(),
                      "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}), flush=True)


def run_processes(model: str, tenants: int, steps: int, batch: int) -> dict:
    """`tenants` separate processes at once (`one_tenant_process`): aggregate tokens/s and summed RSS."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, __file__, "--one-tenant", str(i), "--tenants", str(tenants), "--model",
                               model, "--steps", str(steps), "--batch", str(batch)], stdout=subprocess.PIPE, text=True)
             for i in range(tenants)]
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"a tenant process failed (exit {proc.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {"tenants": tenants, "tokens_per_s": sum(r["tokens"] for r in reports) / wall, "wall_s": wall,
            "memory_gib": sum(r["max_rss_gib"] for r in reports)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vllm_train/assets/tiny-llama")
    parser.add_argument("--tenants", default="1,4,16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="datums per forward_backward")
    parser.add_argument("--no-sampling", action="store_true", help="no vLLM engine (no save_for_sampler figures)")
    parser.add_argument("--baseline", action="store_true", help="also the tenants as separate processes")
    parser.add_argument("--one-tenant", type=int, help=argparse.SUPPRESS)  # a baseline process (internal)
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    if args.one_tenant is not None:
        return one_tenant_process(args.model, args.steps, args.batch, args.one_tenant, int(args.tenants))

    import torch

    from vllm_train.assets import data_file
    from vllm_train.service.config import ServiceConfig
    from vllm_train.service.server import build_service, start_in_thread

    counts = [int(c) for c in args.tenants.split(",")]
    key = "tml-benchmark-key-0123456789"
    service = build_service(ServiceConfig(model=args.model, port=0, max_adapters=max(counts), max_lora_rank=8,
                                          sampling=not args.no_sampling, api_keys=(key,)))
    running = start_in_thread(service)
    records = [json.loads(line) for line in open(data_file("sft_train.jsonl"))]
    results = []
    try:
        for count in counts:
            results.append(run_tenants(running.url, key, args.model, count, args.steps, args.batch, records, service))
            print(json.dumps(results[-1]), flush=True)
    finally:
        running.stop()
    memory = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    baseline = [run_processes(args.model, count, args.steps, args.batch) for count in counts] if args.baseline else []
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "model": args.model, "peak_memory_gib": memory, "results": results, "separate_processes": baseline}
    print("| tenants | tokens/s | step p50 / p95 (ms) | requests / passes | save_for_sampler p50 / p95 (ms) | "
          "slot sync p50 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        save = (f"{r['save_for_sampler_p50_ms']:.1f} / {r['save_for_sampler_p95_ms']:.1f}"
                if r["save_for_sampler_p50_ms"] is not None else "-")
        sync = f"{r['slot_sync_p50_ms']:.2f}" if r["slot_sync_p50_ms"] is not None else "-"
        print(f"| {r['tenants']} | {r['tokens_per_s']:.0f} | {r['step_p50_ms']:.0f} / {r['step_p95_ms']:.0f} | "
              f"{r['requests']} / {r['fwd_bwd_passes']} | {save} | {sync} |")
    print(f"peak memory: {memory:.2f} GiB ({out['device']})")
    if baseline:
        print("\n| tenants | service tokens/s | separate processes tokens/s | ratio | service GiB | processes GiB |")
        print("|---|---|---|---|---|---|")
        for r, b in zip(results, baseline):
            print(f"| {r['tenants']} | {r['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
                  f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x | {memory:.2f} (peak, all counts) | "
                  f"{b['memory_gib']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
