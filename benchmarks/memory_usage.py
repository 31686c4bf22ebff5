"""Peak memory and training speed of LoRA training: our layers (`LoRAInjector`) vs PEFT, same model,
same data, same adapter (rank, alpha, all linear layers, fp32 LoRA weights over the base's dtype).

Each backend runs in its own process (clean peaks), alternating, `--repeats` times:
  load the base (bf16 on CUDA, fp32 on CPU) -> inject LoRA -> AdamW -> `--warmup` steps -> `--steps`
  timed steps on a fixed random batch. Peak memory = the most the training steps held above what was
  held before the first step (CUDA: torch.cuda.max_memory_allocated; CPU: resident set size sampled
  every 2 ms). Speed = trained tokens per second over the timed steps.

  python benchmarks/memory_usage.py                                   # CPU: tiny model
  python benchmarks/memory_usage.py --model qwen2-0.5b --batch 8 --seq 256   # the H200 run
Writes a ratio table to stdout and JSON to benchmarks/results/memory_usage.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_sync import ALL_LINEAR, SHAPES, build_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class RssPeak:
    """Samples this process's resident set size in a thread; `peak` is the largest seen (bytes)."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every_s)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def measure(args) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    model_dir = build_model_dir(args.model, "bfloat16" if cuda else "float32")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    if args.backend == "ours":
        from vllm_train.config import LoRATrainConfig
        from vllm_train.lora.injector import LoRAInjector

        injector = LoRAInjector(LoRATrainConfig(rank=args.rank, alpha=2 * args.rank, target_modules=ALL_LINEAR))
        injector.inject(model)
        for lora in injector.lora_layers.values():
            lora.float()  # as the trainers do: fp32 LoRA weights and optimizer state
        params = injector.get_trainable_params()
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=ALL_LINEAR,
                                                 lora_dropout=0.0))  # PEFT keeps adapter weights fp32 too
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 284, (args.batch, args.seq), generator=gen).to(device)  # (B, T)

    def step() -> float:
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        peak_probe = None
    else:
        peak_probe = RssPeak()
        before = RssPeak.rss()
    losses = []
    if peak_probe:
        peak_probe.__enter__()
    for _ in range(args.warmup):
        losses.append(step())
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if peak_probe:
        peak_probe.__exit__()
        peak = peak_probe.peak - before
    else:
        peak = torch.cuda.max_memory_allocated() - before
    return {"peak_bytes": peak, "tokens_per_s": args.steps * args.batch * args.seq / elapsed,
            "step_ms": elapsed / args.steps * 1e3, "trainable_params": sum(p.numel() for p in params),
            "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", *SHAPES])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", choices=["ours", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_usage.json"))
    args = parser.parse_args()
    if args.backend:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    import torch

    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    for _ in range(args.repeats):
        for backend in ("ours", "peft"):
            cmd = [sys.executable, __file__, "--backend", backend, "--model", args.model, "--rank", str(args.rank),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{backend} failed:\n{proc.stderr[-4000:]}")
            runs[backend].append(json.loads(lines[-1][len("RESULT "):]))
            print(backend, runs[backend][-1], flush=True)
    best = {b: {"peak_bytes": min(r["peak_bytes"] for r in rs),
                "tokens_per_s": max(r["tokens_per_s"] for r in rs),
                "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
                "trainable_params": rs[0]["trainable_params"]} for b, rs in runs.items()}
    ratios = {"memory_ours_over_peft": best["ours"]["peak_bytes"] / best["peft"]["peak_bytes"],
              "speed_ours_over_peft": best["ours"]["tokens_per_s"] / best["peft"]["tokens_per_s"]}
    assert best["ours"]["trainable_params"] == best["peft"]["trainable_params"], "not the same adapter"
    rows = ["| backend | peak training memory | tokens/s (best of runs) | trainable params |", "|---|---|---|---|"]
    for b, r in best.items():
        rows.append(f"| {b} | {r['peak_bytes'] / 2**20:.1f} MiB | {r['tokens_per_s']:.0f} "
                    f"| {r['trainable_params']:,} |")
    rows.append(f"| ours / PEFT | {ratios['memory_ours_over_peft']:.3f}x | {ratios['speed_ours_over_peft']:.3f}x | |")
    print("\n".join(rows))
    report = {"model": args.model, "rank": args.rank, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
              "torch": torch.__version__, "runs": runs, "best": best, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
