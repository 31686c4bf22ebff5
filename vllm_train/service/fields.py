"""Reading a JSON request's fields with their types checked: a wrong or missing field is a 400 naming it."""

from __future__ import annotations

import math

from vllm_train.service.problems import BadRequest


def get(body: dict, name: str, kind: type | tuple, default=..., where: str | None = None):
    """`body[name]` checked to be of `kind` (bool is not an int here); missing -> `default` or a 400."""
    field_name = f"{where}.{name}" if where else name
    if not isinstance(body, dict):
        raise BadRequest(where or "body", "expected a JSON object")
    if name not in body or body[name] is None:
        if default is ...:
            raise BadRequest(field_name, "required")
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BadRequest(field_name, f"expected {names}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(field_name, "must be finite")
    return value
