"""Checkpoints of the service through the unmodified tinker SDK: save_state writes a PEFT directory plus the
optimizer's state under --state-dir and answers a tinker:// path; a training client made from it with its
optimizer continues bit for bit (weights only: it does not, Adam's moments restart); a restarted server
lists the run and its checkpoints and loads them; another key cannot."""

from __future__ import annotations

import pytest
import torch

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from vllm_train.lora.peft_io import read_adapter_dir  # noqa: E402
from vllm_train.service.config import ServiceConfig  # noqa: E402
from vllm_train.service.server import build_service, start_in_thread  # noqa: E402

KEY, OTHER_KEY = "tml-ckpt-key-0123456789", "tml-ckpt-other-0123456789"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("service-state"))


def _start(tiny_model, state_dir):
    return start_in_thread(build_service(ServiceConfig(model=tiny_model, port=0, sampling=False, max_adapters=8,
                                                       state_dir=state_dir, api_keys=(KEY, OTHER_KEY))))


@pytest.fixture(scope="module")
def running(tiny_model, state_dir):
    running = _start(tiny_model, state_dir)
    yield running
    running.stop()


def _data(tokenizer):
    ids = tokenizer.encode("What is 12 + 30? 42")
    return [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})]


def _step(tc, data):
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=0.02)).result()


def _weights(running, tc):
    trainer = running.service.trainer
    return trainer.tenants.peft_state_dict(trainer.runs[tc.model_id].slot)


def _identical(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def saved(running, tiny_model):
    """A run stepped twice, saved, then stepped once more: (path, tokens, weights after the third step)."""
    client = tinker.ServiceClient(base_url=running.url, api_key=KEY)
    tc = client.create_lora_training_client(base_model=tiny_model, rank=8, seed=21, train_unembed=False).result()
    data = _data(tc.get_tokenizer())
    _step(tc, data)
    _step(tc, data)
    path = tc.save_state("two-steps").result().path
    _step(tc, data)
    return tc.model_id, path, data, _weights(running, tc)


def test_save_state_is_a_peft_directory_with_a_tinker_path(running, saved, state_dir):
    model_id, path, _, _ = saved
    assert path == f"tinker://{model_id}/weights/two-steps"
    config, state = read_adapter_dir(f"{state_dir}/{model_id}/weights/two-steps")
    assert config["r"] == 8 and config["lora_alpha"] == 32 and state


def test_load_with_optimizer_continues_bit_for_bit(running, saved, tiny_model):
    _, path, data, after_third = saved
    client = tinker.ServiceClient(base_url=running.url, api_key=KEY)
    resumed = client.create_training_client_from_state_with_optimizer(path).result()
    _step(resumed, data)
    assert _identical(_weights(running, resumed), after_third)
    weights_only = client.create_training_client_from_state(path).result()
    _step(weights_only, data)
    assert not _identical(_weights(running, weights_only), after_third)  # Adam's moments restarted


def test_a_restarted_server_lists_and_loads_the_run(saved, tiny_model, state_dir):
    model_id, path, data, after_third = saved
    restarted = _start(tiny_model, state_dir)
    try:
        client = tinker.ServiceClient(base_url=restarted.url, api_key=KEY)
        rest = tinker.RestClient(base_url=restarted.url, api_key=KEY)
        assert model_id in [r.training_run_id for r in rest.list_training_runs().result().training_runs]
        assert [c.tinker_path for c in rest.list_checkpoints(model_id).result().checkpoints] == [path]
        resumed = client.create_training_client_from_state_with_optimizer(path).result()
        _step(resumed, data)
        assert _identical(_weights(restarted, resumed), after_third)
        other = tinker.ServiceClient(base_url=restarted.url, api_key=OTHER_KEY)
        with pytest.raises(tinker.NotFoundError, match="path"):
            other.create_training_client_from_state(path).result()
        other_rest = tinker.RestClient(base_url=restarted.url, api_key=OTHER_KEY)
        assert other_rest.list_training_runs().result().training_runs == []
    finally:
        restarted.stop()


def test_save_without_a_name_clash_and_bad_paths(running, tiny_model):
    client = tinker.ServiceClient(base_url=running.url, api_key=KEY)
    tc = client.create_lora_training_client(base_model=tiny_model, rank=8, seed=22, train_unembed=False).result()
    tc.save_state("once").result()
    with pytest.raises(tinker.BadRequestError, match="exists"):  # not 409: the SDK retries those
        tc.save_state("once").result()
    tc.save_state("once", overwrite=True).result()
    with pytest.raises(tinker.BadRequestError, match="path"):
        tc.save_state("a/b").result()
    with pytest.raises(tinker.BadRequestError, match="path"):
        client.create_training_client_from_state("tinker://x/weights").result()
