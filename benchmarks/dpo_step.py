"""One DPO optimizer step: vllm-train vs TRL's DPOTrainer (LoRA, reference = adapter disabled).

Same model (a random-init Llama of a configurable shape, written once to a temp dir), same LoRA
(rank, alpha, target modules), same batch size, same prompt/completion lengths, same beta, fp32 on CPU
(bf16 on CUDA). Arms:

  ours/live-ref     our loop with the reference recomputed each step (adapter off): TRL's amount of work
  ours/precomputed  our default: reference log-probs computed once before training (not in the step time)
  trl/live-ref      trl.DPOTrainer with a PEFT LoraConfig (it disables the adapter for the reference)

Each arm runs in its own spawned process (clean peak memory); timings are the median per optimizer step
after warm-up steps; the arms run round-robin `--repeats` times and each keeps its fastest run.
Peak memory is the process's peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA.
Writes a ratio table to stdout and JSON to benchmarks/results/dpo_step.json.

    .venv/bin/python benchmarks/dpo_step.py [--hidden 512 --layers 4 --batch-size 8 --prompt-len 64
                                             --completion-len 64 --steps 10 --warmup 3]

TRL is a dev/benchmark-only dependency: nothing in vllm_train imports it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args, out: Path) -> None:
    """A random-init Llama with the shipped tokenizer (its chat template and EOS), saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_train.assets import TINY_MODEL
    from vllm_train.models import load_tokenizer

    tok = load_tokenizer(str(TINY_MODEL))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), head_dim=64,
                      max_position_embeddings=4 * (args.prompt_len + args.completion_len),
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def make_pairs(n: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[dict]:
    """Digit strings: the shipped tokenizer gives one token per digit, so lengths are exact."""
    rng = random.Random(seed)

    def digits(k):
        return "".join(rng.choice("0123456789") for _ in range(k))

    # completion_len - 1 digits + EOS
    return [{"prompt": digits(prompt_len), "chosen": digits(completion_len - 1),
             "rejected": digits(completion_len - 1)} for _ in range(n)]


def _peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(args, model_dir: str, pairs: list[dict], precompute: bool) -> dict:
    import torch

    from vllm_train.data.preference import PreferenceDataset
    from vllm_train.trainers import common
    from vllm_train.trainers.dpo import DPOConfig, DPOTrainer

    cfg = DPOConfig(rank=args.rank, alpha=2 * args.rank, target_modules=TARGETS, learning_rate=1e-4,
                    batch_size=args.batch_size, gradient_accumulation_steps=1, beta=0.1,
                    max_length=args.prompt_len + args.completion_len, precompute_ref_logps=precompute,
                    output_dir=tempfile.mkdtemp())
    trainer = DPOTrainer(model_dir, cfg, progress=False, tensorboard=False)
    trainer.setup_training()
    data = PreferenceDataset(pairs, trainer.tokenizer, cfg.max_length)
    params = trainer.injector.get_trainable_params()
    optimizer = common.make_optimizer(params, cfg)
    t0 = time.perf_counter()
    ref = trainer.reference_logps(data) if precompute else None
    precompute_s = time.perf_counter() - t0
    trainer.model.train()
    times = []
    for step in range(args.warmup + args.steps):
        idx = list(range((step * args.batch_size) % len(data), (step * args.batch_size) % len(data) + args.batch_size))
        _sync(trainer.device)
        t0 = time.perf_counter()
        trainer._accumulate(data, [idx], len(idx), ref)  # the loop's own forward/backward
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(trainer.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "step_s_mean": statistics.mean(times),
            "precompute_s": precompute_s if precompute else None, "peak_mib": _peak_memory_mib(trainer.device),
            "seq_len": len(data[0]["chosen_input_ids"])}


def run_trl(args, model_dir: str, pairs: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t0 = [], None

        def on_step_begin(self, *a, **k):
            _sync(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync(device)
            self.times.append(time.perf_counter() - self._t0)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                    gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=1e-4,
                    beta=0.1, loss_type=["sigmoid"], max_length=args.prompt_len + args.completion_len + 8,
                    precompute_ref_log_probs=False, report_to=[], logging_steps=1000, save_strategy="no",
                    use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                    lr_scheduler_type="constant", warmup_steps=0)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                         peft_config=lora, callbacks=[timer])
    trainer.train()
    times = timer.times[args.warmup:]
    return {"step_s": statistics.median(times), "step_s_mean": statistics.mean(times), "precompute_s": None,
            "peak_mib": _peak_memory_mib(device)}


def _arm(name, args, model_dir, pairs, queue):
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if name == "trl/live-ref":
            result = run_trl(args, model_dir, pairs)
        else:
            result = run_ours(args, model_dir, pairs, precompute=name == "ours/precomputed")
        queue.put((name, result))
    except Exception as exc:  # report, keep the other arms
        queue.put((name, {"error": f"{type(exc).__name__}: {exc}"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default)")
    ap.add_argument("--arms", default="ours/live-ref,ours/precomputed,trl/live-ref")
    ap.add_argument("--repeats", type=int, default=2,
                    help="run the arms round-robin this many times and keep each arm's fastest run (the "
                         "least disturbed by other load on a shared machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dpo_step.json"))
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    n_pairs = args.batch_size * (args.warmup + args.steps)
    pairs = make_pairs(n_pairs, args.prompt_len, args.completion_len)
    ctx = mp.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(args, Path(tmp))
        for _ in range(args.repeats):
            for name in args.arms.split(","):
                queue = ctx.Queue()
                proc = ctx.Process(target=_arm, args=(name, args, tmp, pairs, queue))
                proc.start()
                name_, result = queue.get()
                proc.join()
                print(f"{name_:18s} {result}", flush=True)
                best = results.get(name_)
                if best is None or "error" in best or result.get("step_s", float("inf")) < best["step_s"]:
                    results[name_] = result

    import torch
    import trl

    base = results.get("trl/live-ref", {}).get("step_s")
    print(f"\nDPO step, Llama hidden={args.hidden} layers={args.layers}, LoRA r={args.rank} all-linear, "
          f"batch {args.batch_size} pairs x ({args.prompt_len} prompt + {args.completion_len} completion) tokens")
    print(f"{'arm':18s} {'s/step':>9s} {'vs TRL':>8s} {'peak MiB':>9s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:18s} error: {r['error']}")
            continue
        ratio = f"{base / r['step_s']:.2f}x" if base else "-"
        print(f"{name:18s} {r['step_s']:9.4f} {ratio:>8s} {r['peak_mib']:9.0f}")
    print("(vs TRL = TRL's s/step divided by the arm's: > 1 means faster than TRL)")
    payload = {"config": vars(args), "results": results,
               "speedup_vs_trl": {k: base / v["step_s"] for k, v in results.items() if base and "step_s" in v},
               "env": {"torch": torch.__version__, "trl": trl.__version__, "python": platform.python_version(),
                       "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
                       "load_avg_at_end": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
