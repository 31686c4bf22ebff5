"""Train once, serve immediately: our adapter in real vLLM gives the trainer's/PEFT's numbers (fp32 on CPU:
exactly; bf16 on CUDA: against the same model in bf16, tests/tolerances.py)."""

import pytest
import torch
from tolerances import as_served, assert_served_greedy, assert_served_logprobs, reference_logprobs

from vllm_train.config import LoRATrainConfig
from vllm_train.data.io import load_records
from vllm_train.data.tokenize import completion_ids, prompt_ids
from vllm_train.trainers.sft import LoRATrainer

pytestmark = pytest.mark.vllm
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def trained(tiny_model, engine, tmp_path_factory):
    from vllm_train.assets import data_file

    out = tmp_path_factory.mktemp("sft")
    cfg = LoRATrainConfig(rank=8, alpha=16, target_modules=ALL_LINEAR, learning_rate=3e-3, batch_size=16,
                          gradient_accumulation_steps=1, max_steps=30, max_length=64, output_dir=str(out))
    trainer = LoRATrainer(tiny_model, cfg, engine=engine, progress=False, tensorboard=False)
    trainer.train(load_records(data_file("sft_train.jsonl"))[:480])
    return trainer, out


@pytest.fixture(scope="module")
def eval_records():
    from vllm_train.assets import data_file

    return load_records(data_file("sft_eval.jsonl"))[:12]


def test_vllm_logprobs_equal_peft_within_1e4(trained, engine, eval_records, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, out = trained
    peft_model = as_served(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval())
    adapter = engine.load_adapter(out, family="parity")
    served, expected, base = [], [], []
    for r in eval_records:
        p = prompt_ids(trainer.tokenizer, r["messages"][:-1])
        c = completion_ids(trainer.tokenizer, r["messages"][:-1], r["messages"][-1:])
        served.append(engine.completion_logprobs(p, c, adapter))
        expected.append(reference_logprobs(peft_model, p, c))
        base.append(engine.completion_logprobs(p, c, None))
    served, expected, base = torch.cat(served), torch.cat(expected), torch.cat(base)
    assert_served_logprobs(served, expected, alternative=base, what="vLLM vs PEFT")
    assert (served - base).abs().max().item() > 1e-2  # and the adapter really changes the numbers


def test_vllm_greedy_text_equals_peft_generate(trained, engine, eval_records, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, out = trained
    tok = trainer.tokenizer
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    adapter = engine.load_adapter(out, family="greedy")
    prompts = [r["messages"][:-1] for r in eval_records]
    ours = [s[0] for s in engine.generate(prompts, adapter, temperature=0.0, max_tokens=6)]
    assert_served_greedy(peft_model, tok, [prompt_ids(tok, p) for p in prompts],
                         [(s.text, s.token_ids) for s in ours], 6)


def test_trainer_generate_serves_the_newest_weights_from_one_engine(trained, engine, eval_records):
    trainer, _ = trained
    pairs = [(prompt_ids(trainer.tokenizer, r["messages"][:-1]),
              completion_ids(trainer.tokenizer, r["messages"][:-1], r["messages"][-1:])) for r in eval_records[:4]]
    first = trainer.generate([eval_records[0]["messages"][:-1]], max_tokens=4, temperature=0.0)
    assert trainer.engine is engine and first[0].outputs[0].text
    ref_before = trainer.current_adapter()
    stale = torch.cat([reference_logprobs(trainer.model, p, c) for p, c in pairs])
    with torch.no_grad():  # change the weights as a training step would
        for lora in trainer.injector.lora_layers.values():
            lora.lora_b.mul_(1.5)
    trainer._adapter_version += 1
    ref_after = trainer.current_adapter()
    if engine.last_sync_path == "public":  # a new version is a new name and id (prefix cache, LoRA cache)
        assert ref_after.name != ref_before.name and ref_after.id != ref_before.id
    else:  # the fast path rewrote the pinned slot of the same version in place
        assert engine.last_sync_path == "fast"
    served = torch.cat([engine.completion_logprobs(p, c, ref_after) for p, c in pairs])
    expected = torch.cat([reference_logprobs(trainer.model, p, c) for p, c in pairs])
    assert_served_logprobs(served, expected, alternative=stale, what="newest weights")
    assert trainer.current_adapter() is ref_after  # unchanged weights are not re-published


def test_generate_with_lora_path_and_base(trained, eval_records, tiny_model):
    """`lora_path=DIR` serves that adapter and ``"base"`` the bare model: each equals its HF greedy text
    (PEFT with the adapter; the plain base model), and the two differ."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, out = trained
    tok = trainer.tokenizer
    prompts = [r["messages"][:-1] for r in eval_records]
    with_path = [o.outputs[0] for o in trainer.generate(prompts, lora_path=str(out), max_tokens=6, temperature=0.0)]
    base = [o.outputs[0] for o in trainer.generate(prompts, lora_path="base", max_tokens=6, temperature=0.0)]
    ids = [prompt_ids(tok, p) for p in prompts]
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert_served_greedy(base_model, tok, ids, [(o.text, list(o.token_ids)) for o in base], 6)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    assert_served_greedy(peft_model, tok, ids, [(o.text, list(o.token_ids)) for o in with_path], 6)
    assert [o.text for o in with_path] != [o.text for o in base]  # the adapter changed an answer: the path was used


def test_texts_decoded_outside_vllm_equal_vllm_detokenized_texts(engine):
    """With log-probs and no stop strings, `generate` skips vLLM's detokenizer and decodes the texts
    itself: the texts must equal vLLM's own for the same sampled tokens (same seed)."""
    prompts = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(47, 38), (5, 91), (60, 40)]]
    kw = dict(n=4, temperature=1.0, max_tokens=12, seed=7)
    ours = engine.generate(prompts, **kw, logprobs=True)  # detokenize=False in vLLM, decoded here
    vllms = engine.generate(prompts, **kw, logprobs=False)  # vLLM's own detokenizer
    for ours_p, vllm_p in zip(ours, vllms):
        for a, b in zip(ours_p, vllm_p):
            assert a.token_ids == b.token_ids
            assert a.text == b.text
            assert len(a.logprobs) == len(a.token_ids)
    assert any(s.text for p in ours for s in p)


def test_flat_sampled_logprobs_equal_vllms_per_token_entries(engine):
    """`generate` asks vLLM for flat log-prob lists; for the same seeded samples they equal vLLM's classic
    per-token dict entries, which the fallback reader handles too."""
    from vllm_train.engine.llm import sampled_token_logprobs

    prompts = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(47, 38), (5, 91)]]
    ours = engine.generate(prompts, n=3, temperature=1.0, max_tokens=10, seed=11, logprobs=True)
    classic = engine.generate_raw(prompts, dict(n=3, temperature=1.0, max_tokens=10, seed=11, logprobs=0))
    for ours_p, out in zip(ours, classic):
        for sample, comp in zip(ours_p, out.outputs):
            assert sample.token_ids == list(comp.token_ids)
            expected = [comp.logprobs[t][tok].logprob for t, tok in enumerate(comp.token_ids)]
            assert isinstance(comp.logprobs, list)  # the per-token dicts, not FlatLogprobs
            assert sample.logprobs == expected
            assert sampled_token_logprobs(comp.logprobs, comp.token_ids) == expected
