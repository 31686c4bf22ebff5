"""Sampling through the service with the unmodified tinker SDK: after a training step the SDK's
SamplingClient gets the trained adapter's log-probs (sampled and prompt tokens, against transformers + PEFT
with the trained weights), a seed repeats a sample, a snapshot replaced by newer weights is refused, named
sampler weights and the base model are sampled by path and name. Uses the session's one vLLM engine."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_served_logprobs

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from vllm_train.service.config import ServiceConfig  # noqa: E402
from vllm_train.service.server import build_service, start_in_thread  # noqa: E402

KEY = "tml-sampling-key-0123456789"
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def running(tiny_model, engine, tmp_path_factory):
    service = build_service(ServiceConfig(model=tiny_model, port=0, max_adapters=8, max_lora_rank=16,
                                          state_dir=str(tmp_path_factory.mktemp("state")), api_keys=(KEY,)),
                            engine=engine)
    running = start_in_thread(service)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(running):
    with tinker.ServiceClient(base_url=running.url, api_key=KEY) as client:  # closed: its heartbeats stop
        yield client


def _trained(client, tiny_model, seed, train_unembed=True):
    tc = client.create_lora_training_client(base_model=tiny_model, rank=8, seed=seed,
                                            train_unembed=train_unembed).result()
    tok = tc.get_tokenizer()
    data = []
    for text in ("What is 2 + 3? 5", "What is 11 + 30? 41"):
        ids = tok.encode(text)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}))
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return tc, tok


def _hf_logprobs(tiny_model, state, ids: list[int], start: int) -> torch.Tensor:
    """transformers (+ PEFT holding `state`, or the base when None): log-probs of ids[start:]."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if state is not None:
        targets = sorted({k.split(".")[-3] for k in state})
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=targets))
        set_peft_model_state_dict(model, state)
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return logps[start - 1:-1].gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]


def test_two_tenants_sample_in_one_vllm_batch_as_each_alone(running, client, tiny_model):
    import time

    samplers = []
    for seed in (13, 14):  # (both with the LM head's LoRA: neither pins a slot)
        tc, tok = _trained(client, tiny_model, seed=seed)
        samplers.append(tc.save_weights_and_get_sampling_client().result())
    prompts = [types.ModelInput.from_ints(tok.encode(q)) for q in ("What is 3 + 9?", "What is 50 + 25?")]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=5)
    alone = [s.sample(p, 2, params).result() for s, p in zip(samplers, prompts)]
    worker = running.service.worker
    calls = len(worker.sample_batches)
    with worker.hold():
        futures = [s.sample(p, 2, params) for s, p in zip(samplers, prompts)]
        deadline = time.monotonic() + 30
        while worker.pending() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    together = [f.result() for f in futures]
    assert worker.sample_batches[calls:] == [2]  # taken together by the worker
    # one vLLM call, unless the engine has fewer free (unpinned) LoRA slots than different adapters: vLLM's
    # scheduler counts pinned slots as free, so the sampler splits the batch then
    sampler = running.service.sampler
    expected = [2] if sampler.engine.unpinned_slots() >= 2 else [1, 1]
    assert sampler.vllm_calls[-len(expected):] == expected
    for a, b in zip(alone, together):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        for sa, sb in zip(a.sequences, b.sequences):
            assert_served_logprobs(torch.tensor(sb.logprobs), torch.tensor(sa.logprobs), what="batched vs alone")


def test_sampling_after_a_step_serves_the_trained_adapter(running, client, tiny_model):
    # (an LM-head LoRA goes the public path each time: vLLM has no slot buffer the fast sync could write)
    tc, tok = _trained(client, tiny_model, seed=11)  # the SDK's defaults: attention, MLP and the LM head
    trainer = running.service.trainer
    state = trainer.tenants.peft_state_dict(trainer.runs[tc.model_id].slot)
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = tok.encode("What is 2 + 3?")
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    result = sampler.sample(types.ModelInput.from_ints(prompt), 2, params, include_prompt_logprobs=True).result()
    assert len(result.sequences) == 2
    for seq in result.sequences:
        assert len(seq.tokens) == len(seq.logprobs) > 0
        ids = prompt + list(seq.tokens)
        assert_served_logprobs(torch.tensor(seq.logprobs), _hf_logprobs(tiny_model, state, ids, len(prompt)),
                               alternative=_hf_logprobs(tiny_model, None, ids, len(prompt)), what="sampled")
    assert result.prompt_logprobs[0] is None
    assert_served_logprobs(torch.tensor(result.prompt_logprobs[1:]), _hf_logprobs(tiny_model, state, prompt, 1),
                           what="prompt")
    again = sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in result.sequences]  # the seed repeats it


def test_a_replaced_snapshot_is_refused_and_named_weights_sample_by_path(running, client, tiny_model):
    tc, tok = _trained(client, tiny_model, seed=12, train_unembed=False)
    old = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tok.encode("What is 4 + 4?"))
    greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
    old.sample(prompt, 1, greedy).result()
    path = tc.save_weights_for_sampler("after-two-steps").result().path
    assert running.service.sampler.engine.last_sync_path == "fast"  # written into the pinned slot in place
    assert path == f"tinker://{tc.model_id}/sampler_weights/after-two-steps"
    with pytest.raises(Exception, match="replaced"):
        old.sample(prompt, 1, greedy).result()
    by_path = client.create_sampling_client(model_path=path)
    by_path = by_path.result() if hasattr(by_path, "result") else by_path
    named = by_path.sample(prompt, 1, greedy).result().sequences[0]
    state = running.service.trainer.tenants.peft_state_dict(running.service.trainer.runs[tc.model_id].slot)
    ids = prompt.to_ints() + list(named.tokens)
    assert_served_logprobs(torch.tensor(named.logprobs), _hf_logprobs(tiny_model, state, ids, prompt.length))


def test_the_base_model_samples_by_name_and_bad_params_are_400s(client, tiny_model, tokenizer):
    base = client.create_sampling_client(base_model=tiny_model)
    base = base.result() if hasattr(base, "result") else base
    prompt = tokenizer.encode("What is 1 + 1?")
    seq = base.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=5, temperature=0.0)
                      ).result().sequences[0]
    ids = prompt + list(seq.tokens)
    assert_served_logprobs(torch.tensor(seq.logprobs), _hf_logprobs(tiny_model, None, ids, len(prompt)))
    with pytest.raises(tinker.BadRequestError, match="sampling_params.max_tokens"):
        base.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=10_000)).result()
    with pytest.raises(tinker.BadRequestError, match=r"prompt.chunks\[0\].tokens"):
        base.sample(types.ModelInput.from_ints([10 ** 6]), 1, types.SamplingParams(max_tokens=2)).result()


def test_named_sampler_weights_stay_samplable_after_newer_saves(running, client, tiny_model):
    from vllm_train.lora.peft_io import read_adapter_dir

    tc, tok = _trained(client, tiny_model, seed=15, train_unembed=False)
    first = tc.save_weights_for_sampler("first").result().path
    _, first_state = read_adapter_dir(f"{running.service.config.state_dir}/{tc.model_id}/sampler_weights/first")
    ids = tok.encode("What is 9 + 9? 18")
    data = [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    tc.save_weights_for_sampler("second").result()  # the run's slot now holds "second"
    sampler = client.create_sampling_client(model_path=first).result()
    prompt = tok.encode("What is 6 + 7?")
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=5, temperature=1.0,
                                                                                      seed=3)).result().sequences[0]
    ids = prompt + list(seq.tokens)
    newest = running.service.trainer.tenants.peft_state_dict(running.service.trainer.runs[tc.model_id].slot)
    assert_served_logprobs(torch.tensor(seq.logprobs), _hf_logprobs(tiny_model, first_state, ids, len(prompt)),
                           alternative=_hf_logprobs(tiny_model, newest, ids, len(prompt)), what="first")

