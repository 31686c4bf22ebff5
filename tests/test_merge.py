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
PROGRESS_BARS = ("Loading weights", "Writing model")  # transformers' own, on stderr


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


def merge_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith(PROGRESS_BARS)]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_merge_overwrite_replaces_only_an_earlier_merge(tiny_model, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["merge", "--model", tiny_model, "--adapter", adapter[0], "--output-dir", str(out)]
    assert cli_main(args) == 2
    assert "is not empty" in merge_error(capsys)
    assert cli_main([*args, "--overwrite"]) == 2  # not a vllm-train output: nothing is written into it
    assert "holds no vllm-train run" in merge_error(capsys)
    assert snapshot(out) == {"keep.txt": b"x"}
    (out / "keep.txt").unlink()
    assert cli_main(args) == 0
    (out / "keep.txt").write_text("x")  # the user's file beside the merged model
    assert cli_main([*args, "--overwrite"]) == 0
    assert (out / "config.json").is_file() and (out / "keep.txt").read_text() == "x"
    assert not list(tmp_path.glob(".merged.merge-tmp-*"))


def test_merge_overwrite_never_deletes_its_own_adapter(tiny_model, adapter, tmp_path, capsys):
    import shutil

    from vllm_train import run_manifest

    run = Path(shutil.copytree(adapter[0], tmp_path / "run"))  # an adapter in a run directory, as sft leaves it
    run_manifest.start(run)
    for path in run.iterdir():
        run_manifest.note(path)
    before = snapshot(run)
    assert cli_main(["merge", "--model", tiny_model, "--adapter", str(run), "--output-dir", str(run),
                     "--overwrite"]) == 2
    assert f"--adapter {run} is in --output-dir" in merge_error(capsys)
    assert snapshot(run) == before


def test_merge_refuses_weights_that_are_not_finite(tiny_model, adapter, tmp_path, capsys, monkeypatch):
    """A finite adapter x 1e30 is refused by the magnitude check; with that check off, B @ A overflows fp32 and
    the write guard refuses the merged weights. Nothing is written; an earlier merge stays whole."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_train.lora import validate

    huge = Path(shutil.copytree(adapter[0], tmp_path / "huge"))
    state = {k: v * 1e30 for k, v in load_file(str(huge / "adapter_model.safetensors")).items()}
    assert all(torch.isfinite(v).all() for v in state.values())
    save_file(state, str(huge / "adapter_model.safetensors"))
    out = tmp_path / "merged"
    args = ["merge", "--model", tiny_model, "--adapter", str(huge), "--output-dir", str(out)]
    assert cli_main(args) == 2
    assert "the adapter's update has norm" in merge_error(capsys) and not out.exists()
    monkeypatch.setattr(validate, "_check_magnitude", lambda *a: None)  # what the write guard is for
    assert cli_main(args) == 2
    assert "non-finite value" in merge_error(capsys) and not out.exists()
    assert cli_main([*args[:4], adapter[0], *args[5:]]) == 0
    before = snapshot(out)
    assert cli_main([*args, "--overwrite"]) == 2
    assert "model.safetensors: not written" in merge_error(capsys)
    assert snapshot(out) == before and not list(tmp_path.glob(".merged.merge-tmp-*"))


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
