"""SFT on the toy world through `vllm-train service` with the unmodified tinker SDK: the loop runs here, the
model on the server. Start the server first, then run this with the same key:

    export VLLM_TRAIN_API_KEY=tml-$(python -c 'import secrets; print(secrets.token_hex(16))')
    vllm-train service --model vllm_train/assets/tiny-llama &
    TINKER_API_KEY=$VLLM_TRAIN_API_KEY python examples/tinker_sft.py --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json

import tinker
from tinker import types

from vllm_train import toy
from vllm_train.assets import data_file


def sft_datum(tokenizer, messages: list[dict]) -> types.Datum:
    """Targets shifted by one; weight 1 on the assistant's tokens only."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False))
    full = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False))
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:], "weights": weights})


def accuracy(sampler, tokenizer, records: list[dict]) -> float:
    """Greedy accuracy on toy questions, sampled through the SDK's SamplingClient (vLLM on the server)."""
    futures = []
    for r in records:
        prompt = tokenizer.encode(tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True,
                                                                tokenize=False))
        futures.append(sampler.sample(types.ModelInput.from_ints(prompt), 1,
                                      types.SamplingParams(max_tokens=8, temperature=0.0)))
    answers = [toy.parse_answer(r["messages"][-1]["content"]) for r in records]
    texts = [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True) for f in futures]
    return sum(toy.is_correct(text, answer) for text, answer in zip(texts, answers)) / len(records)


def main(base_url: str | None, model: str, steps: int, batch_size: int, learning_rate: float,
         adam: types.AdamParams | None = None) -> dict:
    adam = adam or types.AdamParams(learning_rate=learning_rate)
    service = tinker.ServiceClient(base_url=base_url)  # the key: $TINKER_API_KEY
    trainer = service.create_lora_training_client(base_model=model, rank=8, seed=0).result()
    tokenizer = trainer.get_tokenizer()
    train = [json.loads(line) for line in open(data_file("sft_train.jsonl"))]
    held_out = [json.loads(line) for line in open(data_file("sft_eval.jsonl"))][:64]
    before = accuracy(trainer.save_weights_and_get_sampling_client().result(), tokenizer, held_out)
    for step in range(steps):
        batch = [sft_datum(tokenizer, r["messages"]) for r in train[step * batch_size:][:batch_size]]
        fwd_bwd = trainer.forward_backward(batch, "cross_entropy")  # both submitted before waiting: one
        optim = trainer.optim_step(adam)  # trip through the queue
        loss = fwd_bwd.result().metrics["loss:sum"] / sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
        optim.result()
        if step % 10 == 0:
            print(f"step {step}: loss {loss:.3f} per target token", flush=True)
    after = accuracy(trainer.save_weights_and_get_sampling_client().result(), tokenizer, held_out)
    print(f"greedy accuracy on {len(held_out)} held-out questions: {before:.1%} -> {after:.1%}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="the service (default: $TINKER_BASE_URL)")
    parser.add_argument("--model", default="vllm_train/assets/tiny-llama", help="the service's --model, as given")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    main(args.base_url, args.model, args.steps, args.batch_size, args.learning_rate)
