"""Where an RL step's time goes, variant against variant in one process (one trainer, one vLLM engine).

Update variants (GRPO, rollout + one optimizer step per row, interleaved over `--rounds` to average out
the host's noise):
  * full logits, micro-batch 64: the (B, T, V) logits of a micro-batch projected at once (the path before
    `token_logprobs`; still used when the output head carries a LoRA);
  * chunked log-probs, micro-batch 64 and the whole batch (128): `losses.causal_lm.token_logprobs`.
Rollout variants (vLLM only, same adapter and prompts): sampled-token log-probs as vLLM's per-token dicts,
as flat lists (`SamplingParams(flat_logprobs=True)`, what `VLLMEngine.generate` asks for), and none.

    bash benchmarks/h200.sh benchmarks/rl_step_variants.py            # H200: qwen2-0.5b preset of grpo_step.py
    .venv/bin/python benchmarks/rl_step_variants.py --preset tiny-0.42m   # CPU smoke run

Prints a ratio table and writes benchmarks/results/rl_step_variants_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from grpo_step import PRESETS, ROOT, bench_reward, build_model, prompt_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the update variants")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant and round")
    args = parser.parse_args()
    from vllm_train.config import LoRATrainConfig, RLHFConfig
    from vllm_train.engine.llm import EngineOptions
    from vllm_train.trainers import rl

    p = dict(PRESETS[args.preset])
    cuda = torch.cuda.is_available()
    model_dir = tempfile.mkdtemp(prefix="rl-variants-model-")
    build_model(p, Path(model_dir))
    whole = p["prompts"] * p["generations"]
    lora = LoRATrainConfig(rank=p["rank"], alpha=2 * p["rank"], target_modules=p["targets"], learning_rate=1e-5,
                           batch_size=whole, warmup_ratio=0.0, lr_scheduler="constant",
                           output_dir=tempfile.mkdtemp(prefix="rl-variants-"))
    config = RLHFConfig(lora_config=lora, algorithm="grpo", rollout_batch_size=p["prompts"], log_ref_kl=False,
                        group_size=p["generations"], max_new_tokens=p["new_tokens"], temperature=1.0, seed=0)
    trainer = rl.RLHFTrainer(model_dir, config=config, reward_fn=bench_reward, progress=False,
                             engine_options=EngineOptions(max_lora_rank=p["rank"], seed=0))
    records = prompt_records(p["prompts"])
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run_steps(micro_batch: int, chunked: bool, n: int) -> list[tuple[float, float]]:
        trainer.config.lora_config.batch_size = micro_batch
        plain_head = rl._frozen_plain_linear
        if not chunked:  # the head path for a LoRA-carrying head: full logits
            rl._frozen_plain_linear = lambda module: False
        try:
            out = []
            for i in range(n):
                sync()
                t0 = time.perf_counter()
                stats = trainer.ppo_step(records, seed=1000 + i)
                sync()
                out.append((time.perf_counter() - t0, stats["rollout_seconds"]))
            return out
        finally:
            rl._frozen_plain_linear = plain_head

    run_steps(whole, True, 2)  # warm-up: engine start, CUDA graphs, allocator
    half = min(64, whole)
    base = f"full logits, micro-batch {half}"
    updates = {base: (half, False), f"chunked log-probs, micro-batch {half}": (half, True),
               f"chunked log-probs, micro-batch {whole} (whole batch)": (whole, True)}
    measured: dict[str, list] = {name: [] for name in updates}
    peaks: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (micro_batch, chunked) in updates.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            measured[name] += run_steps(micro_batch, chunked, args.steps)
            if cuda:
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30

    from vllm import SamplingParams

    engine = trainer.engine
    adapter, _ = trainer.sync_adapter()
    inputs = [{"prompt_token_ids": rl.encode_prompt(trainer.tokenizer, r["prompt"])} for r in records]
    rollouts = {"log-probs as per-token dicts": dict(logprobs=0),
                "log-probs as flat lists (ours)": dict(logprobs=0, flat_logprobs=True),
                "no log-probs": {}}
    rollout_s: dict[str, list[float]] = {name: [] for name in rollouts}
    for r in range(args.rounds * args.steps):
        for name, extra in rollouts.items():
            params = SamplingParams(n=p["generations"], temperature=1.0, max_tokens=p["new_tokens"], seed=r,
                                    detokenize=False, **extra)
            t0 = time.perf_counter()
            engine.llm.generate(inputs, params, use_tqdm=False, lora_request=engine._request(adapter))
            rollout_s[name].append(time.perf_counter() - t0)
    trainer.close()

    device = "cuda" if cuda else "cpu"
    summary = {"preset": args.preset, "shape": p, "device": device, "rounds": args.rounds, "steps": args.steps,
               "update": {}, "rollout": {}}
    print(f"\nRL step variants, {args.preset}, {p['prompts']} x {p['generations']} x {p['new_tokens']} tokens, "
          f"{device}")
    print("| update variant | step s | rollout s | update s | update vs full logits | peak GiB |")
    print("|---|---|---|---|---|---|")
    base_update = statistics.median(t - r for t, r in measured[base])
    for name, rows in measured.items():
        step = statistics.median(t for t, _ in rows)
        roll = statistics.median(r for _, r in rows)
        update = statistics.median(t - r for t, r in rows)
        summary["update"][name] = {"step_s": step, "rollout_s": roll, "update_s": update, "raw": rows,
                                   "peak_gib": peaks.get(name)}
        peak = f"{peaks[name]:.1f}" if name in peaks else "-"
        print(f"| {name} | {step:.3f} | {roll:.3f} | {update:.3f} | {base_update / update:.2f}x | {peak} |")
    print("\n| rollout variant | s (median) | vs dicts |")
    print("|---|---|---|")
    base_rollout = statistics.median(rollout_s["log-probs as per-token dicts"])
    for name, times in rollout_s.items():
        summary["rollout"][name] = {"median_s": statistics.median(times), "raw": times}
        print(f"| {name} | {statistics.median(times):.3f} | {base_rollout / statistics.median(times):.2f}x |")
    out = ROOT / "benchmarks" / "results" / f"rl_step_variants_{args.preset}_{device}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
