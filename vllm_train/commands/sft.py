"""`vllm-train sft`: supervised LoRA fine-tuning."""

from __future__ import annotations

import argparse

from vllm_train.commands._common import (
    ADAPTER_HELP,
    add_config_args,
    add_model_args,
    config_from_args,
    resolve_model_args,
)
from vllm_train.commands._data import add_data_args, data_sources
from vllm_train.commands._output import add_output_args, check_output_dir, command_inputs

DESCRIPTION = """\
Fine-tune a LoRA adapter on supervised data and write it in PEFT format to --output-dir
(adapter_config.json + adapter_model.safetensors), ready for vLLM's LoRARequest, `vllm serve
--lora-modules`, or PEFT.

Data (.jsonl, .json or .parquet, or --dataset-name ORG/NAME from the hub), one record per line, any of:
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
  {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}    (ShareGPT)
  {"prompt": "...", "completion": "..."}        (strings, or lists of chat messages)
  {"instruction": "...", "input": "...", "output": "..."}   (Alpaca; "input" optional)
  {"text": "..."}
Loss is taken on assistant/completion tokens only (every assistant turn of a conversation; all tokens for
"text"); padding never counts.

Also written to --output-dir: resolved_config.json, metrics.jsonl, tb/ (TensorBoard), loss.png,
checkpoints/step-N/ (resume with --resume-from latest).
"""

EXAMPLE = """\
example:
  vllm-train sft --model vllm_train/assets/tiny-llama --data vllm_train/assets/data/sft_train.jsonl \\
      --eval-data vllm_train/assets/data/sft_eval.jsonl --output-dir runs/sft --rank 8 --max-steps 100
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised LoRA fine-tuning", description=DESCRIPTION, epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p, "training data", "held-out data: loss/perplexity logged each epoch")
    p.add_argument("--adapter", metavar="DIR", help="start from this PEFT adapter instead of a fresh "
                   "one" + ADAPTER_HELP)
    add_output_args(p)
    p.add_argument("--push-to", metavar="URL[,URL...]", help="publish each saved adapter (checkpoints and final) "
                   "to these running vLLM servers as the next version of --push-name (see `vllm-train push`)")
    p.add_argument("--push-name", metavar="NAME", help="served adapter name for --push-to: versions are "
                   "NAME-v1, NAME-v2, ... (default: sft)")
    add_config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vllm_train.data.causal_lm import CausalLMDataset
    from vllm_train.models import check_examples_fit, load_tokenizer
    from vllm_train.trainers.sft import LoRATrainer

    config = config_from_args(args, fixed={"output_dir": args.output_dir})
    train_source, eval_source = data_sources(args)
    model_dir = resolve_model_args(args)
    output = check_output_dir(args.output_dir, config.resume_from, args.overwrite, "adapter",
                              command_inputs(args, model_dir))
    tokenizer = load_tokenizer(model_dir)
    train_set = CausalLMDataset(train_source, tokenizer, config.max_length)  # validates every record first
    eval_set = CausalLMDataset(eval_source, tokenizer, config.max_length) if eval_source else None
    for source, data in ((train_source, train_set), (eval_source, eval_set)):
        if data is not None:
            check_examples_fit(model_dir, data, str(source))
    trainer = LoRATrainer(args.model, config, progress=not args.no_progress,
                          on_save=_push_hook(args), revision=args.revision)
    trainer.setup_training(adapter=args.adapter)
    output.prepare()  # every input read and checked: only now may --overwrite clear the earlier run
    final = trainer.train(train_set, eval_set)
    print(f"adapter written to {args.output_dir} ({trainer.global_step} steps, "
          f"final loss {final.get('loss', float('nan')):.4f})")
    for key in ("eval_loss", "eval_perplexity"):
        if key in final:
            print(f"  {key}: {final[key]:.4f}")
    print(f"  metrics: {args.output_dir}/metrics.jsonl   curve: {args.output_dir}/loss.png")
    return 0


def _push_hook(args):
    """Publishing each saved adapter to running servers (`--push-to`)."""
    urls = getattr(args, "push_to", None)
    if not urls:
        return None
    from vllm_train.engine.publish import make_push_hook

    return make_push_hook(urls, name=getattr(args, "push_name", None) or "sft")
