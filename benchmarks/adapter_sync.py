"""Adapter sync latency: trainer step done -> the next vLLM generate uses the new weights.

For each of `--syncs` training steps, on ONE in-process engine:
  fast   family "fast" (pinned slot): `sync_adapter` writes A and B*scaling into vLLM's slot buffers
  public family "public" (the engine keeps one slot unpinned, so this family always takes the public
         path): fresh PEFT dir on tmpfs + new LoRARequest; vLLM loads it into a slot on the next generate
and times `sync` (the trainer's live LoRA state + sync_adapter; on CUDA after a device synchronize),
`sync+gen` (sync and the next generate with the new version) and a plain generate of the same batch with
an unchanged adapter.
`overhead` = p50(sync+gen) - p50(plain): what a new version costs on top of the generate itself (the
plain generate runs after a prefix-cache reset, so neither side gets cache hits on its prompts), and
`fast_write_only` = the batched slot write alone.

Conditions run in separate processes (one engine per process): quiet, and under a background CPU load
(`--load-procs` busy processes), each with vLLM's default OpenMP threads and with
OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spin-waiting, set before torch is imported).

  python benchmarks/adapter_sync.py                         # CPU: tiny model, all conditions
  python benchmarks/adapter_sync.py --model qwen2-0.5b --conditions quiet   # the H200 run
Writes a ratio table to stdout and JSON to benchmarks/results/adapter_sync.json (or --out).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Random-init model shapes (token-id prompts; the tiny model's tokenizer files ride along).
SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),  # CPU dry run
}


def build_model_dir(name: str, dtype: str) -> str:
    """The shipped tiny model, or a random-init Qwen2 of a known shape saved to a temp dir."""
    from vllm_train.assets import TINY_MODEL

    if name == "tiny":
        return str(TINY_MODEL)
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    config = Qwen2Config(**SHAPES[name], max_position_embeddings=4096, rope_theta=1e6,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(TINY_MODEL) / f, out / f)
    return str(out)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summary(ms: list[float]) -> dict:
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "mean": statistics.fmean(ms), "n": len(ms)}


# ---- child: one engine, one condition ----------------------------------------------------------------
def measure(args) -> dict:
    import torch

    from vllm_train.config import LoRATrainConfig
    from vllm_train.engine.llm import EngineOptions, VLLMEngine
    from vllm_train.evaluation import completion_logprobs
    from vllm_train.models import load_policy

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    model_dir = build_model_dir(args.model, dtype)
    config = LoRATrainConfig(rank=args.rank, alpha=2 * args.rank, target_modules=ALL_LINEAR,
                             precision="bf16" if cuda else "fp32")
    engine = VLLMEngine(model_dir, EngineOptions(max_lora_rank=config.engine_max_lora_rank, max_loras=2,
                                                 max_model_len=None if args.model == "tiny" else 512,
                                                 enforce_eager=not cuda or None))
    model, _, injector = load_policy(model_dir, config)
    params = injector.get_trainable_params()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    peft_config = injector.peft_config(model_dir)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = 284  # the tokenizer's ids: safe for every model shape here
    prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    train_ids = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=gen).to(device)

    def train_step() -> None:
        logits = model(input_ids=train_ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), train_ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def generate(ref) -> None:
        engine.generate_raw(prompts, {"max_tokens": args.max_tokens, "temperature": 0.0, "detokenize": False}, ref)

    def sync(family: str):  # what the trainers time as sync_ms: the live state, then sync_adapter
        start = time.perf_counter()
        state, shards = injector.sync_states()
        ref = engine.sync_adapter(state, peft_config, family, shards)
        if cuda:
            torch.cuda.synchronize()
        return ref, (time.perf_counter() - start) * 1e3

    refs = {family: sync(family)[0] for family in ("fast", "public")}  # first versions, warm-up
    for _ in range(3):
        for family in ("fast", "public"):
            refs[family] = sync(family)[0]
            generate(refs[family])
    times = {f"{family}_{what}": [] for family in ("fast", "public") for what in ("sync", "sync_gen")}
    times["plain_gen"], paths = [], {"fast": set(), "public": set()}
    for _ in range(args.syncs):
        for family in ("fast", "public"):
            train_step()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            refs[family], sync_ms = sync(family)
            paths[family].add(engine.last_sync_path)
            generate(refs[family])
            times[f"{family}_sync"].append(sync_ms)
            times[f"{family}_sync_gen"].append((time.perf_counter() - start) * 1e3)
            engine.reset_prefix_cache()  # the plain generate recomputes its prompts too (no cache hits)
            start = time.perf_counter()
            generate(refs[family])
            times["plain_gen"].append((time.perf_counter() - start) * 1e3)

    # the slot write alone (what the fast path adds to the trainer's step), on the fast family's writer
    writer = engine._slot_writers.get("fast")
    if writer is not None:
        state = injector.peft_state_dict(live=True)
        a_tensors = [state[f"base_model.model.{n}.lora_A.weight"] for n in writer.names]
        b_tensors = [state[f"base_model.model.{n}.lora_B.weight"] for n in writer.names]
        times["fast_write_only"] = []
        for _ in range(args.syncs):
            start = time.perf_counter()
            writer.write_tensors(a_tensors, b_tensors)
            if cuda:
                torch.cuda.synchronize()
            times["fast_write_only"].append((time.perf_counter() - start) * 1e3)

    # the served weights are the trainer's newest ones, on both paths
    half = len(prompts[0]) // 2
    prompt_ids, completion_ids = prompts[0][:half], prompts[0][half:]  # works for --batch 1 too
    with torch.no_grad():
        expected = completion_logprobs(model, prompt_ids, completion_ids)
    gaps = {family: (engine.completion_logprobs(prompt_ids, completion_ids, refs[family]) - expected).abs()
            .max().item() for family in ("fast", "public")}
    result = {name: summary(ms) for name, ms in times.items()}
    plain = result["plain_gen"]["p50"]
    for family in ("fast", "public"):
        result[f"{family}_overhead_ms"] = result[f"{family}_sync_gen"]["p50"] - plain
        result[f"{family}_paths"] = sorted(paths[family])
        result[f"{family}_max_logprob_gap"] = gaps[family]
    result["fast_slot_tensors"] = 2 * len(writer.names) if writer else 0
    result["adapter_params"] = sum(p.numel() for p in params)
    result["fast_sync_unavailable"] = engine.fast_sync_unavailable
    engine.close()
    return result


# ---- parent: conditions in subprocesses, table, JSON -------------------------------------------------
def busy_loop() -> None:
    while True:
        pass


def run_condition(args, load: bool, passive: bool) -> dict:
    env = dict(os.environ)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--rank", str(args.rank),
           "--syncs", str(args.syncs), "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
           "--max-tokens", str(args.max_tokens)]
    loaders = []
    if load:
        import multiprocessing as mp

        loaders = [mp.get_context("spawn").Process(target=busy_loop, daemon=True) for _ in range(args.load_procs)]
        for p in loaders:
            p.start()
    try:
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    finally:
        for p in loaders:
            p.terminate()
            p.join()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"condition load={load} passive={passive} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(background_load_procs=args.load_procs if load else 0, omp_wait_policy_passive=passive,
                  loadavg_1min_at_start=load_before)
    return result


def table(results: dict) -> str:
    rows = ["| condition | plain gen p50 | fast write p50 | fast sync p50/p95 | fast overhead | public sync p50/p95 | "
            "public overhead | public/fast overhead |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = r["public_overhead_ms"] / r["fast_overhead_ms"] if r["fast_overhead_ms"] > 0 else float("inf")
        write = r.get("fast_write_only", {}).get("p50", float("nan"))
        rows.append(f"| {name} | {r['plain_gen']['p50']:.2f} ms | {write:.3f} ms | {r['fast_sync']['p50']:.3f} / "
                    f"{r['fast_sync']['p95']:.3f} ms | {r['fast_overhead_ms']:.2f} ms | "
                    f"{r['public_sync']['p50']:.2f} / "
                    f"{r['public_sync']['p95']:.2f} ms | {r['public_overhead_ms']:.2f} ms | {ratio:.1f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", *SHAPES])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--syncs", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--conditions", default="quiet,loaded,quiet-passive,loaded-passive")
    parser.add_argument("--load-procs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1500)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapter_sync.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    import torch

    from vllm_train.engine.llm import vllm_version

    results = {}
    report = {"model": args.model, "rank": args.rank, "syncs": args.syncs, "batch": args.batch,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "vllm": vllm_version(),
              "torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu x{os.cpu_count()}", "conditions": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in args.conditions.split(","):
        results[name] = run_condition(args, load=name.startswith("loaded"), passive=name.endswith("passive"))
        print(f"{name}: fast overhead {results[name]['fast_overhead_ms']:.2f} ms, "
              f"public overhead {results[name]['public_overhead_ms']:.2f} ms", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # after each condition: slow CPUs
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
