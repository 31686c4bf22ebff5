"""TrainableEngine and TrainableModelLoader (vLLM's default loading under load_format="trainable") on real
vLLM. Each case builds its own engine, so each runs in a subprocess (the pytest process holds the session's
one in-process engine)."""

from __future__ import annotations

import os
import textwrap

import torch
from tolerances import ON_CUDA, assert_served_logprobs

SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {tests_dir!r})
    from tolerances import ENGINE_DTYPE, reference_logprobs
    from vllm_train.assets import data_file
    from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig
    from vllm_train.data.io import load_records
    from vllm_train.engine.llm import EngineOptions
    from vllm_train.trainers.trainable import TrainableEngine

    if __name__ == "__main__":
        case, tiny_model = sys.argv[1], sys.argv[2]
        options = EngineOptions(max_lora_rank=8, max_loras=2, dtype=ENGINE_DTYPE, in_process=(case == "in-process"))
        config = LoRATrainConfig(rank=8, alpha=16, learning_rate=1e-3, target_modules=list(ALL_LINEAR_MODULES))
        engine = TrainableEngine(tiny_model, config, engine_options=options)
        records = load_records(data_file("sft_train.jsonl"))[:4]
        prompt_ids = engine.engine.prompt_token_ids(records[0]["messages"][:-1])
        completion_ids = engine.tokenizer(records[0]["messages"][-1]["content"], add_special_tokens=False).input_ids
        losses, served, expected, paths = [], [], [], []
        for _ in range(4):
            losses.append(engine.train_step(records)["loss"])
            outputs = engine.generate([records[0]["messages"][:-1]], max_tokens=4, temperature=0.0)
            paths.append(engine.engine.last_sync_path)
            adapter = engine.current_adapter()
            served.append(engine.engine.completion_logprobs(prompt_ids, completion_ids, adapter).tolist())
            expected.append(reference_logprobs(engine.model, prompt_ids, completion_ids).tolist())
        info = engine.engine.llm.collective_rpc("trainable_loader_info")[0]
        print("RESULT " + json.dumps({{
            "losses": losses, "served": served, "expected": expected, "paths": paths,
            "text": outputs[0].outputs[0].text,
            "worker": info, "this_pid": os.getpid(), "shared_base": engine.shared_base.summary()}}), flush=True)
        engine.close()
        os._exit(0)  # skip interpreter teardown: see the same line in test_fast_sync.py
''')


def assert_each_step_served(result: dict) -> None:
    for served, expected in zip(result["served"], result["expected"], strict=True):
        assert_served_logprobs(torch.tensor(served), torch.tensor(expected))


def run_case(case: str, tiny_model: str, tmp_path, run_result_script) -> dict:
    script = tmp_path / "trainable_engine_case.py"
    script.write_text(SCRIPT.format(tests_dir=os.path.dirname(__file__)))
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if case == "in-process" else "1"}
    return run_result_script(script, [case, tiny_model], env, timeout=900)


def test_trainable_engine_in_process(tiny_model, tmp_path, run_result_script):
    result = run_case("in-process", tiny_model, tmp_path, run_result_script)
    # the engine was loaded through TrainableModelLoader, in this process
    assert result["worker"] == {"pid": result["this_pid"], "loaded_by_trainable_loader": True,
                                "model_class": "LlamaForCausalLM"}
    assert result["losses"][-1] < result["losses"][0]
    assert result["paths"] == ["public", "fast", "fast", "fast"]  # first version loads, then slot writes
    assert_each_step_served(result)  # each generate serves the weights of the step just taken
    # the base: views of vLLM's tensors on CUDA (4 layers x 7 linears + embedding + head), a copy on CPU
    assert result["shared_base"].startswith("base weights shared with vLLM: 30 tensors" if ON_CUDA
                                            else "base held twice: training on CPU")
    assert isinstance(result["text"], str)


def test_trainable_engine_multiprocess_registers_loader_in_worker(tiny_model, tmp_path, run_result_script):
    result = run_case("multiprocess", tiny_model, tmp_path, run_result_script)
    worker = result["worker"]  # loaded through TrainableModelLoader in the engine-core process
    assert worker["pid"] != result["this_pid"] and worker["loaded_by_trainable_loader"]
    assert worker["model_class"] == "LlamaForCausalLM"
    assert result["paths"] == ["public"] * 4  # fast path unavailable across processes: public fallback
    assert result["shared_base"].startswith("base held twice: " + (
        "the vLLM engine runs in another process" if ON_CUDA else "training on CPU"))
    assert result["losses"][-1] < result["losses"][0]
    assert_each_step_served(result)
