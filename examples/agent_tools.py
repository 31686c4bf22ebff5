"""A toy agent learns to use a tool: GRPO over episodes in which the model may call a calculator.

    .venv/bin/python examples/agent_tools.py [--steps 30]

The base model, tiny-llama-tools (built by ``scripts/build_toy_world.py --tools-only``), adds two-digit
numbers but forgets the units carry most of the time, and knows one more habit it rarely uses: offered
tools, it sometimes writes ``<tool_call>{"name": "add", "arguments": {"a": 47, "b": 38}}</tool_call>``
instead of an answer. Each episode gets a fresh `Calculator`, whose ``add`` tool never forgets the carry;
the trainer parses the call, runs it, appends the result as a ``tool`` message (the chat template's own
tokens, masked out of the loss) and lets the model answer. The reward is the toy world's correctness of
that last answer, so the episodes that called the tool win their group, and GRPO makes calling it the
habit. Prints held-out greedy accuracy and the share of episodes that called the tool, before -> after:
52.3 % -> 98.3 % and 0.7 % -> 99.7 % in 30 steps (31 s on the 2-core CPU, shared with other work).
"""

import argparse
import time

from vllm_train import LoRATrainConfig, RLHFConfig, RLHFTrainer
from vllm_train.assets import TINY_TOOLS_MODEL, data_file
from vllm_train.config import ALL_LINEAR_MODULES
from vllm_train.toy import is_correct
from vllm_train.trainers.rl import load_prompt_records
from vllm_train.trainers.rl_sampling import sample_rollout


class Calculator:
    """The environment, one instance per episode: a calculator whose one tool adds exactly."""

    def reset(self, **row) -> None:
        # row is the prompt record (prompt, answer); the question already says everything, so no text is
        # appended to it. Counting calls here is only for show: the trainer counts them in its metrics too.
        self.calls = 0

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first addend
            b: the second addend
        """
        self.calls += 1
        return a + b


def held_out(trainer: RLHFTrainer, records: list[dict]) -> tuple[float, float]:
    """(accuracy, share of episodes that called a tool) of greedy episodes on `records`."""
    adapter, _ = trainer.sync_adapter()
    rollout = sample_rollout(trainer.engine, trainer.tokenizer, records, trainer.config, None, adapter,
                             trainer.agent, greedy=True)
    correct = sum(is_correct(text, r["answer"]) for text, r in zip(rollout.completions, records))
    used = sum(stats["tool_calls"] > 0 for stats in rollout.episode_stats)
    return correct / len(records), used / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", default="runs/example-agent-tools")
    args = parser.parse_args()

    lora = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES), learning_rate=2e-3,
                           batch_size=128, warmup_ratio=0.0, lr_scheduler="constant", output_dir=args.output_dir)
    # Two model turns at most: the call, then the answer that reads the tool's result. A call is ~12
    # tokens; the episode (call, result, answer) stays under 40.
    config = RLHFConfig(lora_config=lora, algorithm="grpo", rollout_batch_size=16, group_size=8,
                        max_new_tokens=24, max_turns=2, max_episode_tokens=64, temperature=1.0, eval_steps=10,
                        seed=0)
    trainer = RLHFTrainer(str(TINY_TOOLS_MODEL), config=config, reward_fn="vllm_train.toy:correctness_reward",
                          environment_factory=Calculator)
    eval_records = load_prompt_records(data_file("rl_eval.jsonl"), "eval dataset")
    acc_before, tools_before = held_out(trainer, eval_records)
    t0 = time.perf_counter()
    last = trainer.train(data_file("rl_train.jsonl"), num_steps=args.steps)
    seconds = time.perf_counter() - t0
    acc_after, tools_after = held_out(trainer, eval_records)
    print(f"\nagent with a calculator tool (GRPO, {args.steps} steps, {seconds:.0f} s):")
    print(f"  held-out accuracy {acc_before:.1%} -> {acc_after:.1%}")
    print(f"  episodes that called the tool {tools_before:.1%} -> {tools_after:.1%}")
    print(f"  last step: {last['tool_calls']:.2f} tool calls and {last['episode_turns']:.2f} model turns per "
          f"episode, {last['tool_errors']:.2f} tool errors, "
          f"train/serve mismatch |dlogp| {last['mismatch_abs_logp']:.1e}")
    print(f"  adapter + metrics.jsonl in {args.output_dir}")
    trainer.close()


if __name__ == "__main__":  # vLLM spawns workers: keep the guard
    main()
