"""`vllm-train eval`: toy-skill accuracy (vLLM), perplexity and token accuracy, base vs adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_train.commands._common import ADAPTER_HELP, add_model_args, resolve_model_args
from vllm_train.commands._data import add_source_args, data_source

DESCRIPTION = """\
Evaluate the base model and (with --adapter) the adapter on a data file (--data) or a split of a
hub dataset (--dataset-name ORG/NAME [--dataset-config C] [--split S]), records in any format sft/dpo read:
  toy accuracy   greedy answers from vLLM checked against the known sums, for records
                 {"prompt", "answer"} (RL sets) or {"messages"} ending in the answer (SFT sets)
  perplexity     exp(mean NLL) over completion tokens, and next-token accuracy, for any SFT-shaped
                 data ({"messages"} | {"prompt","completion"} | {"text"} | ShareGPT | Alpaca), with the HF model
  reward acc.    for preference data {"prompt","chosen","rejected"}: how often the model's
                 log-prob ratio to the base prefers `chosen` (needs --adapter)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy / perplexity of base vs adapter", description=DESCRIPTION,
                       epilog="example:\n  vllm-train eval --model vllm_train/assets/tiny-llama --adapter runs/sft "
                       "--data vllm_train/assets/data/sft_eval.jsonl",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter to compare with the base model" + ADAPTER_HELP)
    p.add_argument("--allow-other-base", action="store_true", help="apply --adapter although its adapter_config.json "
                   "names another base model (its shapes are still checked against --model)")
    add_source_args(p, "eval data", split_use="to evaluate")
    p.add_argument("--metrics", default="auto",
                   help="comma list of toy,perplexity,reward (default: what fits the data)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--json-out", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vllm_train.data.io import load_records
    from vllm_train.errors import VllmTrainError
    from vllm_train.files import check_can_write
    from vllm_train.lora.validate import OTHER_BASE_HINT, validate_adapter

    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise VllmTrainError(f"{flag}: {value} is invalid (an integer >= 1)")
    source = data_source(args)  # a path, or a HubDataset: what every reader below takes
    if args.json_out:
        check_can_write(Path(args.json_out), "--json-out", directory=False)  # not after the whole evaluation
    args.model = resolve_model_args(args)  # local directories from here on (eval saves nothing)
    if args.adapter:
        validate_adapter(args.adapter, args.model, check_base_name=not args.allow_other_base,
                         allow_hint=OTHER_BASE_HINT)
    records = load_records(source, what="eval set")
    wanted = _pick_metrics(args.metrics, records[0])
    _check_records(args, source, wanted)
    results: dict[str, dict] = {}
    if "perplexity" in wanted:
        results.update(_perplexity(args, source))
    if "reward" in wanted:
        if not args.adapter:
            raise VllmTrainError("reward accuracy on preference data needs --adapter (the policy to compare)")
        from vllm_train.evaluation import preference_eval

        results.update(preference_eval(args.model, args.adapter, source, args.max_length, args.batch_size))
    if "toy" in wanted:
        results.update(_toy(args, source))
    _print_table(results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _check_records(args, source, wanted: list[str]) -> None:
    """Every record checked for what the metrics read, before any model loads (one-line errors)."""
    from vllm_train.data.causal_lm import check_sft_record
    from vllm_train.data.io import load_records
    from vllm_train.data.preference import check_preference_record
    from vllm_train.evaluation import TOY_MAX_TOKENS, toy_problems
    from vllm_train.models import check_prompt_lengths

    if "perplexity" in wanted:
        load_records(source, check_sft_record, what="eval set")
    if "reward" in wanted:
        load_records(source, check_preference_record, what="eval set")
    if "toy" in wanted:
        prompts = [prompt for prompt, _ in toy_problems(source)]
        check_prompt_lengths(args.model, prompts, "record", str(source), TOY_MAX_TOKENS)


def _pick_metrics(spec: str, first: dict) -> list[str]:
    from vllm_train.errors import VllmTrainError

    if spec != "auto":
        wanted = [m.strip() for m in spec.split(",") if m.strip()]
        bad = [m for m in wanted if m not in ("toy", "perplexity", "reward")]
        if bad:
            raise VllmTrainError(f"--metrics: unknown metric(s) {', '.join(bad)} (toy, perplexity, reward)")
        return wanted
    if "chosen" in first:
        return ["reward"]
    if "answer" in first:
        return ["toy"]
    if "messages" in first:
        return ["perplexity", "toy"] if _ends_in_integer(first) else ["perplexity"]
    return ["perplexity"]


def _ends_in_integer(record: dict) -> bool:
    from vllm_train import toy

    return toy.parse_answer(str(record["messages"][-1].get("content", ""))) is not None


def _perplexity(args, source) -> dict:
    import torch

    from vllm_train.config import LoRATrainConfig
    from vllm_train.data.causal_lm import CausalLMDataset
    from vllm_train.evaluation import lm_metrics
    from vllm_train.models import config_for_adapter, load_policy

    config = config_for_adapter(args.adapter) if args.adapter else LoRATrainConfig()
    model, tokenizer, injector = load_policy(args.model, config, args.adapter)
    data = CausalLMDataset(source, tokenizer, args.max_length)
    out = {}
    with injector.disable_adapter(), torch.no_grad():
        out["base"] = lm_metrics(model, tokenizer, data, args.batch_size)
    if args.adapter:
        out["adapter"] = lm_metrics(model, tokenizer, data, args.batch_size)
    return {f"perplexity/{k}": v for k, v in out.items()}


def _toy(args, source) -> dict:
    from vllm_train.config import engine_max_lora_rank
    from vllm_train.engine.llm import EngineOptions, VLLMEngine
    from vllm_train.evaluation import toy_accuracy
    from vllm_train.models import adapter_rank

    rank = adapter_rank(args.adapter, args.model) if args.adapter else 8
    engine = VLLMEngine(args.model, EngineOptions(max_lora_rank=engine_max_lora_rank(rank),
                                                  enable_lora=bool(args.adapter)))
    out = {"toy/base": toy_accuracy(engine, source)}
    if args.adapter:
        out["toy/adapter"] = toy_accuracy(engine, source, engine.load_adapter(args.adapter))
    return out


def _print_table(results: dict[str, dict]) -> None:
    for name, metrics in results.items():
        shown = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"{name:22s} {shown}")
