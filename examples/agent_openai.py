"""Bring your own agent: any agent code that talks to a `vllm-train serve` replica through the `openai`
client produces the episodes; the trainer learns from what the server sampled and publishes each new
adapter version back to the server, which the agent then talks to.

    .venv/bin/python examples/agent_openai.py [--steps 15]

The agent here is a "try again" loop on the toy world: it asks the sum, and when the answer is wrong the
"user" says "try again" once. Every request asks for the server's token ids and log-probs
(``extra_body={"return_token_ids": True}``, ``logprobs=True``); `EpisodeRecorder` stitches the turns into
one token array (the "try again" tokens masked out of the loss) and `RLHFTrainer.train_on_episodes` makes
one GRPO update per batch of groups. Prints held-out greedy accuracy (on the server) before -> after.
"""

import argparse
import os
import re
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from vllm_train import LoRATrainConfig, RLHFConfig, RLHFTrainer
from vllm_train.agents.recorded import EpisodeRecorder
from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.config import ALL_LINEAR_MODULES
from vllm_train.data.io import load_records
from vllm_train.evaluation import toy_accuracy
from vllm_train.toy import correctness_reward

GROUP_SIZE, PROMPTS_PER_STEP = 8, 16


def start_server(api_key: str) -> tuple[subprocess.Popen, str]:
    """One `vllm-train serve` replica on a free loopback port; returns (process, base URL)."""
    env = dict(os.environ, VLLM_TRAIN_API_KEY=api_key)
    proc = subprocess.Popen([sys.executable, "-m", "vllm_train.cli", "serve", "--model", str(TINY_MODEL),
                             "--port", "0", "--max-lora-rank", "8"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    url = None
    for line in proc.stdout:
        url = url or (m[1] if (m := re.match(r"replica \d+: (http://\S+)/v1", line)) else None)
        if line.startswith("ready in"):
            return proc, url
    raise SystemExit("vllm-train serve did not start")


def episode(client: OpenAI, model: str, record: dict):
    """One conversation of the agent, recorded token for token; its reward: the last answer is the sum."""
    recorder, messages = EpisodeRecorder(), list(record["prompt"])
    for turn in range(2):
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=1.0,
                                                  logprobs=True, extra_body={"return_token_ids": True})
        answer = recorder.add_response(response)
        reward = correctness_reward(messages, answer, record)
        if reward or turn == 1:
            return recorder.episode(reward)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "try again"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--output-dir", default="runs/example-agent-openai")
    args = parser.parse_args()

    api_key = secrets.token_hex(16)
    os.environ["VLLM_TRAIN_API_KEY"] = api_key  # the trainer publishes its adapters with it
    server, url = start_server(api_key)
    try:
        lora = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES), learning_rate=2e-3,
                               batch_size=128, warmup_ratio=0.0, lr_scheduler="constant", output_dir=args.output_dir)
        config = RLHFConfig(lora_config=lora, rollout_batch_size=PROMPTS_PER_STEP, group_size=GROUP_SIZE,
                            max_new_tokens=8, temperature=1.0, seed=0, rollout_servers=[url])
        trainer = RLHFTrainer(str(TINY_MODEL), config=config)  # no reward: the episodes bring theirs
        client = OpenAI(base_url=f"{url}/v1", api_key=api_key)
        records, eval_file = load_records(data_file("rl_train.jsonl")), data_file("rl_eval.jsonl")
        before = toy_accuracy(trainer.engine, eval_file, trainer.sync_adapter()[0])["accuracy"]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:  # the agent's conversations run concurrently, as agents do
            for step in range(args.steps):
                model = trainer.sync_adapter()[0].name  # the newest version, published to the server
                batch = records[step * PROMPTS_PER_STEP:(step + 1) * PROMPTS_PER_STEP]
                jobs = [r for r in batch for _ in range(GROUP_SIZE)]
                episodes = list(pool.map(episode, [client] * len(jobs), [model] * len(jobs), jobs))
                stats = trainer.train_on_episodes([episodes[g:g + GROUP_SIZE]
                                                   for g in range(0, len(episodes), GROUP_SIZE)])
                turns = sum(e.turns for e in episodes) / len(episodes)
                print(f"step {step + 1}: reward {stats['reward_mean']:.3f}, turns/episode {turns:.2f}, "
                      f"mismatch |dlogp| {stats['mismatch_abs_logp']:.1e}", flush=True)
        after = toy_accuracy(trainer.engine, eval_file, trainer.sync_adapter()[0])["accuracy"]
        trainer.save_checkpoint(args.output_dir)
        print(f"\nagent episodes through the openai client: held-out accuracy {before:.1%} -> {after:.1%} "
              f"({args.steps} steps, {time.perf_counter() - t0:.0f} s); adapter in {args.output_dir}")
        trainer.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
