"""Base held once, checked on the GPU: `TrainableEngine` with `EngineOptions.share_base_weights` on and off.

Same random-init model (a preset of grpo_step.py), same LoRA; each side runs in its own process (one
in-process vLLM engine per process, clean memory counters) and reports:
  * the sharing outcome (`TrainableEngine.shared_base`): tensors shared and their GiB, or the fallback reason;
  * torch.cuda.memory_allocated just before and after the policy loads (the engine, KV cache included, is
    up by then): what the training copy adds -- with sharing, only its norms and LoRA weights;
  * the data_ptr proof: how many of the policy's parameters lie inside vLLM's own weight tensors;
  * logits of a fixed batch at the start and after one `train_step` (the parent compares the sides), the
    step's loss, and the engine's greedy tokens after the step (it must still serve the same base).

    bash benchmarks/h200.sh benchmarks/shared_base_check.py                  # H200: qwen2-0.5b preset
    .venv/bin/python benchmarks/shared_base_check.py --preset tiny-0.42m     # CPU plumbing: both sides copy

Prints a table and writes benchmarks/results/shared_base_check_<preset>_<device>.json (or --out).
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
from grpo_step import PRESETS, ROOT, build_model, prompt_records

SIDES = {"shared": True, "separate": False}  # side -> EngineOptions.share_base_weights


def inside_vllm(policy: torch.nn.Module, vllm_model: torch.nn.Module | None) -> int:
    """How many of the policy's parameters lie inside one of vLLM's weight tensors (address ranges)."""
    if vllm_model is None:
        return 0
    ranges = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size())
              for p in vllm_model.parameters() if p.numel()]
    count = 0
    for p in policy.parameters():
        start, end = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
        count += any(lo <= start and end <= hi for lo, hi in ranges)
    return count


def run_side(p: dict, model_dir: str, share: bool, logits_path: str) -> dict:
    from vllm_train.assets import data_file
    from vllm_train.config import LoRATrainConfig
    from vllm_train.data.io import load_records
    from vllm_train.engine import shared_base
    from vllm_train.engine.llm import EngineOptions
    from vllm_train.trainers import trainable

    cuda = torch.cuda.is_available()
    marks: dict[str, int | None] = {}
    load = trainable.load_policy_over_engine

    def measured_load(*args, **kwargs):  # the engine is up here: the difference is the training copy
        marks["before_policy"] = torch.cuda.memory_allocated() if cuda else None
        loaded = load(*args, **kwargs)
        marks["after_policy"] = torch.cuda.memory_allocated() if cuda else None
        return loaded

    trainable.load_policy_over_engine = measured_load
    config = LoRATrainConfig(rank=p["rank"], alpha=2 * p["rank"], target_modules=p["targets"], learning_rate=1e-3,
                             max_length=128, seed=0)
    options = EngineOptions(max_lora_rank=config.engine_max_lora_rank, seed=0, share_base_weights=share)
    engine = trainable.TrainableEngine(model_dir, config, options)
    report = engine.shared_base
    live = engine.engine.llm.apply_model(shared_base._the_model)[0]  # in-process engine: the live model
    prompts = [r["prompt"] for r in prompt_records(4)]  # chat messages
    ids = [engine.engine.prompt_token_ids(prompt) for prompt in prompts]
    batch = {k: v.to(engine.device) for k, v in engine.tokenizer.pad({"input_ids": ids}, return_tensors="pt").items()}
    logits = {}
    with torch.no_grad():
        logits["start"] = engine.model(**batch).logits.float().cpu()
    stats = engine.train_step(load_records(data_file("sft_train.jsonl"))[:4])
    with torch.no_grad():
        logits["after_step"] = engine.model(**batch).logits.float().cpu()
    torch.save(logits, logits_path)
    greedy = engine.generate(prompts[:2], max_tokens=8, temperature=0.0)
    before, after = marks["before_policy"], marks["after_policy"]
    result = {"summary": report.summary(), "reason": report.reason, "tensors_shared": len(report.views),
              "gib_shared": report.num_bytes / 2**30,
              "policy_params_inside_vllm_tensors": inside_vllm(engine.model, live),
              "policy_params": sum(1 for _ in engine.model.parameters()),
              "allocated_before_policy_gib": before / 2**30 if cuda else None,
              "allocated_after_policy_gib": after / 2**30 if cuda else None,
              "policy_gib": (after - before) / 2**30 if cuda else None,
              "loss": stats["loss"], "greedy_tokens": [list(o.outputs[0].token_ids) for o in greedy]}
    engine.close()
    return result


def compare(results: dict, logits: dict) -> dict:
    diffs = {point: (logits["shared"][point] - logits["separate"][point]).abs().max().item()
             for point in ("start", "after_step")}
    shared, separate = results["shared"], results["separate"]
    saved = None if shared["policy_gib"] is None else separate["policy_gib"] - shared["policy_gib"]
    return {"max_abs_logit_diff": max(diffs.values()), "max_abs_logit_diff_by_point": diffs, "gib_saved": saved,
            "same_loss": shared["loss"] == separate["loss"],
            "same_greedy_tokens": shared["greedy_tokens"] == separate["greedy_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2-0.5b" if torch.cuda.is_available() else "tiny-0.42m",
                        choices=sorted(PRESETS))
    parser.add_argument("--out", help="result file (default: benchmarks/results/shared_base_check_<preset>_<device>"
                        ".json)")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    if args.side:  # child: one side, its JSON on the last line
        print("RESULT " + json.dumps(run_side(p, args.model_dir, SIDES[args.side], args.logits)), flush=True)
        os._exit(0)  # skip vLLM's interpreter teardown (see tests/test_fast_sync.py)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results, logits = {}, {}
    with tempfile.TemporaryDirectory(prefix="shared-base-check-") as work:
        model_dir = Path(work) / "model"
        model_dir.mkdir()
        n_params = build_model(p, model_dir)
        for side in SIDES:
            logits_path = str(Path(work) / f"{side}.pt")
            cmd = [sys.executable, __file__, "--preset", args.preset, "--side", side, "--model-dir", str(model_dir),
                   "--logits", logits_path]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            results[side] = json.loads(line[-1][len("RESULT "):])
            logits[side] = torch.load(logits_path)
    summary = {"preset": args.preset, "params": n_params, "device": device, **compare(results, logits),
               "sides": results}
    print(f"\nBase held once, {args.preset} ({n_params / 1e6:.2f}M params, {device})")
    print("| side | outcome | policy params inside vLLM tensors | policy GiB (allocated) |")
    print("|---|---|---|---|")
    for side, r in results.items():
        gib = f"{r['policy_gib']:.3f}" if r["policy_gib"] is not None else "-"
        print(f"| {side} | {r['summary']} | {r['policy_params_inside_vllm_tensors']} of {r['policy_params']} | {gib} |")
    saved = f"{summary['gib_saved']:.3f} GiB" if summary["gib_saved"] is not None else "-"
    print(f"saved: {saved}; max |logit diff| shared vs separate: {summary['max_abs_logit_diff']:.3g}; "
          f"same loss: {summary['same_loss']}; same greedy tokens: {summary['same_greedy_tokens']}")
    default = ROOT / "benchmarks" / "results" / f"shared_base_check_{args.preset}_{device}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
