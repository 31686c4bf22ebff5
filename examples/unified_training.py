"""Train and generate on one engine: `TrainableEngine` (seed Phase 5).

    python examples/unified_training.py [--steps 60]

Each `train_step` updates the LoRA weights of a Hugging Face training copy; the next `generate` runs in
the one vLLM engine with exactly those weights (synced in place in well under a millisecond on known
vLLM versions, or as a fresh adapter version otherwise). Offline, on the shipped tiny model. Recipe: r8 on
every linear layer, lr 3e-3 (tiny model), batch 32, 60 steps; held-out greedy accuracy is measured on the same
engine before and after (as shipped: 49.7 % -> 80.3 %).
"""

from __future__ import annotations

import argparse

from vllm_train import LoRATrainConfig, TrainableEngine
from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.config import ALL_LINEAR_MODULES
from vllm_train.data.io import load_records
from vllm_train.evaluation import toy_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    config = LoRATrainConfig(rank=8, alpha=16, learning_rate=3e-3, target_modules=list(ALL_LINEAR_MODULES))
    engine = TrainableEngine(str(TINY_MODEL), config)
    records = load_records(data_file("sft_train.jsonl"))
    question = [{"role": "user", "content": "What is 47 + 38?"}]
    problems = data_file("rl_eval.jsonl")  # held-out: not in the SFT data

    def accuracy() -> float:  # the newest weights: the untrained adapter (= the base) at first
        return toy_accuracy(engine.engine, problems, engine.current_adapter())["accuracy"]

    before = accuracy()
    for step in range(args.steps):
        start = (step * args.batch_size) % len(records)
        metrics = engine.train_step(records[start:start + args.batch_size])
        if step % 20 == 0 or step == args.steps - 1:
            answer = engine.generate([question], temperature=0.0, max_tokens=6)[0].outputs[0].text
            print(f"step {step:3d}  loss {metrics['loss']:.4f}  sync={engine.engine.last_sync_path}  "
                  f"47 + 38 -> {answer!r}")
    print(f"held-out greedy accuracy on the same engine: {before:.1%} -> {accuracy():.1%}")
    engine.close()


if __name__ == "__main__":
    main()
