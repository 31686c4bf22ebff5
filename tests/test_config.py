"""LoRATrainConfig validation, file loading, rank rounding for vLLM, resolved-config output."""

import json

import pytest

from vllm_train.config import (
    LoRATrainConfig,
    config_from_dict,
    engine_max_lora_rank,
    write_resolved_config,
)
from vllm_train.errors import VllmTrainError
from vllm_train.files import load_config_file


def test_defaults_match_seed():
    c = LoRATrainConfig()
    assert (c.rank, c.alpha, c.dropout, c.learning_rate, c.batch_size) == (8, 16, 0.0, 2e-4, 4)
    assert (c.gradient_accumulation_steps, c.num_epochs, c.warmup_ratio, c.max_grad_norm) == (4, 3, 0.1, 1.0)
    assert c.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert c.output_dir == "./lora_output"
    assert c.scaling == 2.0


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("rank", -3), ("alpha", 0), ("alpha", -1.0), ("dropout", 1.0), ("dropout", -0.1),
    ("learning_rate", 0.0), ("learning_rate", float("nan")), ("batch_size", 0), ("gradient_accumulation_steps", 0),
    ("num_epochs", 0), ("warmup_ratio", 1.0), ("max_grad_norm", 0.0), ("target_modules", []),
    ("lr_scheduler", "exponential"), ("precision", "fp16"), ("max_steps", 0), ("rank", 513),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(VllmTrainError, match=field):
        LoRATrainConfig(**{field: value})


@pytest.mark.parametrize("rank,served", [(1, 1), (2, 8), (8, 8), (12, 16), (17, 32), (300, 320), (512, 512)])
def test_rank_rounds_up_to_a_vllm_max_lora_rank(rank, served):
    assert LoRATrainConfig(rank=rank).engine_max_lora_rank == served == engine_max_lora_rank(rank)


def test_rslora_scaling():
    assert LoRATrainConfig(rank=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "run.yaml").write_text("rank: 16\nalpha: 32\ntarget_modules: [q_proj, v_proj]\n")
    c = config_from_dict(LoRATrainConfig, load_config_file(tmp_path / "run.yaml"))
    assert (c.rank, c.alpha, c.target_modules) == (16, 32, ["q_proj", "v_proj"])
    (tmp_path / "run.json").write_text(json.dumps({"learning_rate": "1e-3", "use_rslora": "true"}))
    c = config_from_dict(LoRATrainConfig, load_config_file(tmp_path / "run.json"))
    assert c.learning_rate == 1e-3 and c.use_rslora is True


def test_file_errors(tmp_path):
    with pytest.raises(VllmTrainError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("rank: [1,\n")
    with pytest.raises(VllmTrainError, match="bad.yaml"):
        load_config_file(tmp_path / "bad.yaml")
    with pytest.raises(VllmTrainError, match="unknown config field.*rnak"):
        config_from_dict(LoRATrainConfig, {"rnak": 4})
    with pytest.raises(VllmTrainError, match="'rank'"):
        config_from_dict(LoRATrainConfig, {"rank": "eight"})
    with pytest.raises(VllmTrainError, match="'rank'"):
        config_from_dict(LoRATrainConfig, {"rank": 2.5})


def test_resolved_config_is_written(tmp_path):
    path = write_resolved_config(LoRATrainConfig(rank=4), tmp_path / "run", model="m")
    data = json.loads(path.read_text())
    assert data["rank"] == 4 and data["model"] == "m" and data["num_epochs"] == 3
