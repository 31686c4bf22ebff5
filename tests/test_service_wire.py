"""The service's protobuf codec against the tinker SDK's own encoder and decoder (its generated module is
the oracle): requests the SDK builds decode to the same tokens, tensors and config; results we encode
decode in the SDK to the same values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response  # noqa: E402

from vllm_train.service import wire  # noqa: E402
from vllm_train.service.problems import BadRequest  # noqa: E402


def _sdk_request(data, loss_fn="cross_entropy", config=None) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="s:train:0", seq_id=3)
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = True
    return msg.SerializeToString()


def test_sdk_requests_decode_to_the_same_values():
    dense = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                        loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [0.0, 1.0, 0.5]})
    # 2-D torch inputs are sent sparse (CSR) by the SDK; chunks concatenate
    sparse_targets = torch.tensor([[0, 0, 9, 0, 0, 0, 0, 0]])
    sparse = types.Datum(model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1, 2]),
                                                              types.EncodedTextChunk(tokens=[3])]),
                         loss_fn_inputs={"target_tokens": sparse_targets,
                                         "advantages": torch.tensor([1.5, -2.0, 0.25])})
    got = wire.decode_forward_backward(_sdk_request([dense, sparse], "ppo", {"clip_low_threshold": 0.7,
                                                                              "mode": "x"}))
    assert (got.model_id, got.seq_id, got.loss_fn, got.forward_only) == ("s:train:0", 3, "ppo", True)
    assert got.config == {"clip_low_threshold": pytest.approx(0.7), "mode": "x"}
    assert got.data[0].tokens == [5, 6, 7] and got.data[1].tokens == [1, 2, 3]
    assert got.data[0].inputs["target_tokens"].tolist() == [6, 7, 8]
    assert got.data[0].inputs["target_tokens"].dtype == np.int64
    assert got.data[0].inputs["weights"].tolist() == [0.0, 1.0, 0.5]
    assert got.data[1].inputs["target_tokens"].tolist() == sparse_targets.tolist()
    assert got.data[1].inputs["advantages"].tolist() == [1.5, -2.0, 0.25]


def test_malformed_bodies_are_bad_requests_naming_the_part():
    with pytest.raises(BadRequest, match="body"):
        wire.decode_forward_backward(b"\xff\xff\xff")
    datum = types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": [1.0]})
    body = bytearray(_sdk_request([datum]))
    with pytest.raises(BadRequest):
        wire.decode_forward_backward(bytes(body[:-3]))  # cut inside data[0]


def test_our_results_decode_in_the_sdk():
    out = deserialize_forward_backward_output(wire.encode_forward_backward_output(
        [np.array([-1.0, -2.5]), np.array([-0.5])], {"loss:sum": 4.0}))
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.5], [-0.5]]
    assert out.metrics == {"loss:sum": 4.0}
    sample = deserialize_sample_response(wire.encode_sample_response(
        [wire.SampledSequence([4, 5], [-0.25, -1.0], "length"), wire.SampledSequence([6], None, "stop")],
        [None, -3.0]))
    assert [s.tokens for s in sample.sequences] == [[4, 5], [6]]
    assert sample.sequences[0].logprobs == [-0.25, -1.0] and sample.sequences[1].logprobs is None
    assert [s.stop_reason for s in sample.sequences] == ["length", "stop"]
    assert sample.prompt_logprobs[0] is None and sample.prompt_logprobs[1] == -3.0
    assert not math.isnan(sample.prompt_logprobs[1])
