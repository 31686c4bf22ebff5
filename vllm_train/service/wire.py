"""The Tinker SDK's protobuf messages, by field number (the SDK's ``tinker_public.proto``, read from the
descriptor it ships): forward_backward requests in, ForwardBackwardOutput and SampleResponse out. The SDK
sends forward/forward_backward as ``application/x-protobuf`` and asks for those two results the same way
(``Accept: application/x-protobuf``); everything else is JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vllm_train.service import protowire as pw
from vllm_train.service.problems import BadRequest

# DType enum of the wire -> numpy dtype of its bytes
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<i8"), 3: np.dtype("<i4"), 4: np.dtype("<u2")}
FLOAT32, INT64 = 1, 2


@dataclass
class Datum:
    tokens: list[int]
    inputs: dict[str, np.ndarray]  # loss_fn_inputs, float32 or int64, dense


@dataclass
class ForwardBackwardRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    config: dict[str, float | str]
    forward_only: bool
    data: list[Datum] = field(default_factory=list)


def decode_forward_backward(body: bytes) -> ForwardBackwardRequest:
    """Parse a forward/forward_backward request; `BadRequest` names the part that is malformed."""
    try:
        fields = pw.parse(body)
        config: dict[str, float | str] = {}
        for key, value in pw.map_entries(fields.get(5, [])):  # legacy float-only map
            config[pw.as_str(key)] = pw.as_double(value) if value is not None else 0.0
        for key, value in pw.map_entries(fields.get(7, [])):  # v2 (number | text) wins
            config[pw.as_str(key)] = _config_value(pw.parse(value or b""))
        request = ForwardBackwardRequest(
            model_id=pw.as_str(pw.last(fields, 1)), seq_id=pw.as_signed(pw.last(fields, 2, 0)),
            loss_fn=pw.as_str(pw.last(fields, 4)), config=config, forward_only=bool(pw.last(fields, 6, 0)))
    except pw.WireError as exc:
        raise BadRequest("body", f"not a ForwardBackwardRequest protobuf ({exc})") from None
    for i, datum in enumerate(fields.get(3, [])):
        request.data.append(_decode_datum(datum, f"data[{i}]"))
    return request


def _config_value(fields: dict) -> float | str:
    if 2 in fields:
        return pw.as_str(pw.last(fields, 2))
    return pw.as_double(pw.last(fields, 1)) if 1 in fields else 0.0


def _decode_datum(body: bytes, where: str) -> Datum:
    try:
        fields = pw.parse(body)
        tokens: list[int] = []
        for j, chunk in enumerate(fields.get(1, [])):
            chunk_fields = pw.parse(chunk)
            if set(chunk_fields) - {1}:
                raise BadRequest(f"{where}.model_input.chunks[{j}]", "only token chunks (EncodedTextChunk) are "
                                 "supported; images and audio are not")
            raw = pw.parse(pw.last(chunk_fields, 1, b"")).get(1, [b""])[-1]
            if len(raw) % 4:
                raise BadRequest(f"{where}.model_input.chunks[{j}]", "token bytes are not int32")
            tokens.extend(np.frombuffer(raw, dtype="<i4").tolist())
        inputs = {}
        for key, value in pw.map_entries(fields.get(2, [])):
            name = pw.as_str(key)
            inputs[name] = _decode_tensor(value or b"", f"{where}.loss_fn_inputs.{name}")
    except pw.WireError as exc:
        raise BadRequest(where, f"malformed protobuf ({exc})") from None
    return Datum(tokens, inputs)


def _decode_tensor(body: bytes, where: str) -> np.ndarray:
    fields = pw.parse(body)
    dtype_code = pw.last(fields, 3, 0)
    if dtype_code not in _DTYPES:
        raise BadRequest(where, f"unknown dtype code {dtype_code}")
    dtype = _DTYPES[dtype_code]
    shape = pw.repeated_ints(fields.get(4, []))
    if 2 in fields:  # sparse CSR, densified with 0 (the SDK's default pad)
        csr = pw.parse(pw.last(fields, 2))
        values = _frombuffer(pw.last(csr, 1, b""), dtype, where)
        crow = _frombuffer(pw.last(csr, 2, b""), np.dtype("<i8"), where)
        col = _frombuffer(pw.last(csr, 3, b""), np.dtype("<i8"), where)
        array = _densify(values, crow, col, shape, where)
    else:
        array = _frombuffer(pw.last(fields, 1, b""), dtype, where)
        if shape:
            if math.prod(shape) != array.size or min(shape) < 0:
                raise BadRequest(where, f"shape {shape} does not hold {array.size} values")
            array = array.reshape(shape)
    if dtype_code == 4:  # bfloat16: the high half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32 if dtype.kind in "fu" else np.int64)


def _frombuffer(raw: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise BadRequest(where, f"{len(raw)} bytes are not a whole number of {dtype.itemsize}-byte values")
    return np.frombuffer(raw, dtype=dtype).copy()


def _densify(values, crow, col, shape, where) -> np.ndarray:
    if len(shape) != 2 or min(shape) < 0:
        raise BadRequest(where, f"a sparse tensor needs a 2-D shape, got {shape}")
    rows, cols = shape
    ok = (len(crow) == rows + 1 and len(col) == len(values) and (crow[:1] == 0).all()
          and (np.diff(crow) >= 0).all() and crow[-1:].sum() == len(values) and ((col >= 0) & (col < cols)).all())
    if not ok:
        raise BadRequest(where, "inconsistent sparse CSR indices")
    dense = np.zeros((rows, cols), dtype=values.dtype)
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of, col] = values
    return dense


# ---- results ------------------------------------------------------------------------------------------
def encode_forward_backward_output(logprobs: list[np.ndarray], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput with one ArrayRecord holding every datum's ``logprobs`` (float32, shape (N,))."""
    data = b"".join(np.asarray(lp, dtype="<f4").tobytes() for lp in logprobs)
    offsets = np.cumsum([0] + [4 * len(lp) for lp in logprobs]).astype("<i8")
    batched = (pw.bytes_field(1, data) + pw.bytes_field(2, offsets.tobytes()) + pw.varint_field(3, FLOAT32))
    record = (pw.bytes_field(1, "ArrayRecord") + pw.bytes_field(2, pw.bytes_field(1, "logprobs")
              + pw.bytes_field(2, batched)) + pw.varint_field(3, len(logprobs)))
    return (pw.bytes_field(1, "ArrayRecord") + pw.bytes_field(2, record)
            + pw.map_field(3, metrics, pw.double_field))


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float] | None
    stop_reason: str  # "stop" or "length"


def encode_sample_response(sequences: list[SampledSequence], prompt_logprobs: list[float | None] | None) -> bytes:
    out = b""
    for seq in sequences:
        body = pw.varint_field(1, 1 if seq.stop_reason == "length" else 0)
        body += pw.bytes_field(2, np.asarray(seq.tokens, dtype="<i4").tobytes())
        if seq.logprobs is not None:
            body += pw.bytes_field(3, np.asarray(seq.logprobs, dtype="<f4").tobytes())
        out += pw.bytes_field(1, body)
    if prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in prompt_logprobs]
        out += pw.bytes_field(2, np.asarray(values, dtype="<f4").tobytes())
    return out
