"""One adapter validation by value (`lora.validate.validate_adapter`), used by every command that reads
an adapter: each defect gives one line naming the file and the tensor or field, exit status 2, and no
output. (`push` of the same adapters against a real server: tests/test_serve.py.)"""

from __future__ import annotations

import json

import pytest
from adapter_cases import BAD_VALUE_CASES, K_B, Q_A, make_bad_adapter

from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.cli import main


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_train.config import LoRATrainConfig
    from vllm_train.lora.injector import LoRAInjector

    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL))
    injector = LoRAInjector(LoRATrainConfig(rank=8, alpha=16))
    injector.inject(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in injector.lora_layers.values():
            lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=gen) * 0.1)
    return injector.save(tmp_path_factory.mktemp("good") / "adapter", str(TINY_MODEL))


@pytest.fixture(scope="module")
def bad_adapters(good_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {case: make_bad_adapter(good_adapter, root / case, case) for case in BAD_VALUE_CASES}


def test_good_adapter_passes(good_adapter):
    from vllm_train.lora.validate import validate_adapter

    assert validate_adapter(good_adapter, str(TINY_MODEL), max_lora_rank=8)["r"] == 8


@pytest.mark.parametrize("case", list(BAD_VALUE_CASES))
def test_each_defect_is_named(bad_adapters, case):
    from vllm_train.errors import VllmTrainError
    from vllm_train.lora.validate import validate_adapter

    with pytest.raises(VllmTrainError) as info:
        validate_adapter(bad_adapters[case], str(TINY_MODEL))
    message = str(info.value)
    assert "\n" not in message and str(bad_adapters[case]) in message and BAD_VALUE_CASES[case] in message


def test_shape_checks_need_the_base_config_only(bad_adapters):
    """Without a base model the value checks still run; the base's shapes are checked only with one."""
    from vllm_train.errors import VllmTrainError
    from vllm_train.lora.validate import validate_adapter

    validate_adapter(bad_adapters["wrong_shape"])  # a consistent A/B pair: only the base model tells
    with pytest.raises(VllmTrainError, match="non-finite"):
        validate_adapter(bad_adapters["nan_weight"])


@pytest.mark.parametrize("edit, needle", [
    (lambda c, s: c.update(r=0), "field 'r' is 0, expected an integer from 1 to 512"),
    (lambda c, s: c.update(r=8.5), "field 'r' is 8.5"),
    (lambda c, s: c.update(lora_alpha=-1), "field 'lora_alpha' is -1"),
    (lambda c, s: c.update(lora_alpha=float("nan")), "field 'lora_alpha' is nan"),
    (lambda c, s: c.update(alpha_pattern={"q_proj": float("inf")}), "field 'alpha_pattern' entry 'q_proj' is inf"),
    (lambda c, s: c.update(target_modules=[]), "field 'target_modules' is []"),
    (lambda c, s: c.update(target_modules=["k_proj", "v_proj", "o_proj"]), "which is not in adapter_config.json "
                                                                           "target_modules"),
    (lambda c, s: c.update(use_dora=True), "DoRA adapters (use_dora: true) are not supported"),
    (lambda c, s: c.update(rank_pattern={"q_proj": 4}), f"tensor {Q_A} has shape (8, 128) but adapter_config.json "
                                                        f"says rank 4"),
    (lambda c, s: s.pop(K_B), f"tensor {K_B.replace('lora_B', 'lora_A')} has no {K_B} partner"),
    (lambda c, s: s.update({K_B: s[K_B][None]}), f"tensor {K_B} has shape (1, 64, 8), expected a matrix"),
    (lambda c, s: s.update({K_B.replace("layers.0", "layers.7"): s[K_B].clone(),
                            K_B.replace("layers.0", "layers.7").replace("lora_B", "lora_A"): s[Q_A].clone()}),
     "is for layer 7 but"),
])
def test_config_and_pair_defects(good_adapter, tmp_path, edit, needle):
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_train.errors import VllmTrainError
    from vllm_train.lora.validate import validate_adapter

    bad = tmp_path / "bad"
    shutil.copytree(good_adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    state = load_file(bad / "adapter_model.safetensors")
    edit(config, state)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(VllmTrainError) as info:
        validate_adapter(bad, str(TINY_MODEL))
    assert needle in str(info.value) and "\n" not in str(info.value)


def _one_line_exit_2(argv, capsys, needle):
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and captured.out == "", captured
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


@pytest.mark.parametrize("case", list(BAD_VALUE_CASES))
def test_generate_and_eval_refuse_bad_adapters(bad_adapters, case, capsys, tmp_path):
    model, adapter = str(TINY_MODEL), str(bad_adapters[case])
    _one_line_exit_2(["generate", "--model", model, "--adapter", adapter, "--chat", "What is 1 + 1?"], capsys,
                     BAD_VALUE_CASES[case])
    out = tmp_path / "eval.json"
    for metrics in ("perplexity", "toy"):
        _one_line_exit_2(["eval", "--model", model, "--adapter", adapter, "--data", str(data_file("sft_eval.jsonl")),
                          "--metrics", metrics, "--json-out", str(out)], capsys, BAD_VALUE_CASES[case])
    assert not out.exists()


@pytest.mark.parametrize("command", ["dpo", "grpo"])
def test_training_commands_refuse_bad_starting_adapters(bad_adapters, command, capsys, tmp_path):
    data = ["--data", str(data_file("prefs_train.jsonl"))] if command == "dpo" else \
        ["--prompts", str(data_file("rl_train.jsonl")), "--reward", "vllm_train.toy:correctness_reward"]
    out = tmp_path / "run"
    steps = ["--max-steps", "1"] if command == "dpo" else ["--num-steps", "1"]
    _one_line_exit_2([command, "--model", str(TINY_MODEL), *data, "--output-dir", str(out), *steps,
                      "--adapter", str(bad_adapters["nan_weight"]), "--no-progress"], capsys, "non-finite")
    assert not out.exists()
