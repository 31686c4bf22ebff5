"""Data parallel vs one process on the union batch: how far apart are the adapters after k steps?

Runs ``vllm-train sft`` and ``vllm-train dpo`` on the shipped toy data twice -- ``torchrun
--nproc-per-node N`` with per-rank batch B, and one process with batch N*B -- and compares the saved
adapters, then loads the N-rank adapter with PEFT. In fp32 the runs differ only in summation order
(bound 1e-6, the CPU test's). In bf16 the forward passes round differently with the micro-batch shape;
AdamW moves each weight by at most ~lr per step whatever its gradient, so two runs that see the same
data stay within 2 * lr * k of each other: that is the stated bf16 bound.

    bash benchmarks/h200.sh benchmarks/dp_equality.py --ranks 2 --precision bf16     # 2 GPUs, NCCL

Prints a table and writes benchmarks/results/dp_equality_<precision>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "vllm_train" / "assets" / "tiny-llama"
DATA = ROOT / "vllm_train" / "assets" / "data"


def run(ranks: int, command: str, batch: int, out: Path, args) -> None:
    data = DATA / ("sft_train.jsonl" if command == "sft" else "prefs_train.jsonl")
    flags = [command, "--model", str(MODEL), "--data", str(data), "--output-dir", str(out), "--max-steps",
             str(args.steps), "--batch-size", str(batch), "--gradient-accumulation-steps", "2", "--warmup-ratio", "0",
             "--learning-rate", str(args.lr), "--precision", args.precision, "--no-progress", "--logging-steps", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
                "vllm_train"] if ranks > 1 else [sys.executable, "-m", "vllm_train"]
    proc = subprocess.run(launcher + flags, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{command} on {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")


def peft_loads(adapter: Path) -> bool:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), str(adapter))
    return any("lora_B" in name and p.abs().max() > 0 for name, p in model.named_parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    bound = 1e-6 if args.precision == "fp32" else 2 * args.lr * args.steps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dp-equality-") as tmp:
        for command in ("sft", "dpo"):
            many, one = Path(tmp, f"{command}-{args.ranks}"), Path(tmp, f"{command}-1")
            run(args.ranks, command, args.batch_size, many, args)
            run(1, command, args.batch_size * args.ranks, one, args)
            a, b = load_file(str(many / "adapter_model.safetensors")), load_file(str(one / "adapter_model.safetensors"))
            moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)  # B starts at 0: how far training went
            rows[command] = {"max_abs_diff": max((a[k] - b[k]).abs().max().item() for k in a), "max_lora_b": moved,
                             "peft_loads_trained_adapter": peft_loads(many)}
    print(f"\n{args.ranks} ranks x batch {args.batch_size} vs 1 rank x batch {args.batch_size * args.ranks}, "
          f"{args.steps} steps, lr {args.lr}, {args.precision}, {device} (bound {bound:.1e})")
    print("| command | max abs diff | within bound | largest LoRA B | PEFT loads |")
    print("|---|---|---|---|---|")
    for command, r in rows.items():
        print(f"| {command} | {r['max_abs_diff']:.2e} | {r['max_abs_diff'] <= bound} | {r['max_lora_b']:.2e} | "
              f"{r['peft_loads_trained_adapter']} |")
    summary = {"ranks": args.ranks, "precision": args.precision, "device": device, "bound": bound, "steps": args.steps,
               "lr": args.lr, "results": rows, "torch": torch.__version__}
    out = ROOT / "benchmarks" / "results" / f"dp_equality_{args.precision}_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  -> {out.relative_to(ROOT)}")
    if not all(r["max_abs_diff"] <= bound for r in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
