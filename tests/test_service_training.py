"""`vllm-train service` driven by the unmodified tinker SDK (pointed at it with base_url and an API key):
forward log-probs against transformers + PEFT, forward_backward + optim_step against a hand-run torch AdamW
step, two tenants batched in one pass against each alone, bad input refused whole, and one key's runs
invisible to another. No vLLM engine here (sampling is tested in test_service_sampling.py)."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from vllm_train.service.config import ServiceConfig  # noqa: E402
from vllm_train.service.server import build_service, start_in_thread  # noqa: E402

KEY, OTHER_KEY = "tml-test-key-0123456789", "tml-other-key-0123456789"
TOL = 1e-4  # fp32 log-probs, two implementations
PARAM_TOL = 1e-5  # adapter tensors after a step, two implementations


@pytest.fixture(scope="module")
def running(tiny_model):
    service = build_service(ServiceConfig(model=tiny_model, port=0, sampling=False, max_adapters=32,
                                          api_keys=(KEY, OTHER_KEY)))
    running = start_in_thread(service)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(running):
    with tinker.ServiceClient(base_url=running.url, api_key=KEY) as client:  # closed: its heartbeats stop
        yield client


def _new_training_client(client, tiny_model, seed=0, rank=8, train_unembed=False):
    return client.create_lora_training_client(base_model=tiny_model, rank=rank, seed=seed,
                                              train_unembed=train_unembed).result()


def _sft_data(tokenizer, texts=("What is 2 + 3? 5", "What is 40 + 2? 42")):
    data = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        weights = [0.0] * (len(ids) - 4) + [1.0, 0.5 + i, 2.0]  # arbitrary float weights, one per target
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": weights}))
    return data


def _slot_state(running, training_client):
    trainer = running.service.trainer
    return trainer.tenants.peft_state_dict(trainer.runs[training_client.model_id].slot)


def _peft_model(tiny_model, state, rank):
    """The oracle: transformers' model with PEFT's own LoRA layers holding `state`."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    targets = sorted({k.split(".")[-3] for k in state})
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    result = set_peft_model_state_dict(model, state)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    return model


def _oracle_logprobs(model, datum):
    ids = torch.tensor([datum.model_input.to_ints()])
    targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].tolist())
    logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


def _max_gap(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_forward_logprobs_equal_transformers_with_peft(running, client, tiny_model):
    tc = _new_training_client(client, tiny_model, seed=1)
    data = _sft_data(tc.get_tokenizer())
    # a fresh adapter (B = 0) is the base model; after a step it is not, and PEFT must agree with it again
    for step in range(2):
        served = tc.forward(data, "cross_entropy").result()
        oracle = _peft_model(tiny_model, _slot_state(running, tc), rank=8)
        with torch.no_grad():
            for datum, out in zip(data, served.loss_fn_outputs):
                got = torch.tensor(out["logprobs"].tolist())
                assert (got - _oracle_logprobs(oracle, datum)).abs().max().item() < TOL
        want_loss = sum(-(torch.tensor(o["logprobs"].tolist()) * torch.tensor(d.loss_fn_inputs["weights"].tolist()))
                        .sum().item() for o, d in zip(served.loss_fn_outputs, data))
        assert served.metrics["loss:sum"] == pytest.approx(want_loss, rel=1e-5)
        if step == 0:
            tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=0.05)).result()


def test_optim_step_is_torch_adamw_on_the_summed_loss(running, client, tiny_model):
    tc = _new_training_client(client, tiny_model, seed=2, train_unembed=True)  # the LM head's LoRA too
    data = _sft_data(tc.get_tokenizer())
    # The two implementations' gradients agree to ~2e-7 (fp32 summation order); Adam's update moves by up to
    # lr / eps per unit of gradient difference where |g| is near eps, so eps = lr keeps that within the bound
    adam = types.AdamParams(learning_rate=0.01, beta1=0.8, beta2=0.9, eps=1e-2, weight_decay=0.1)
    before = _slot_state(running, tc)
    # two steps, so that the second one's moments carry over
    oracle = _peft_model(tiny_model, before, rank=8)
    params = [p for n, p in oracle.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                            weight_decay=adam.weight_decay)
    for _ in range(2):
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(adam)
        fb.result(), step.result()
        loss = sum(-(_oracle_logprobs(oracle, d) * torch.tensor(d.loss_fn_inputs["weights"].tolist())).sum()
                   for d in data)
        loss.backward()
        opt.step()
        opt.zero_grad()
    from peft import get_peft_model_state_dict

    # (PEFT also exports the LM head's frozen base weight with an lm_head LoRA: not part of the adapter)
    want = {k: v.detach() for k, v in get_peft_model_state_dict(oracle).items() if ".lora_" in k}
    got = _slot_state(running, tc)
    assert any(".lm_head." in k for k in got)
    assert _max_gap(before, got) > 1e-3  # it moved
    assert _max_gap(got, want) < PARAM_TOL


def _train_pair(running, trainers, datasets, batched: bool):
    worker = running.service.worker
    passes = len(worker.batches)
    if batched:
        with worker.hold():
            futures = [tc.forward_backward(data, "cross_entropy") for tc, data in zip(trainers, datasets)]
            deadline = time.monotonic() + 30
            while worker.pending() < len(trainers) and time.monotonic() < deadline:
                time.sleep(0.01)
    else:
        futures = [tc.forward_backward(data, "cross_entropy") for tc, data in zip(trainers, datasets)]
        [f.result() for f in futures]
    [f.result() for f in futures]
    for tc in trainers:
        tc.optim_step(types.AdamParams(learning_rate=0.02)).result()
    return worker.batches[passes:]


def test_two_tenants_in_one_pass_equal_each_alone(running, client, tiny_model):
    other = tinker.ServiceClient(base_url=running.url, api_key=OTHER_KEY)
    together = [_new_training_client(client, tiny_model, seed=3),
                _new_training_client(other, tiny_model, seed=4, rank=16)]
    tokenizer = together[0].get_tokenizer()
    datasets = [_sft_data(tokenizer), _sft_data(tokenizer, ("What is 7 + 8? 15",))]
    passes = _train_pair(running, together, datasets, batched=True)
    assert passes == [2]  # both requests in one forward/backward pass
    for tc_together, seed, rank, data, owner in ((together[0], 3, 8, datasets[0], client),
                                                 (together[1], 4, 16, datasets[1], other)):
        alone = _new_training_client(owner, tiny_model, seed=seed, rank=rank)
        _train_pair(running, [alone], [data], batched=False)
        assert _max_gap(_slot_state(running, tc_together), _slot_state(running, alone)) < PARAM_TOL
        running.service.trainer.unload(running.service.trainer.runs[alone.model_id])


BAD_INPUTS = [
    # (label, datum builder, loss, config, words the 400 must contain)
    ("target length", lambda ids: {"target_tokens": ids[1:-1], "weights": [1.0] * (len(ids) - 2)},
     "cross_entropy", None, "data[1].loss_fn_inputs.target_tokens"),
    ("nan weight", lambda ids: {"target_tokens": ids[1:], "weights": [float("nan")] * (len(ids) - 1)},
     "cross_entropy", None, "data[1].loss_fn_inputs.weights"),
    ("nan advantage", lambda ids: {"target_tokens": ids[1:], "logprobs": [-1.0] * (len(ids) - 1),
                                   "advantages": [float("inf")] * (len(ids) - 1)}, "ppo", None,
     "data[0].loss_fn_inputs.advantages"),
    ("missing advantages", lambda ids: {"target_tokens": ids[1:], "logprobs": [-1.0] * (len(ids) - 1)},
     "importance_sampling", None, "data[0].loss_fn_inputs.advantages"),
    ("token outside vocab", lambda ids: {"target_tokens": [10 ** 6] * (len(ids) - 1)}, "cross_entropy", None,
     "data[1].loss_fn_inputs.target_tokens"),
    ("unknown loss", lambda ids: {"target_tokens": ids[1:]}, "nope", None, "loss_fn"),
    ("clip order", lambda ids: {"target_tokens": ids[1:], "logprobs": [-1.0] * (len(ids) - 1),
                                "advantages": [1.0] * (len(ids) - 1)}, "ppo",
     {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}, "loss_fn_config.clip_low_threshold"),
    ("dro without beta", lambda ids: {"target_tokens": ids[1:], "logprobs": [-1.0] * (len(ids) - 1),
                                      "advantages": [1.0] * (len(ids) - 1)}, "dro", None, "loss_fn_config.beta"),
]


def test_bad_inputs_are_400s_naming_the_field_and_change_nothing(running, client, tiny_model):
    tc = _new_training_client(client, tiny_model, seed=5)
    tokenizer = tc.get_tokenizer()
    good = _sft_data(tokenizer)[:1]
    tc.forward_backward(good, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.01)).result()
    run = running.service.trainer.runs[tc.model_id]
    before, moments = _slot_state(running, tc), {k: v.clone() for k, v in
                                                 run.optimizer.state[run.optimizer.param_groups[0]["params"][0]].items()}
    for _label, inputs, loss_fn, config, field in BAD_INPUTS:
        ids = tokenizer.encode("What is 2 + 3? 5")
        bad = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs(ids))
        with pytest.raises(tinker.BadRequestError, match=field.replace("[", r"\[").replace("]", r"\]")):
            # cross_entropy: a good datum first, so the request is refused whole
            data = good + [bad] if field.startswith("data[1]") else [bad]
            tc.forward_backward(data, loss_fn, config).result()
    with pytest.raises(tinker.BadRequestError, match="adam_params.beta1"):
        tc.optim_step(types.AdamParams(learning_rate=0.01, beta1=1.5)).result()
    tc.optim_step(types.AdamParams(learning_rate=0.01)).result()  # no gradients were kept: a no-op step
    assert _max_gap(before, _slot_state(running, tc)) == 0.0
    after = run.optimizer.state[run.optimizer.param_groups[0]["params"][0]]
    assert all(torch.equal(moments[k], after[k]) for k in ("exp_avg", "exp_avg_sq"))
    # and the run still trains
    tc.forward_backward(good, "cross_entropy").result()


def test_refusals_at_creation_name_the_setting(client, tiny_model):
    with pytest.raises(tinker.BadRequestError, match="lora_config.seed"):
        client.create_lora_training_client(base_model=tiny_model, rank=8, seed=-1).result()
    with pytest.raises(tinker.BadRequestError, match="lora_config.rank"):
        client.create_lora_training_client(base_model=tiny_model, rank=64, train_unembed=False).result()
    with pytest.raises(tinker.BadRequestError, match="base_model"):
        client.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=8, train_unembed=False).result()


def test_another_key_sees_404_and_no_key_401(running, client, tiny_model):
    tc = _new_training_client(client, tiny_model, seed=6)
    info = {"model_id": tc.model_id}
    with httpx.Client(base_url=running.url) as http:
        assert http.post("/api/v1/get_info", json=info, headers={"X-API-Key": KEY}).status_code == 200
        other = http.post("/api/v1/get_info", json=info, headers={"X-API-Key": OTHER_KEY})
        assert other.status_code == 404 and "model_id" in other.json()["detail"]
        optim = http.post("/api/v1/optim_step", json={**info, "adam_params": {}},
                          headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert optim.status_code == 404
        assert http.post("/api/v1/get_info", json=info).status_code == 401
        wrong = http.post("/api/v1/get_info", json=info, headers={"X-API-Key": "tml-not-a-key-000000"})
        assert wrong.status_code == 401
        caps = http.get("/api/v1/get_server_capabilities", headers={"X-API-Key": OTHER_KEY}).json()
        assert caps["supported_models"][0]["model_name"] == tiny_model


def test_forward_backward_custom_steps_as_the_custom_loss_would(running, client, tiny_model):
    """The SDK runs a custom loss client-side and sends its gradient as cross_entropy weights: the step must
    be the one a hand-run AdamW takes on that loss itself (here a nonlinear one: sum of squared log-probs)."""
    tc = _new_training_client(client, tiny_model, seed=7)
    data = _sft_data(tc.get_tokenizer())
    before = _slot_state(running, tc)

    def squared(batch, logprobs_list):
        loss = sum((lp ** 2).sum() for lp in logprobs_list)
        return loss, {"squared:sum": float(loss)}

    out = tc.forward_backward_custom(data, squared)
    adam = types.AdamParams(learning_rate=0.01, eps=1e-2)
    tc.optim_step(adam).result()
    oracle = _peft_model(tiny_model, before, rank=8)
    params = [p for n, p in oracle.named_parameters() if "lora_" in n]
    loss = sum((_oracle_logprobs(oracle, d) ** 2).sum() for d in data)
    assert out.result().metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    torch.optim.AdamW(params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                      weight_decay=0.0).step()
    from peft import get_peft_model_state_dict

    want = {k: v.detach() for k, v in get_peft_model_state_dict(oracle).items() if ".lora_" in k}
    assert _max_gap(_slot_state(running, tc), want) < PARAM_TOL


def test_limits_are_400s_naming_the_field(client, tiny_model, running):
    tc = _new_training_client(client, tiny_model, seed=8)
    n = running.service.limits.max_context + 1
    too_long = types.Datum(model_input=types.ModelInput.from_ints([5] * n),
                           loss_fn_inputs={"target_tokens": [5] * n, "weights": [1.0] * n})
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\].model_input.*context length"):
        tc.forward_backward([too_long], "cross_entropy").result()


def test_malformed_requests_are_4xx_and_the_server_keeps_serving(running, client, tiny_model):
    headers = {"X-API-Key": KEY}
    with httpx.Client(base_url=running.url, headers=headers) as http:
        assert http.post("/api/v1/optim_step", content=b"{not json").json()["detail"].startswith("body")
        assert http.post("/api/v1/optim_step", json=[1, 2]).status_code == 400
        wrong_type = http.post("/api/v1/forward_backward", json={"model_id": "x"})
        assert wrong_type.status_code == 400 and "application/x-protobuf" in wrong_type.json()["detail"]
        garbage = http.post("/api/v1/forward_backward", content=b"\xff\xfe\xfd",
                            headers={"Content-Type": "application/x-protobuf"})
        assert garbage.status_code == 400 and garbage.json()["detail"].startswith("body")
        unknown = http.post("/api/v1/no_such_route", json={})
        assert unknown.status_code == 404 and "no_such_route" in unknown.json()["detail"]
        assert http.post("/api/v1/create_model", json={"session_id": 5}).json()["detail"].startswith("session_id")
        assert http.post("/api/v1/retrieve_future", json={"request_id": "req-999999"}).status_code == 404
        assert http.get("/api/v1/healthz").json() == {"status": "ok"}
    _new_training_client(client, tiny_model, seed=9)  # still serving


def test_a_call_over_the_token_budget_is_cut_by_the_sdk_and_steps_the_same(running, tiny_model):
    """The client config makes the SDK cut forward_backward calls into requests within --max-batch-tokens;
    the worker runs them as several passes whose gradients add up to the one big step's."""
    small = start_in_thread(build_service(ServiceConfig(model=tiny_model, port=0, sampling=False,
                                                        max_batch_tokens=48, api_keys=(KEY,))))
    try:
        trainers = []
        for url in (running.url, small.url):
            tc = tinker.ServiceClient(base_url=url, api_key=KEY).create_lora_training_client(
                base_model=tiny_model, rank=8, seed=10, train_unembed=False).result()
            trainers.append(tc)
        data = _sft_data(trainers[0].get_tokenizer(), tuple(f"What is {i} + {i}? {2 * i}" for i in range(10, 20)))
        assert sum(d.model_input.length for d in data) > 2 * 48
        outs = []
        for tc in trainers:
            outs.append(tc.forward_backward(data, "cross_entropy").result())
            tc.optim_step(types.AdamParams(learning_rate=0.01, eps=1e-2)).result()
        assert outs[1].metrics["loss:sum"] == pytest.approx(outs[0].metrics["loss:sum"], rel=1e-5)
        assert len(small.service.worker.batches) >= 3  # cut into several requests and passes
        big_state = _slot_state(running, trainers[0])
        small_state = small.service.trainer.tenants.peft_state_dict(
            small.service.trainer.runs[trainers[1].model_id].slot)
        assert _max_gap(big_state, small_state) < PARAM_TOL
    finally:
        small.stop()


def test_a_session_without_heartbeats_ends_and_frees_its_slots(tiny_model):
    """A client that vanished (no heartbeats) holds no adapter slot forever: its session ends after the TTL and
    its runs are unloaded (raw HTTP here: the SDK would heartbeat)."""
    service = build_service(ServiceConfig(model=tiny_model, port=0, sampling=False, max_adapters=1,
                                          session_ttl_seconds=0.5, api_keys=(KEY,)))
    small = start_in_thread(service)
    try:
        with httpx.Client(base_url=small.url, headers={"X-API-Key": KEY}) as http:
            session = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "x"}).json()["session_id"]
            lora = {"rank": 8, "train_unembed": False}
            future = http.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 0,
                                                             "base_model": tiny_model, "lora_config": lora}).json()
            model_id = http.post("/api/v1/retrieve_future", json=future).json()["model_id"]
            assert service.trainer.runs[model_id].slot == 0
            deadline = time.monotonic() + 10  # the server checks every ttl / 2
            while model_id in service.trainer.runs and time.monotonic() < deadline:
                time.sleep(0.05)
            assert http.post("/api/v1/get_info", json={"model_id": model_id}).status_code == 404
            assert http.post("/api/v1/session_heartbeat", json={"session_id": session}).status_code == 404
        assert service.trainer.free_slot() == 0  # the one slot is free again
        assert service.expire_sessions() == []
    finally:
        small.stop()


def test_a_closed_service_client_ends_its_session_and_the_model_path_may_be_absolute(running, tiny_model):
    from pathlib import Path

    absolute = str(Path(tiny_model).resolve())  # the same directory, spelled otherwise
    with tinker.ServiceClient(base_url=running.url, api_key=KEY) as client:
        tc = client.create_lora_training_client(base_model=absolute, rank=8, train_unembed=False).result()
        assert tc.model_id in running.service.trainer.runs
    deadline = time.monotonic() + 10  # POST sessions/{id}/finish queued the unload
    while tc.model_id in running.service.trainer.runs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tc.model_id not in running.service.trainer.runs


@pytest.mark.parametrize("loss_fn,config", [
    ("importance_sampling", None),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
    ("ppo", None),
    ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.5}),
])
def test_rl_losses_through_the_sdk_sum_as_defined(running, client, tiny_model, loss_fn, config):
    """Each RL loss's reported loss:sum equals the Tinker definition evaluated on the returned per-token
    log-probs, with its config (clip thresholds as absolute ratios, defaults where none) reaching the server."""
    from vllm_train.losses import tinker as L

    tc = _new_training_client(client, tiny_model, seed=11)
    tok = tc.get_tokenizer()
    data, sampler_lps, advantages = [], [], []
    for i, text in enumerate(("What is 2 + 3? 5", "What is 40 + 2? 42")):
        ids = tok.encode(text)
        n = len(ids) - 1
        q = [-1.0 - 0.3 * ((j + i) % 4) for j in range(n)]  # the "sampler's" log-probs: ratios far from 1
        a = [(-1.0) ** (j + i) * (0.5 + j / n) for j in range(n)]
        sampler_lps.append(q)
        advantages.append(a)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "logprobs": q, "advantages": a}))
    out = tc.forward(data, loss_fn, config).result()
    defaults = dict(L.LOSS_INPUTS[loss_fn][1])
    resolved = {**defaults, **(config or {})}
    want = 0.0
    for o, q, a in zip(out.loss_fn_outputs, sampler_lps, advantages):
        logps = torch.tensor(o["logprobs"].tolist(), dtype=torch.float64)
        inputs = {"logprobs": torch.tensor(q, dtype=torch.float64), "advantages": torch.tensor(a, dtype=torch.float64)}
        want += L.datum_loss(loss_fn, logps, inputs, resolved)[0].item()
    assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-5, abs=1e-5)
