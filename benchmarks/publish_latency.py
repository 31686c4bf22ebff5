"""Publish latency: trainer saves an adapter -> `push` -> first successful completion on the new version.

For 1 and 2 replicas of vLLM's OpenAI server (started by `vllm_train.engine.replicas`), and for reference the
in-process engine's public path (`VLLMEngine.load_adapter`), over N pushes of fresh random LoRA weights:

  save   write the PEFT dir (LoRAInjector.save, as a trainer checkpoint does)
  push   AdapterPublisher.publish: validate, stage, load NAME-vN on every replica, unload old versions
  first  until a chat completion with model=NAME-vN has succeeded on every replica (1 token)
  total  save + push + first

Prints p50/p95 per phase and the ratio table (2 replicas / 1 replica, and each / in-process), and writes
benchmarks/results/publish_latency.json.

    .venv/bin/python benchmarks/publish_latency.py --pushes 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MESSAGES = [{"role": "user", "content": "What is 13 + 54?"}]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(rows: list[dict]) -> dict:
    return {phase: {"p50_ms": round(1000 * percentile([r[phase] for r in rows], 0.5), 1),
                    "p95_ms": round(1000 * percentile([r[phase] for r in rows], 0.95), 1),
                    "mean_ms": round(1000 * statistics.fmean(r[phase] for r in rows), 1)}
            for phase in rows[0]}


def make_injector(model_path: str, rank: int):
    from transformers import AutoModelForCausalLM

    from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig
    from vllm_train.lora.injector import LoRAInjector

    model = AutoModelForCausalLM.from_pretrained(model_path)
    injector = LoRAInjector(LoRATrainConfig(rank=rank, alpha=2 * rank, target_modules=list(ALL_LINEAR_MODULES)))
    injector.inject(model)
    return injector


def randomize(injector, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in injector.lora_layers.values():
            lora.lora_a.copy_(torch.randn(lora.lora_a.shape, generator=gen) * 0.1)
            lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=gen) * 0.1)


def first_completion(url: str, model: str, timeout: float = 60.0) -> None:
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}).encode()
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if json.loads(resp.read())["model"] == model:
                    return
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.005)


def bench_servers(model_path: str, replicas: int, pushes: int, warmup: int, rank: int, work: Path) -> list[dict]:
    from vllm_train.engine.publish import AdapterPublisher
    from vllm_train.engine.replicas import ServerConfig, start_servers

    injector = make_injector(model_path, rank)
    t0 = time.perf_counter()
    with start_servers(ServerConfig(model_path, replicas=replicas, max_lora_rank=max(8, rank),
                                    log_dir=str(work / f"logs-{replicas}"))) as group:
        print(f"  {replicas} replica(s) up in {time.perf_counter() - t0:.0f}s: {group.urls}", flush=True)
        publisher = AdapterPublisher(group.urls, keep=2, stage_dir=work / f"stage-{replicas}")
        rows = []
        with ThreadPoolExecutor(max_workers=replicas) as pool:
            for i in range(warmup + pushes):
                randomize(injector, i)
                out = work / f"r{replicas}" / f"step-{i}"
                t_start = time.perf_counter()
                injector.save(out, model_path)
                t_saved = time.perf_counter()
                served = publisher.publish(out, "bench")
                t_pushed = time.perf_counter()
                list(pool.map(first_completion, group.urls, [served] * len(group.urls)))
                t_first = time.perf_counter()
                if i >= warmup:
                    rows.append({"save": t_saved - t_start, "push": t_pushed - t_saved, "first": t_first - t_pushed,
                                 "total": t_first - t_start})
    return rows


def bench_in_process(model_path: str, pushes: int, warmup: int, rank: int, work: Path) -> list[dict]:
    from vllm_train.engine.llm import EngineOptions, VLLMEngine

    injector = make_injector(model_path, rank)
    engine = VLLMEngine(model_path, EngineOptions(max_lora_rank=max(8, rank), kv_cache_gib=0.25))
    rows = []
    for i in range(warmup + pushes):
        randomize(injector, i)
        out = work / "inproc" / f"step-{i}"
        t_start = time.perf_counter()
        injector.save(out, model_path)
        t_saved = time.perf_counter()
        ref = engine.load_adapter(out, family="bench")
        t_pushed = time.perf_counter()
        engine.generate([MESSAGES], ref, max_tokens=1)
        t_first = time.perf_counter()
        if i >= warmup:
            rows.append({"save": t_saved - t_start, "push": t_pushed - t_saved, "first": t_first - t_pushed,
                         "total": t_first - t_start})
    engine.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: the shipped tiny model)")
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--replicas", default="1,2", help="comma list of replica counts")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process reference")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "publish_latency.json"))
    args = parser.parse_args()

    from vllm_train.assets import TINY_MODEL

    model_path = str(Path(args.model or TINY_MODEL).resolve())
    results: dict = {"config": {"model": model_path, "pushes": args.pushes, "warmup": args.warmup,
                                "rank": args.rank, "target_modules": "all linear", "platform": platform.platform(),
                                "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
                     "runs": {}}
    with tempfile.TemporaryDirectory(prefix="publish-latency-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                                     else None) as tmp:
        work = Path(tmp)
        for replicas in [int(x) for x in args.replicas.split(",")]:
            print(f"[{replicas} replica(s)] {args.pushes} pushes after {args.warmup} warm-up ...", flush=True)
            rows = bench_servers(model_path, replicas, args.pushes, args.warmup, args.rank, work)
            results["runs"][f"{replicas}_replica"] = {"summary": summarize(rows), "samples_s": rows}
        if not args.no_in_process:
            print("[in-process engine] ...", flush=True)
            rows = bench_in_process(model_path, args.pushes, args.warmup, args.rank, work)
            results["runs"]["in_process"] = {"summary": summarize(rows), "samples_s": rows}
    results["config"]["load_avg_end"] = os.getloadavg()

    runs = results["runs"]
    print(f"\npublish latency, {args.pushes} pushes (ms; p50 / p95)")
    header = f"{'phase':<7}" + "".join(f"{name:>24}" for name in runs)
    print(header)
    for phase in ("save", "push", "first", "total"):
        print(f"{phase:<7}" + "".join(f"{s['summary'][phase]['p50_ms']:>12.1f} /{s['summary'][phase]['p95_ms']:>9.1f}"
                                      for s in runs.values()))
    ratios = {}
    if "1_replica" in runs:
        base = runs["1_replica"]["summary"]
        for name, s in runs.items():
            ratios[f"{name}/1_replica"] = {phase: round(s["summary"][phase]["p50_ms"] / base[phase]["p50_ms"], 2)
                                           for phase in ("push", "first", "total")}
    if "in_process" in runs:
        base = runs["in_process"]["summary"]
        for name, s in runs.items():
            if name != "in_process":
                ratios[f"{name}/in_process"] = {phase: round(s["summary"][phase]["p50_ms"] / base[phase]["p50_ms"], 2)
                                                for phase in ("push", "first", "total")}
    results["ratios_p50"] = ratios
    print("\nratios of p50 latency")
    print(f"{'':<26}{'push':>8}{'first':>8}{'total':>8}")
    for name, r in ratios.items():
        print(f"{name:<26}{r['push']:>8.2f}{r['first']:>8.2f}{r['total']:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
