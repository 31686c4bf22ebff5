"""Rollout speed for the RL batch actually used: vLLM (our engine, LoRA adapter live) vs HF `generate`.

Both sides sample the same prompts x group size x new tokens at temperature 1 with the same LoRA adapter
(our LoRA layers in the HF model; the same weights synced into vLLM). Each side runs in its own
subprocess. Reported: median seconds per rollout batch and generated tokens/s.

    .venv/bin/python benchmarks/rollout_speed.py                     # toy RL batch: shipped tiny model, 16 x 8 x 8
    .venv/bin/python benchmarks/rollout_speed.py --preset qwen2-0.5b # H200: 16 x 8 x 256, bf16, r16 all-linear

Writes benchmarks/results/rollout_speed_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import ALL_LINEAR, PRESETS, build_model, prompt_records  # noqa: E402

ROLLOUT_PRESETS = {
    # the toy world's GRPO batch (tests/test_rl.py, examples/grpo.py)
    "toy": dict(model="shipped", prompts=16, generations=8, new_tokens=8, rank=8, targets=ALL_LINEAR,
                dtype="float32", repeats=7),
    "tiny-0.42m": {**PRESETS["tiny-0.42m"], "repeats": 7},
    "qwen2-0.5b": {**PRESETS["qwen2-0.5b"], "repeats": 3},
}


def _policy(p: dict, model_dir: str):
    import torch

    from vllm_train.config import LoRATrainConfig
    from vllm_train.models import load_policy

    torch.manual_seed(0)
    config = LoRATrainConfig(rank=p["rank"], alpha=2 * p["rank"], target_modules=p["targets"],
                             precision="bf16" if p["dtype"] == "bfloat16" else "fp32")
    model, tokenizer, injector = load_policy(model_dir, config)
    with torch.no_grad():  # a non-trivial adapter (B = 0 would be the base model)
        for lora in injector.lora_layers.values():
            lora.lora_b.normal_(0, 0.01)
    return model.eval(), tokenizer, injector


def run_vllm(p: dict, model_dir: str) -> dict:
    from vllm_train.data.tokenize import prompt_ids
    from vllm_train.engine.llm import EngineOptions, VLLMEngine

    model, tokenizer, injector = _policy(p, model_dir)
    engine = VLLMEngine(model_dir, EngineOptions(max_lora_rank=max(8, p["rank"]), seed=0))
    adapter = engine.sync_adapter(injector.peft_state_dict(), injector.peft_config(model_dir), family="bench")
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in prompt_records(p["prompts"])]
    times, tokens = [], []
    for i in range(p["repeats"]):
        t0 = time.perf_counter()
        out = engine.generate(ids, adapter, n=p["generations"], temperature=1.0, max_tokens=p["new_tokens"],
                              seed=i, logprobs=True)
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(s.token_ids) for group in out for s in group))
    engine.close()
    return {"seconds": times[1:], "tokens": tokens[1:]}


def run_hf(p: dict, model_dir: str) -> dict:
    import torch

    from vllm_train.data.tokenize import prompt_ids

    model, tokenizer, _ = _policy(p, model_dir)
    model.config.use_cache = True
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in prompt_records(p["prompts"])]
    ids = [x for x in ids for _ in range(p["generations"])]
    L = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (L - len(x)) + x for x in ids], device=device)  # left padding
    attention = (torch.arange(L)[None] >= torch.tensor([L - len(x) for x in ids])[:, None]).long().to(device)
    times, tokens = [], []
    for i in range(p["repeats"]):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, max_new_tokens=p["new_tokens"], pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        new = out[:, L:]
        # tokens up to and including the first EOS (what a sampler actually generated)
        eos = (new == tokenizer.eos_token_id).int()
        first = torch.where(eos.any(1), eos.argmax(1) + 1, torch.full_like(eos[:, 0], new.size(1)))
        tokens.append(int(first.sum()))
    return {"seconds": times[1:], "tokens": tokens[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="toy", choices=sorted(ROLLOUT_PRESETS))
    parser.add_argument("--side", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    p = ROLLOUT_PRESETS[args.preset]
    if args.side:
        result = (run_vllm if args.side == "vllm" else run_hf)(p, args.model_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    from vllm_train.assets import TINY_MODEL

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="rollout-bench-model-") as tmp:
        model_dir = str(TINY_MODEL) if p.get("model") == "shipped" else tmp
        if model_dir == tmp:
            build_model(p, Path(tmp))
        results = {}
        for side in ("hf", "vllm"):
            cmd = [sys.executable, __file__, "--preset", args.preset, "--side", side, "--model-dir", model_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            results[side] = json.loads(line[-1][7:])
    rows = {}
    for side, r in results.items():
        s = statistics.median(r["seconds"])
        rate = statistics.median(t / x for t, x in zip(r["tokens"], r["seconds"]))
        rows[side] = {"seconds_median": s, "tokens_per_s": rate, "tokens_mean": statistics.mean(r["tokens"])}
    speedup = rows["hf"]["seconds_median"] / rows["vllm"]["seconds_median"]
    summary = {"preset": args.preset, "batch": {k: p[k] for k in ("prompts", "generations", "new_tokens", "rank")},
               "device": device, "results": rows, "vllm_speedup": speedup, "raw": results,
               "load_average": os.getloadavg()}
    print(f"\nRollout batch {p['prompts']} prompts x {p['generations']} x {p['new_tokens']} new tokens "
          f"({args.preset}, LoRA r={p['rank']}, {device}, load avg {os.getloadavg()[0]:.1f})")
    print("| generator            | s / batch (median) | tokens/s | vs HF |")
    print("|----------------------|--------------------|----------|-------|")
    for side, name in (("hf", "HF generate"), ("vllm", "vLLM (VLLMEngine)")):
        r = rows[side]
        ratio = rows["hf"]["seconds_median"] / r["seconds_median"]
        print(f"| {name:20s} | {r['seconds_median']:18.3f} | {r['tokens_per_s']:8.0f} | {ratio:4.2f}x |")
    out = ROOT / "benchmarks" / "results" / f"rollout_speed_{args.preset}_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
