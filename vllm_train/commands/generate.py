"""`vllm-train generate`: sample from the base model or an adapter with vLLM."""

from __future__ import annotations

import argparse
import json
import math

from vllm_train.commands._common import ADAPTER_HELP, add_model_args, resolve_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with vLLM (base model or an adapter)",
                       description="Generate completions with one vLLM engine. Prompts are raw text "
                       "(--prompt) or single user turns rendered with the model's chat template (--chat).",
                       epilog='example:\n  vllm-train generate --model vllm_train/assets/tiny-llama '
                       '--adapter runs/sft --chat "What is 47 + 38?"',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter (omit for the base model)" + ADAPTER_HELP)
    p.add_argument("--allow-other-base", action="store_true", help="apply --adapter although its adapter_config.json "
                   "names another base model (its shapes are still checked against --model)")
    p.add_argument("--prompt", nargs="+", default=[], metavar="TEXT", help="raw text prompt(s)")
    p.add_argument("--chat", nargs="+", default=[], metavar="TEXT", help="user message(s), chat template applied")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vllm_train.config import MAX_SEED, engine_max_lora_rank
    from vllm_train.engine.llm import EngineOptions, VLLMEngine
    from vllm_train.errors import VllmTrainError
    from vllm_train.lora.validate import OTHER_BASE_HINT, validate_adapter
    from vllm_train.models import check_prompt_lengths

    prompts = list(args.prompt) + [[{"role": "user", "content": c}] for c in args.chat]
    if not prompts:
        raise VllmTrainError("give at least one --prompt or --chat")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise VllmTrainError(f"--seed: {args.seed} is invalid (an integer from 0 to {MAX_SEED})")
    if args.max_tokens < 1 or args.n < 1:
        raise VllmTrainError("--max-tokens and --n must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise VllmTrainError(f"--temperature: {args.temperature} is invalid (a finite number >= 0)")
    if not 0 < args.top_p <= 1:
        raise VllmTrainError(f"--top-p: {args.top_p} is invalid (0 < p <= 1)")
    args.model = resolve_model_args(args)  # local directories from here on
    check_prompt_lengths(args.model, prompts, "prompt")
    rank = validate_adapter(args.adapter, args.model, check_base_name=not args.allow_other_base,
                            allow_hint=OTHER_BASE_HINT)["r"] if args.adapter else 8
    engine = VLLMEngine(args.model, EngineOptions(max_lora_rank=engine_max_lora_rank(rank),
                                                  enable_lora=bool(args.adapter)))
    adapter = engine.load_adapter(args.adapter) if args.adapter else None
    results = engine.generate(prompts, adapter, n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_tokens=args.max_tokens, seed=args.seed)
    for prompt, samples in zip(prompts, results):
        shown = prompt if isinstance(prompt, str) else prompt[0]["content"]
        for s in samples:
            if args.json:
                print(json.dumps({"prompt": shown, "completion": s.text, "finish_reason": s.finish_reason}))
            else:
                print(f"{shown!r} -> {s.text!r}")
    return 0
