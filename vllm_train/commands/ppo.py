"""`vllm-train ppo`: PPO (value head, GAE, KL penalty) of a LoRA adapter with vLLM rollouts."""

from __future__ import annotations

import argparse

from vllm_train.commands._rl import add_rl_args, run_rl

DESCRIPTION = """\
PPO on a LoRA adapter: vLLM samples completions with the newest adapter, a reward model or a reward
function scores them, per-token rewards = score on the last token - kl_coef * KL to the base model,
a value head on the policy gives GAE advantages (whitened), and clipped policy + value losses update
the adapter and the head (--ppo-epochs passes of --num-minibatches steps per rollout batch).

Reward: --reward module:function (a Python function `(prompt, completion, example) -> float`), or
--reward-model DIR (a sequence-classification reward model, e.g. from `vllm-train rm`; scored
in-process with its Hugging Face forward, next to the one vLLM engine).
"""

EXAMPLE = """\
example (toy world):
  vllm-train ppo --model vllm_train/assets/tiny-llama --prompts vllm_train/assets/data/rl_train.jsonl \\
      --reward vllm_train.toy:correctness_reward --output-dir runs/ppo --num-steps 40 --kl-coef 0.02 \\
      --learning-rate 5e-3 --batch-size 128 --max-new-tokens 8 --group-size 4
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppo", help="PPO with vLLM rollouts (reward model or reward function)",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    reward = p.add_mutually_exclusive_group()  # neither: the --environment's get_reward (checked in run_rl)
    reward.add_argument("--reward-model", metavar="DIR", help="reward model directory, or a hub id ORG/NAME")
    reward.add_argument("--reward", metavar="MODULE:FUNCTION", help="reward function")
    add_rl_args(p, skip=("algorithm",))
    p.set_defaults(run=lambda args: run_rl(args, algorithm="ppo"))
