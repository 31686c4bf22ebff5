"""Seeded sampling gives each prompt of a batch its own noise (issue #16, item 0).

vLLM's seeded sampler draws a request's noise from that request's seed. The RL loop used to pass one
seed for the whole step, so on a model with flat next-token distributions every prompt got the same
completions, and GRPO learned nothing. Oracle: vLLM's own samples on a random-init model whose
next-token distributions are (nearly) uniform -- the case where shared noise shows as the same token ids
for different prompts. The engine runs in a subprocess (one vLLM engine per process; the session's
engine serves the shipped model).
"""

from __future__ import annotations

import os
import textwrap

from vllm_train.engine.llm import request_seeds


def test_request_seeds_are_distinct_reproducible_and_in_range():
    seeds = request_seeds(7, 256)
    assert seeds == request_seeds(7, 256)
    # vLLM gives a request's n children seeds seed + j: no two requests of this or the next batch overlap
    children = {s + j for s in seeds + request_seeds(8, 256) for j in range(8)}
    assert len(children) == 2 * 256 * 8
    assert all(0 <= s < 2**62 for s in seeds)
    assert request_seeds(None, 3) == [None, None, None]


FLAT_MODEL_SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {tests_dir!r})
    from pathlib import Path
    from tiny_models import build_flat_llama

    if __name__ == "__main__":
        from vllm_train.config import LoRATrainConfig, RLHFConfig
        from vllm_train.engine.llm import EngineOptions, VLLMEngine
        from vllm_train.rewards import TOY_REWARD
        from vllm_train.trainers.rl import RLHFTrainer

        model = str(build_flat_llama(Path(sys.argv[1])))
        engine = VLLMEngine(model, EngineOptions(max_lora_rank=8))
        prompts = ["What is 12 + 30?", "Hello there", "7 7 7 7"]
        out = engine.generate(prompts, n=2, temperature=1.0, max_tokens=8, seed=7)
        again = engine.generate(prompts, n=2, temperature=1.0, max_tokens=8, seed=7)
        raw = engine.generate_raw(prompts, dict(temperature=1.0, max_tokens=8, seed=7))
        config = RLHFConfig(lora_config=LoRATrainConfig(rank=8, alpha=16, output_dir=sys.argv[1] + "-run"),
                            rollout_batch_size=4, group_size=4, max_new_tokens=8, seed=0)
        trainer = RLHFTrainer(model, config=config, reward_fn=TOY_REWARD, engine=engine, progress=False)
        records = [{{"prompt": p, "answer": 0}} for p in prompts + ["Say something"]]
        rollouts = [trainer.generate_rollouts(records, seed=123).completion_ids for _ in range(2)]
        print("RESULT " + json.dumps({{
            "samples": [[s.token_ids for s in per_prompt] for per_prompt in out],
            "again": [[s.token_ids for s in per_prompt] for per_prompt in again],
            "raw_first": [list(o.outputs[0].token_ids) for o in raw],
            "rollouts": rollouts}}), flush=True)
        trainer.close()
        engine.close()
        os._exit(0)  # skip interpreter teardown (vLLM's client threads; see test_fast_sync)
''')


def test_seeded_prompts_do_not_share_noise_on_a_flat_model(tmp_path, run_result_script):
    script = tmp_path / "flat_model_seeds.py"
    script.write_text(FLAT_MODEL_SCRIPT.format(tests_dir=os.path.dirname(__file__)))
    result = run_result_script(script, [str(tmp_path / "flat")], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                               timeout=600)
    first = [tuple(per_prompt[0]) for per_prompt in result["samples"]]
    second = [tuple(per_prompt[1]) for per_prompt in result["samples"]]
    assert len(set(first)) == 3, first  # before the fix: one sequence for all three prompts
    assert len(set(second)) == 3, second
    assert all(a != b for a, b in zip(first, second))  # a prompt's n samples differ too
    assert result["again"] == result["samples"]  # and a seeded batch is reproducible
    assert len({tuple(t) for t in result["raw_first"]}) == 3  # generate_raw (LoRATrainer.generate) too
    completions = [tuple(c) for c in result["rollouts"][0]]
    # an RL step: 4 prompts x 4 samples of near-uniform noise over 284 tokens are all distinct
    assert len(set(completions)) == 16, completions
    assert result["rollouts"][1] == result["rollouts"][0]



def test_a_seeded_batch_over_the_token_budget_samples_on_cpu(engine):
    # 160 prompts x 40 tokens = 6,400 prompt tokens, over vLLM's per-step budget of 4,096: with chunked
    # prefill, the prompt split across steps had its seeded generator rewound, which CPU generators refuse
    # ("CPU Generator does not use offset"); the engine turns chunking off on CPU.
    prompts = [[5 + (i + j) % 200 for j in range(40)] for i in range(160)]

    def sample():
        outputs = engine.generate(prompts, None, n=1, max_tokens=4, seed=3, temperature=1.0, top_p=1.0)
        return [list(s.token_ids) for (s,) in outputs]

    first = sample()
    assert len(first) == 160 and first == sample()  # seeded: the same samples again
