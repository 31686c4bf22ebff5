"""The biggest model one GPU can RL-train: GRPO with LoRA on random-init bf16 models of real shapes.

Per shape, side by side on the same GPU, each side in its own process (grpo_step.py's `run_ours` /
`run_trl_vllm`):
  * ours         -- RLHFTrainer as shipped: the training copy's base is a view of vLLM's weights (held
                    once), the KV cache sized to the rollout batch;
  * ours_copies  -- the same with `share_base_weights=False`: the base held twice;
  * trl_vllm     -- TRL's GRPOTrainer with vLLM colocate (the base held twice), its vLLM share set to hold
                    the weights plus the same KV budget.
Same workload on all sides (prompts x generations x new tokens, LoRA r16 on every linear layer, micro-batch,
gradient checkpointing on: TRL's default). Reported per side: s/step (median after warm-up), rollout/update
split, peak GPU memory from torch (max reserved, this process) and from nvidia-smi (the whole GPU, polled
every 0.25 s: vLLM's CUDA graphs and NCCL too), or why it did not run (an out-of-memory is a result).

    bash benchmarks/h200.sh benchmarks/model_scale.py --shapes qwen2.5-32b --sides ours,trl_vllm
    bash benchmarks/h200.sh benchmarks/model_scale.py --shapes qwen2-0.5b,llama3-8b
    .venv/bin/python benchmarks/model_scale.py --shapes tiny --sides ours,ours_copies   # CPU plumbing

The models are written to --model-cache (default: a temporary directory; a 32B shape takes 61 GiB of disk),
one shape at a time. Writes benchmarks/results/model_scale_<device>[_tag].json after every side, so a run
cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from grpo_step import ALL_LINEAR, PRESETS, ROOT, build_model, run_ours, run_trl_vllm

# Real shapes (the released configs' sizes); random init, bf16. max_position_embeddings is 2048 (build_model).
SHAPES = {
    "tiny": dict(PRESETS["tiny-0.42m"]),
    "qwen2-0.5b": dict(PRESETS["qwen2-0.5b"], ours_micro_batch=64),
    "qwen2.5-7b": dict(arch="qwen2", hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944, vocab=152064,
                       head_dim=128, tied=False),
    "llama3-8b": dict(arch="llama", hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336, vocab=128256,
                      head_dim=128, tied=False),
    "qwen2.5-14b": dict(arch="qwen2", hidden=5120, layers=48, heads=40, kv_heads=8, inter=13824, vocab=152064,
                        head_dim=128, tied=False),
    "qwen2.5-32b": dict(arch="qwen2", hidden=5120, layers=64, heads=40, kv_heads=8, inter=27648, vocab=152064,
                        head_dim=128, tied=False),
}
# The 7B-32B workload: a step takes seconds; both trainers accumulate micro-batches of 8 sequences
LARGE_WORKLOAD = dict(prompts=8, generations=8, new_tokens=128, rank=16, targets=ALL_LINEAR, dtype="bfloat16",
                      micro_batch=8, ours_micro_batch=8, steps=4, warmup=1)
BUILT = ".built"  # written once a model directory is complete
SIDES = {"ours": dict(share_base=True), "ours_copies": dict(share_base=False), "trl_vllm": {}}
OOM = re.compile(r"out of memory|OutOfMemoryError|No available memory for the cache blocks|"
                 r"not enough|Insufficient|larger than the available", re.IGNORECASE)


def workload(shape: str) -> dict:
    p = dict(SHAPES[shape])
    if "prompts" not in p:
        p.update(LARGE_WORKLOAD)
    p["gradient_checkpointing"] = p["dtype"] == "bfloat16"  # TRL's default; CPU plumbing runs fp32 without it
    return p


def trl_vllm_share(p: dict, n_params: int, model_dir: str) -> float:
    """TRL colocate's gpu_memory_utilization: the weights, the KV budget ours gets (the RL trainer's own
    sizing), 4 GiB of activations and CUDA graphs; at least TRL's 0.3 default."""
    import torch

    from vllm_train.engine.kv_budget import GIB, rollout_kv_cache_gib

    total = torch.cuda.get_device_properties(0).total_memory
    kv_gib = rollout_kv_cache_gib(model_dir, p["prompts"], p["generations"], p["new_tokens"])
    return round(max(0.3, (n_params * 2 + (kv_gib + 4) * GIB) / total), 3)


def reuse_model(model_dir: Path) -> int | None:
    """The parameter count of a model built there before (its BUILT marker), else None."""
    if not (model_dir / BUILT).exists():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(t.numel() for t in model.parameters())


def gpu_memory_used_mib() -> int:
    """memory.used of this process's (first visible) GPU, the whole device, from nvidia-smi; 0 without it."""
    if shutil.which("nvidia-smi") is None:
        return 0
    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    query = ["nvidia-smi", "-i", index, "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    out = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return int(out) if out.isdigit() else 0


class GpuMemoryPoll:
    """Peak `gpu_memory_used_mib` while the `with` block runs."""

    def __init__(self):
        self.peak_mib = 0
        self._stop = threading.Event()

    def _loop(self):
        while not self._stop.wait(0.25):
            self.peak_mib = max(self.peak_mib, gpu_memory_used_mib())

    def __enter__(self):
        self.available = shutil.which("nvidia-smi") is not None
        if self.available:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def run_side(shape: str, side: str, model_dir: str, p: dict, timeout: int) -> dict:
    """One side in a fresh process; its result, or how it ended (an OOM is a result, not an error)."""
    cmd = [sys.executable, __file__, "--child", side, "--model-dir", model_dir, "--params", json.dumps(p)]
    t0 = time.perf_counter()
    with GpuMemoryPoll() as poll:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        except subprocess.TimeoutExpired:
            proc = None
    result = {"wall_s": round(time.perf_counter() - t0, 1), "nvidia_smi_peak_gib": poll.peak_mib / 1024 or None}
    if proc is None:
        return {**result, "status": f"timeout after {timeout} s"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode == 0 and line:
        measured = json.loads(line[-1][7:])
        return {**result, "status": "ran", **measured, "s_per_step": statistics.median(measured["step_s"])}
    errors = [ln.strip() for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
    detail = (errors or proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return {**result, "status": "OOM" if OOM.search(proc.stderr) else f"failed (exit {proc.returncode})",
            "detail": detail}


def child_result(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"{' '.join(cmd[:4])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def table(results: dict) -> str:
    rows = ["| shape | params | side | status | s/step | rollout s | update s | torch peak GiB | GPU peak GiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for shape, entry in results["shapes"].items():
        for side, r in entry["sides"].items():
            cells = [f"{r[k]:.2f}" if isinstance(r.get(k), float) else "-"
                     for k in ("s_per_step", "rollout_s", "update_s", "peak_reserved_gib", "nvidia_smi_peak_gib")]
            status = r["status"] if r["status"] == "ran" else f"{r['status']}: {r.get('detail', '')[:80]}"
            rows.append(f"| {shape} | {entry['params'] / 1e9:.2f}B | {side} | {status} | {' | '.join(cells)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2-0.5b,qwen2.5-7b,llama3-8b,qwen2.5-14b,qwen2.5-32b")
    parser.add_argument("--sides", default="ours,ours_copies,trl_vllm")
    parser.add_argument("--model-cache", help="where the random-init models are written (default: a temp dir)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per side")
    parser.add_argument("--tag", default="")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep the models in --model-cache and use one already built there (one build for "
                             "runs of different sides on different GPUs)")
    parser.add_argument("--child", choices=[*SIDES, "build"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tag = f"_{args.tag}" if args.tag else ""
    if args.child == "build":  # the random init runs on the GPU: in its own process, which then exits
        import torch

        p = json.loads(args.params)
        n_params = reuse_model(Path(args.model_dir)) or build_model(p, Path(args.model_dir))
        (Path(args.model_dir) / BUILT).touch()
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        share = trl_vllm_share(p, n_params, args.model_dir) if torch.cuda.is_available() else None
        print("RESULT " + json.dumps({"params": n_params, "device": device, "trl_vllm_share": share,
                                      "torch": torch.__version__}), flush=True)
        return
    if args.child:
        p = {**json.loads(args.params), **SIDES[args.child]}
        run = run_trl_vllm if args.child == "trl_vllm" else run_ours
        print("RESULT " + json.dumps(run(p, args.model_dir)), flush=True)
        return

    results: dict = {"shapes": {}}
    cache = Path(args.model_cache or tempfile.mkdtemp(prefix="model-scale-"))
    for shape in args.shapes.split(","):
        p = workload(shape)
        model_dir = cache / shape
        model_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        built = child_result([sys.executable, __file__, "--child", "build", "--model-dir", str(model_dir),
                              "--params", json.dumps(p)])
        n_params, p["trl_vllm_share"] = built["params"], built["trl_vllm_share"]
        results.update(device=built["device"], torch=built["torch"])
        out = ROOT / "benchmarks" / "results" / f"model_scale_{'cpu' if built['device'] == 'cpu' else 'cuda'}{tag}.json"
        entry = results["shapes"][shape] = {"params": n_params, "workload": p, "sides": {},
                                            "build_s": round(time.perf_counter() - t0, 1)}
        for side in args.sides.split(","):
            entry["sides"][side] = run_side(shape, side, str(model_dir), p, args.timeout)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(table({"shapes": {shape: {"params": n_params, "sides": {side: entry["sides"][side]}}}})
                  .splitlines()[-1], flush=True)
        if not args.keep_models:
            shutil.rmtree(model_dir)  # disk: a 32B shape is 61 GiB
    print(f"\nGRPO with LoRA r16 by model shape ({results['device']})\n{table(results)}\n  -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
