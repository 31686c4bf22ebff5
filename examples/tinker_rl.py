"""Policy-gradient RL on the toy world through `vllm-train service` with the unmodified tinker SDK: sample a
group of answers per question through the SamplingClient (vLLM, with the adapter written into its slot after
every step), reward each, centre the rewards per group, and train with the `importance_sampling` loss on the
sampler's own log-probs. Start the server as in examples/tinker_sft.py, then:

    TINKER_API_KEY=$VLLM_TRAIN_API_KEY python examples/tinker_rl.py --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json

import tinker
from tinker import types

from vllm_train import toy
from vllm_train.assets import data_file

GREEDY = types.SamplingParams(max_tokens=8, temperature=0.0)


def prompt_tokens(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def greedy_accuracy(sampler, tokenizer, records: list[dict]) -> float:
    futures = [sampler.sample(types.ModelInput.from_ints(prompt_tokens(tokenizer, r["prompt"])), 1, GREEDY)
               for r in records]
    texts = [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True) for f in futures]
    return sum(toy.is_correct(t, r["answer"]) for t, r in zip(texts, records)) / len(records)


def rl_datum(prompt: list[int], seq, advantage: float) -> types.Datum:
    """Prompt + sampled answer, shifted by one; the sampler's log-probs and the advantage on the answer's
    tokens, zeros on the prompt's (which the loss then ignores)."""
    full = prompt + list(seq.tokens)
    n_prompt = len(prompt) - 1
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:],
                                       "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                                       "advantages": [0.0] * n_prompt + [advantage] * len(seq.tokens)})


def main(base_url: str | None, model: str, steps: int, questions: int, group: int, learning_rate: float,
         seed: int = 0) -> dict:
    service = tinker.ServiceClient(base_url=base_url)
    trainer = service.create_lora_training_client(base_model=model, rank=8, seed=seed).result()
    tokenizer = trainer.get_tokenizer()
    train = [json.loads(line) for line in open(data_file("rl_train.jsonl"))]
    held_out = [json.loads(line) for line in open(data_file("rl_eval.jsonl"))][:64]
    sampler = trainer.save_weights_and_get_sampling_client().result()
    before = greedy_accuracy(sampler, tokenizer, held_out)
    for step in range(steps):
        batch = train[step * questions:][:questions]
        prompts = [prompt_tokens(tokenizer, r["prompt"]) for r in batch]
        params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=seed * 100_000 + step)
        futures = [sampler.sample(types.ModelInput.from_ints(p), group, params) for p in prompts]
        data, rewards = [], []
        for prompt, record, future in zip(prompts, batch, futures):
            seqs = future.result().sequences
            scores = [float(toy.is_correct(tokenizer.decode(s.tokens, skip_special_tokens=True), record["answer"]))
                      for s in seqs]
            rewards += scores
            mean = sum(scores) / len(scores)
            data += [rl_datum(prompt, s, r - mean) for s, r in zip(seqs, scores) if r != mean]
        if data:
            trainer.forward_backward(data, "importance_sampling")
            trainer.optim_step(types.AdamParams(learning_rate=learning_rate)).result()
        sampler = trainer.save_weights_and_get_sampling_client().result()  # the new weights, in vLLM's slot
        print(f"step {step}: mean reward {sum(rewards) / len(rewards):.3f} ({len(data)} datums)", flush=True)
    after = greedy_accuracy(sampler, tokenizer, held_out)
    print(f"greedy accuracy on {len(held_out)} held-out questions: {before:.1%} -> {after:.1%}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="the service (default: $TINKER_BASE_URL)")
    parser.add_argument("--model", default="vllm_train/assets/tiny-llama", help="the service's --model, as given")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--questions", type=int, default=8, help="questions per step")
    parser.add_argument("--group", type=int, default=8, help="answers sampled per question")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    main(args.base_url, args.model, args.steps, args.questions, args.group, args.learning_rate)
