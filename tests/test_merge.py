"""`vllm-train merge`: base + adapter as one model directory, against PEFT's merge, HF and vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tolerances import EXACT_ENGINE_DTYPE, EXACT_ENGINE_ENV, EXACT_TOL

from vllm_train.cli import main as cli_main
from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig
from vllm_train.trainers.sft import LoRATrainer

TEXT = "What is 47 + 38? 85"


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> tuple[str, torch.Tensor]:
    """A random adapter with non-zero B on every linear, and our model's logits with it (fp32, CPU)."""
    root = tmp_path_factory.mktemp("merge")
    trainer = LoRATrainer(tiny_model, LoRATrainConfig(rank=4, alpha=8, target_modules=list(ALL_LINEAR_MODULES),
                                                      output_dir=str(root / "run"), precision="fp32"), progress=False)
    trainer.setup_training()
    torch.manual_seed(1)
    with torch.no_grad():
        for lora in trainer.injector.lora_layers.values():
            lora.lora_b.normal_(std=0.05)
    path = trainer.save_lora(root / "adapter")
    ids = trainer.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = trainer.model.cpu()(input_ids=ids).logits  # on the CPU, like the merged model's below
    return str(path), logits


def test_merged_model_equals_base_plus_adapter_and_peft_merge(tiny_model, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, our_logits = adapter
    out = tmp_path / "merged"
    assert cli_main(["merge", "--model", tiny_model, "--adapter", path, "--output-dir", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(out)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
    # fp32 rounding only: (W + s B A) x vs W x + s B (A x); logits reach |17| here, so 1e-6 relative (~1.5e-5)
    scale = our_logits.abs().max().item()
    assert (logits - our_logits).abs().max().item() <= 1e-6 * scale
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path).merge_and_unload()
    theirs = peft_merged.state_dict()
    ours = merged.state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    assert not list(tmp_path.glob(".merged.merge-tmp-*"))


def test_vllm_serves_the_merged_model(tiny_model, adapter, tmp_path, run_result_script):
    """vLLM loads the merged directory as a plain model; its prompt log-probs equal HF's (fp32, 1e-4: no
    LoRA, so the engine serves fp32 on CUDA too)."""
    out = tmp_path / "merged"
    assert cli_main(["merge", "--model", tiny_model, "--adapter", adapter[0], "--output-dir", str(out)]) == 0
    result = run_result_script(Path(__file__), [str(out)], EXACT_ENGINE_ENV, timeout=600)
    assert result["max_abs_diff"] < EXACT_TOL, result


def test_merge_refuses_a_non_empty_output_dir_unless_overwrite(tiny_model, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["merge", "--model", tiny_model, "--adapter", adapter[0], "--output-dir", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0]
    assert cli_main([*args, "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def _vllm_vs_hf(model_dir: str) -> dict:
    """(Run in a fresh interpreter.) vLLM's prompt log-probs of TEXT on the merged model vs HF's."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_train.engine.llm import EngineOptions, VLLMEngine
    from vllm_train.losses.causal_lm import shifted_token_logprobs

    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT).input_ids
    engine = VLLMEngine(model_dir, EngineOptions(enable_lora=False, dtype=EXACT_ENGINE_DTYPE))
    served = engine.completion_logprobs(ids[:1], ids[1:])
    engine.close()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    hf, _ = shifted_token_logprobs(logits, torch.tensor([ids]))
    print("RESULT " + json.dumps({"max_abs_diff": (served - hf[0].double()).abs().max().item()}))


if __name__ == "__main__":
    _vllm_vs_hf(sys.argv[1])
