"""`vllm-train merge`: write base model + LoRA adapter as one merged model directory."""

from __future__ import annotations

import argparse

from vllm_train.commands._common import ADAPTER_HELP, add_model_args, resolve_model_args

DESCRIPTION = """\
Merge a PEFT LoRA adapter into its base model and write a full Hugging Face model directory
(safetensors + config + tokenizer) that transformers and vLLM load without PEFT or LoRA support. The
merge is computed in fp32 and saved in the base checkpoint's dtype unless --dtype says otherwise; the
files go to a temporary directory first, so an interrupted merge leaves nothing half-written. Weights that
are not finite after the cast (an adapter that overflows the dtype) are refused and nothing is written.
"""

EXAMPLE = """\
example:
  vllm-train merge --model vllm_train/assets/tiny-llama --adapter runs/sft --output-dir runs/sft-merged
  vllm-train generate --model runs/sft-merged --chat "What is 47 + 38?"
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model (a plain model directory)",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, " (the base)", chat_template=False)
    p.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter trained on --model" + ADAPTER_HELP)
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the merged model goes")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: the base checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge (or run) in --output-dir: "
                   "the files its run_manifest.json lists, once the new model is complete; other files stay")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vllm_train.merging import merge_adapter

    model_dir = resolve_model_args(args)  # hub ids (--model, --adapter) -> their local snapshot directories
    out = merge_adapter(model_dir, args.adapter, args.output_dir, args.dtype, args.overwrite)
    print(f"merged model written to {out}")
    return 0
