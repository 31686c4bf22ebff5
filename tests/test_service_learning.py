"""The service learns the toy task when driven by the unmodified tinker SDK, with the loops of
examples/tinker_sft.py and examples/tinker_rl.py (accuracy sampled through the SDK's SamplingClient, i.e.
vLLM serving each new adapter version): SFT gains as much as the in-process SFT trainer with the same
settings, and importance-sampling RL on the toy reward raises accuracy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from vllm_train.assets import data_file  # noqa: E402
from vllm_train.service.config import ServiceConfig  # noqa: E402
from vllm_train.service.server import build_service, start_in_thread  # noqa: E402

KEY = "tml-learning-key-0123456789"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.vllm


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def url(tiny_model, engine, monkeypatch_module, tmp_path_factory):
    config = ServiceConfig(model=tiny_model, port=0, max_adapters=4, max_lora_rank=16, api_keys=(KEY,),
                           state_dir=str(tmp_path_factory.mktemp("state")))
    running = start_in_thread(build_service(config, engine=engine))
    monkeypatch_module.setenv("TINKER_API_KEY", KEY)
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_sft_through_the_sdk_gains_as_much_as_the_sft_trainer(url, tiny_model, engine, tmp_path):
    from vllm_train import CausalLMDataset, LoRATrainConfig, LoRATrainer
    from vllm_train.evaluation import toy_accuracy

    steps, batch, lr = 100, 16, 1e-3
    got = _example("tinker_sft").main(url, tiny_model, steps, batch, lr,
                                      adam=types.AdamParams(learning_rate=lr, beta2=0.999, eps=1e-8))
    assert got["after"] >= got["before"] + 0.2, got
    # the same settings in-process: rank 8, alpha 32 (Tinker's), attention + MLP + LM head, constant lr,
    # AdamW (0.9, 0.999, 1e-8), no clipping, 16 examples a step, 100 steps
    config = LoRATrainConfig(rank=8, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj", "lm_head"],
                             learning_rate=lr, batch_size=batch, gradient_accumulation_steps=1, warmup_ratio=0.0,
                             lr_scheduler="constant", max_grad_norm=1e9, max_steps=steps, report_to=["none"],
                             output_dir=str(tmp_path / "sft"))
    trainer = LoRATrainer(tiny_model, config)
    trainer.setup_training()
    records = [json.loads(line) for line in open(data_file("sft_train.jsonl"))]
    trainer.train(CausalLMDataset(records, trainer.tokenizer, 128))
    trainer.save_lora(tmp_path / "adapter")
    ref = engine.load_adapter(tmp_path / "adapter", family="sft-trainer")
    held_out = [json.loads(line) for line in open(data_file("sft_eval.jsonl"))][:64]
    trained = toy_accuracy(engine, held_out, adapter=ref)["accuracy"]
    engine.remove_adapter(ref)
    print(f"in-process SFT trainer, same settings: {trained:.1%}")
    assert got["after"] >= trained - 0.1, (got, trained)


def test_importance_sampling_rl_through_the_sdk_raises_accuracy(url, tiny_model):
    got = _example("tinker_rl").main(url, tiny_model, steps=20, questions=8, group=8, learning_rate=1e-3)
    assert got["after"] >= got["before"] + 0.05, got


def test_the_cookbooks_supervised_loop_runs_unmodified(url, tiny_model, tmp_path):
    """tinker-cookbook's `supervised.train.main` (its loop, its dataset builder, renderer, checkpoints) against
    the service. Runs where tinker-cookbook 0.6.1 is installed (not in the dev extra: it needs tml-renderers
    >= 0.4.1, which the package index here lacks)."""
    pytest.importorskip("tinker_cookbook")
    log_path = tmp_path / "cookbook"
    _example("cookbook_sl").main(url, tiny_model, str(log_path), steps=20)
    rows = [json.loads(line) for line in open(log_path / "metrics.jsonl")]
    assert rows[-1]["train_mean_nll"] < 0.7 * rows[0]["train_mean_nll"]
    saved = [json.loads(line) for line in open(log_path / "checkpoints.jsonl")]
    assert saved[-1]["state_path"].endswith("/weights/final")
