"""`vllm-train dpo`: preference optimization (DPO / IPO / hinge) of a LoRA adapter."""

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
from vllm_train.config import DPOConfig

DESCRIPTION = """\
Train a LoRA adapter on preference pairs with Direct Preference Optimization and write it in PEFT
format to --output-dir (served by vLLM as is).

Data (.jsonl, .json or .parquet, or --dataset-name ORG/NAME from the hub), one pair per line:
  {"prompt": "...", "chosen": "...", "rejected": "..."}
  {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
  {"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...]}   (implicit prompt:
      their longest shared message prefix; a string "prompt" next to them is not read: UltraFeedback)
  {"chosen": "Q ... A1", "rejected": "Q ... A2"}   (implicit prompt: the shared text, cut at a word boundary)
Only completion tokens count; prompt and padding never do.

The reference model is the base model (the adapter switched off: no second copy in memory). With
--adapter (e.g. an SFT adapter) training starts from that adapter and the reference is that adapter:
its log-probs are computed once, before the first step.

Losses (--loss):  sigmoid  DPO, -log sigmoid(beta * h); with --label-smoothing e: conservative DPO
                  ipo      (h - 1/(2 beta))^2
                  hinge    max(0, 1 - beta * h)
                  --rpo-alpha a adds a * NLL(chosen) to any of them (RPO)
where h = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)].

Logged (metrics.jsonl, tb/, loss.png): loss, rewards/accuracy (share of pairs whose implicit reward
beta * log(pi/ref) is higher for chosen), rewards/margin, rewards/chosen|rejected, logps/*; with
--eval-data the same on held-out pairs after each epoch. Also written: resolved_config.json,
checkpoints/step-N/ (resume with --resume-from latest).
"""

EXAMPLE = """\
example (the shipped toy world: the model forgets the carry; the pairs prefer the right sum):
  vllm-train dpo --model vllm_train/assets/tiny-llama --data vllm_train/assets/data/prefs_train.jsonl \\
      --eval-data vllm_train/assets/data/prefs_eval.jsonl --output-dir runs/dpo \\
      --beta 0.5 --learning-rate 3e-3 --batch-size 32 --gradient-accumulation-steps 1 --max-steps 600 \\
      --rank 16 --alpha 32 --rpo-alpha 1.0 \\
      --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
  vllm-train eval --model vllm_train/assets/tiny-llama --adapter runs/dpo \\
      --data vllm_train/assets/data/rl_eval.jsonl
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dpo", help="preference optimization (DPO/IPO/hinge) of a LoRA adapter",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p, "preference pairs", "held-out pairs: reward accuracy/margin after each epoch")
    p.add_argument("--adapter", metavar="DIR", help="start from this PEFT adapter (e.g. SFT); it becomes the "
                   "reference" + ADAPTER_HELP)
    add_output_args(p)
    add_config_args(p, DPOConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vllm_train.data.preference import PreferenceDataset
    from vllm_train.models import check_examples_fit, load_tokenizer
    from vllm_train.trainers.dpo import DPOTrainer

    config = config_from_args(args, DPOConfig, {"output_dir": args.output_dir})
    train_source, eval_source = data_sources(args)
    model_dir = resolve_model_args(args)
    output = check_output_dir(args.output_dir, config.resume_from, args.overwrite, "adapter",
                              command_inputs(args, model_dir))
    tokenizer = load_tokenizer(model_dir)
    train_set = PreferenceDataset(train_source, tokenizer, config.max_length)  # validates every record first
    eval_set = PreferenceDataset(eval_source, tokenizer, config.max_length) if eval_source else None
    for source, data in ((train_source, train_set), (eval_source, eval_set)):
        if data is not None:
            check_examples_fit(model_dir, data, str(source))
    trainer = DPOTrainer(args.model, config, adapter=args.adapter, progress=not args.no_progress,
                         revision=args.revision)
    trainer.setup_training()
    output.prepare()  # every input read and checked: only now may --overwrite clear the earlier run
    final = trainer.train(train_set, eval_set)
    print(f"adapter written to {args.output_dir} ({trainer.global_step} steps, loss {final.get('loss', 0):.4f}, "
          f"train reward accuracy {final.get('rewards/accuracy', 0):.3f})")
    if "eval_reward_accuracy" in final:
        print(f"  held-out reward accuracy {final['eval_reward_accuracy']:.3f}, margin "
              f"{final['eval_reward_margin']:.3f}, policy prefers chosen on {final['eval_logp_accuracy']:.1%}")
    print(f"  metrics: {args.output_dir}/metrics.jsonl   curve: {args.output_dir}/loss.png")
    return 0
