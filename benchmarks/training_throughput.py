"""Our SFT loop vs plain PEFT + Hugging Face `Trainer`: same model, data, batches, LoRA shape, steps.

Each side runs in its own worker process (so peak RSS is its own), one after the other, from one
invocation of this script. Both see identical padded batches (our CausalLMDataset + collator, shuffled
the same way is not required: the token count per step is what is timed). Throughput = non-padding
tokens processed / training wall time (model loading excluded); peak RSS = the worker's ru_maxrss.

  python benchmarks/training_throughput.py [--steps 40 --batch 16 --rank 8]
Prints a ratio table; writes JSON to benchmarks/results/training_throughput.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dataset(tokenizer, n: int):
    from vllm_train.assets import data_file
    from vllm_train.data.causal_lm import CausalLMDataset
    from vllm_train.data.io import load_records

    return CausalLMDataset(load_records(data_file("sft_train.jsonl"))[:n], tokenizer, 64)


def tokens_seen(ds, steps: int, batch: int) -> int:
    n = len(ds)
    return sum(int(ds[(s * batch + i) % n]["attention_mask"].sum()) for s in range(steps) for i in range(batch))


def run_ours(args) -> dict:
    from vllm_train.assets import TINY_MODEL
    from vllm_train.config import LoRATrainConfig
    from vllm_train.trainers.sft import LoRATrainer

    out = tempfile.mkdtemp(prefix="bench-ours-")
    cfg = LoRATrainConfig(rank=args.rank, alpha=2 * args.rank, target_modules=TARGETS, learning_rate=2e-4,
                          batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
                          logging_steps=args.steps, save_steps=10**9, warmup_ratio=0.0, max_length=64, output_dir=out)
    trainer = LoRATrainer(str(TINY_MODEL), cfg, progress=False, tensorboard=False)
    trainer.setup_training()
    ds = dataset(trainer.tokenizer, args.examples)
    import matplotlib.pyplot  # noqa: F401  (one-time import outside the timed region, as HF's are)
    t0 = time.perf_counter()
    trainer.train(ds)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "tokens": tokens_seen(ds, args.steps, args.batch)}


def run_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from vllm_train.assets import TINY_MODEL
    from vllm_train.data.causal_lm import collate_causal_lm
    from vllm_train.models import load_tokenizer

    tokenizer = load_tokenizer(str(TINY_MODEL))
    ds = dataset(tokenizer, args.examples)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32),
                           LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-peft-"), per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=2e-4, logging_steps=10**6,
                              save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                              dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=ds,
                      data_collator=lambda b: collate_causal_lm(b, tokenizer.pad_token_id))
    t0 = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    return {"seconds": secs, "tokens": tokens_seen(ds, args.steps, args.batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--examples", type=int, default=640)
    parser.add_argument("--worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training_throughput.json"))
    args = parser.parse_args()
    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_peft(args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for side in ("ours", "peft"):
        cmd = [sys.executable, __file__, "--worker", side, "--steps", str(args.steps), "--batch", str(args.batch),
               "--rank", str(args.rank), "--examples", str(args.examples)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results[side] = json.loads(line[len("RESULT "):])
        results[side]["tok_per_s"] = results[side]["tokens"] / results[side]["seconds"]
    ours, peft = results["ours"], results["peft"]
    ratio = {"speed (ours/peft)": ours["tok_per_s"] / peft["tok_per_s"],
             "peak RSS (ours/peft)": ours["peak_rss_mib"] / peft["peak_rss_mib"]}
    print(f"\nSFT training, tiny model, {args.steps} steps x batch {args.batch}, LoRA r={args.rank} all linear, CPU")
    print(f"{'':10s} {'tok/s':>9s} {'seconds':>8s} {'peak RSS MiB':>13s}")
    for side in ("ours", "peft"):
        r = results[side]
        print(f"{side:10s} {r['tok_per_s']:9.0f} {r['seconds']:8.2f} {r['peak_rss_mib']:13.0f}")
    for k, v in ratio.items():
        print(f"{k:22s} {v:.2f}x")
    payload = {"benchmark": "training_throughput", "steps": args.steps, "batch": args.batch, "rank": args.rank,
               "results": results, "ratios": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
