"""What vLLM's sleep mode frees during a training update, and what it costs (issue #15 item 3).

The RL trainer keeps its vLLM engine awake: on CUDA the training copy's base weights are views of vLLM's
(held once) and the KV cache is sized to the rollout batch. Sleep mode is the alternative a colocated
trainer has: `LLM.sleep(level=1)` copies the weights to host memory and discards the KV cache, level 2
discards both, and `wake_up()` brings them back. Sleeping moves or frees the very tensors the shared base
points into, so the two do not combine (shared_base refuses an engine with sleep mode on); this benchmark
measures what sleeping would buy and cost at a real shape, so the choice rests on numbers.

One plain `vllm.LLM(enable_sleep_mode=True, enable_lora=True)` with the KV budget the RL trainer would give a
16 x 8 x 256 rollout; GPU memory in use (the whole device, nvidia-smi) awake, after `sleep(1)`, awake again,
after `sleep(2)`; seconds per sleep and wake; and whether level 1 gives back the same greedy tokens.

    bash benchmarks/h200.sh benchmarks/sleep_levels.py --shape qwen2.5-7b --model-dir /tmp/ms/qwen2.5-7b

Writes benchmarks/results/sleep_levels_<shape>_cuda.json. CUDA only (the CPU backend has no sleep mode).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from grpo_step import ROOT, build_model
from model_scale import SHAPES, gpu_memory_used_mib, reuse_model

ROLLOUT = dict(prompts=16, generations=8, new_tokens=256)


def used_gib() -> float:
    return gpu_memory_used_mib() / 1024


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return round(time.perf_counter() - t0, 3)


def measure(model_dir: str) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    from vllm_train.engine.kv_budget import rollout_kv_cache_gib

    kv_gib = rollout_kv_cache_gib(model_dir, ROLLOUT["prompts"], ROLLOUT["generations"], ROLLOUT["new_tokens"])
    before = used_gib()
    llm = LLM(model=model_dir, dtype="bfloat16", enable_sleep_mode=True, enable_lora=True, max_lora_rank=16,
              kv_cache_memory_bytes=int(kv_gib * (1 << 30)), seed=0)
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(10 + i, 60 + i))} for i in range(8)]

    def tokens():
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]

    reference = tokens()
    row = {"kv_cache_gib": kv_gib, "gpu_used_gib": {"before_engine": before, "awake": used_gib()}, "seconds": {}}
    row["seconds"]["sleep_1"] = timed(lambda: llm.sleep(level=1))
    row["gpu_used_gib"]["asleep_1"] = used_gib()
    row["seconds"]["wake_1"] = timed(llm.wake_up)
    row["gpu_used_gib"]["awake_after_1"] = used_gib()
    row["same_greedy_tokens_after_level_1"] = tokens() == reference
    row["seconds"]["sleep_2"] = timed(lambda: llm.sleep(level=2))
    row["gpu_used_gib"]["asleep_2"] = used_gib()
    # level 2 discarded the weights: waking gives the memory back; a trainer would then reload its weights
    row["seconds"]["wake_2_without_reload"] = timed(llm.wake_up)
    row["device"] = torch.cuda.get_device_name(0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--model-dir", help="a model built there by model_scale.py --keep-models (else built now)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="sleep-levels-"))
    model_dir.mkdir(parents=True, exist_ok=True)
    params = reuse_model(model_dir) or build_model({**SHAPES[args.shape], "dtype": "bfloat16"}, model_dir)
    row = {"shape": args.shape, "params": params, **measure(str(model_dir))}
    used = row["gpu_used_gib"]
    print(f"{args.shape} ({params / 1e9:.2f}B), KV {row['kv_cache_gib']:.2f} GiB: GPU in use awake "
          f"{used['awake']:.1f} GiB, asleep level 1 {used['asleep_1']:.1f}, level 2 {used['asleep_2']:.1f}; "
          f"sleep/wake level 1 {row['seconds']['sleep_1']:.2f}/{row['seconds']['wake_1']:.2f} s; "
          f"same greedy tokens after level 1: {row['same_greedy_tokens_after_level_1']}")
    out = ROOT / "benchmarks" / "results" / f"sleep_levels_{args.shape}_cuda.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"  -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
