"""`vllm-train grpo`: critic-free RL (GRPO, Dr.GRPO, DAPO, RLOO) of a LoRA adapter with vLLM rollouts."""

from __future__ import annotations

import argparse

from vllm_train.commands._rl import add_rl_args, run_rl

DESCRIPTION = """\
Reinforcement learning of a LoRA adapter from a reward function. Each step: the newest adapter goes to
vLLM, vLLM samples --group-size completions for each of --rollout-batch-size prompts, the reward
function scores them, group-relative advantages drive a clipped policy-gradient update.

  --algorithm grpo      advantages (r - mean) / std per prompt; loss averaged per sequence
  --algorithm dr_grpo   advantages r - mean; loss summed over tokens / (sequences x max_new_tokens)
  --algorithm dapo      token-level loss (pair with --clip-range-high 0.28 --dynamic-sampling true:
                        groups whose rewards are all equal are dropped, and up to
                        --dynamic-sampling-rounds more rollouts refill the batch)
  --algorithm rloo      leave-one-out baseline; token-level loss

Prompts (.jsonl/.json/.parquet, or --dataset-name ORG/NAME): {"prompt": "text" or [chat messages], ...any
fields your reward reads}.
Reward: a Python function `(prompt, completion, example) -> float` given as module:function or
path/to/file.py:function; `example` is the prompt's record. The toy world's: vllm_train.toy:correctness_reward.

Multi-turn episodes: --environment MODULE:CLASS (or FILE.py:CLASS) talks to the model between its turns,
one instance per episode: reset(**record), tools (its other public methods, called in the chat template's
format, see --tool-parser), respond(text) -> next user message or None, get_reward() -> float (then
--reward may be left out; given, it scores the last assistant turn). Each turn generates from the episode's
token ids; environment tokens are masked out of the loss. --max-turns and --max-episode-tokens end
episodes (counted as truncated); metrics add episode_turns, tool_calls, tool_errors, env_tokens,
episodes_truncated, template_fallbacks, parse_failures.

Rollouts on running servers: --rollout-servers URL[,URL...] samples from vLLM OpenAI servers started
with `vllm-train serve` (on this or other machines) instead of a vLLM engine in this process. Each
adapter version is published to every replica (all or none) before it is sampled, and the prompts are
spread over the replicas; a replica that fails mid-rollout has its prompts retried on the others, and a
rollout no replica can serve stops the run with an error naming each replica. Servers on other machines
need $VLLM_TRAIN_STAGE_DIR on a filesystem they share, at the same path; API key: $VLLM_TRAIN_API_KEY.
--temperature other than 1 needs the servers started with --logprobs-mode processed_logprobs (checked).

Written to --output-dir: the adapter (PEFT format, servable by vLLM), resolved_config.json,
metrics.jsonl (reward, KL to reference, length, sync time, rollout tok/s, train/serve mismatch),
tb/, curves.png, checkpoints/step-N/ (resume with --resume-from latest).
"""

EXAMPLE = """\
example (toy world, a few minutes on a laptop CPU):
  vllm-train grpo --model vllm_train/assets/tiny-llama --prompts vllm_train/assets/data/rl_train.jsonl \\
      --eval-prompts vllm_train/assets/data/rl_eval.jsonl --reward vllm_train.toy:correctness_reward \\
      --output-dir runs/grpo --num-steps 40 --rank 8 --learning-rate 2e-3 --batch-size 128 \\
      --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --max-new-tokens 8
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grpo", help="GRPO / Dr.GRPO / DAPO / RLOO with vLLM rollouts", description=DESCRIPTION,
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", metavar="MODULE:FUNCTION",
                   help="reward function (required unless the --environment class defines get_reward)")
    add_rl_args(p, skip=())
    p.set_defaults(run=lambda args: run_rl(args, algorithm=None))
