"""Basic LoRA fine-tuning, then serving the adapter with vLLM in the same process.

    python examples/basic_lora_finetune.py [--max-steps 200] [--output-dir runs/basic]

Runs offline on the shipped tiny model (two-digit addition that forgets the carry) in well under a minute
on 2 CPU cores. Recipe: r8/alpha 16 on every linear layer, lr 3e-3 (a tiny model; 1e-4..2e-4 for a real
one), batch 32, 200 steps, cosine with 10 % warmup. Prints held-out greedy accuracy before -> after
(as shipped: 49.7 % -> 84.0 %) and the eval perplexity.
"""

from __future__ import annotations

import argparse

from vllm_train import LoRATrainConfig, LoRATrainer
from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.evaluation import toy_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--output-dir", default="runs/basic")
    args = parser.parse_args()

    config = LoRATrainConfig(rank=8, alpha=16, learning_rate=3e-3, batch_size=32, gradient_accumulation_steps=1,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"],
                             max_steps=args.max_steps, max_length=64, output_dir=args.output_dir)
    trainer = LoRATrainer(str(TINY_MODEL), config)
    problems = data_file("rl_eval.jsonl")  # held-out: not in the SFT data
    before = toy_accuracy(trainer.engine, problems)["accuracy"]  # the base model
    trainer.setup_training()
    metrics = trainer.train(data_file("sft_train.jsonl"), eval_dataset=data_file("sft_eval.jsonl"))
    path = trainer.save_lora(args.output_dir)  # PEFT format: loads in PEFT, vllm.LLM and `vllm serve`
    print(f"final train loss {metrics['loss']:.4f}, eval perplexity {metrics['eval_perplexity']:.3f}")
    after = toy_accuracy(trainer.engine, problems, trainer.engine.load_adapter(path, family="saved"))["accuracy"]
    print(f"held-out greedy accuracy (vLLM): {before:.1%} -> {after:.1%}")
    questions = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(47, 38), (19, 23), (66, 7)]]
    for q, out in zip(questions, trainer.generate(questions, lora_path=str(path), temperature=0.0, max_tokens=6)):
        print(f"{q[0]['content']} -> {out.outputs[0].text}")
    trainer.close()


if __name__ == "__main__":  # vLLM may spawn worker processes: keep the guard
    main()
