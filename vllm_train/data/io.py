"""Read training records from JSONL / JSON / Parquet files or Hugging Face `datasets` objects.

Every record is checked up front, so a bad line fails before any training starts, with an error that
names the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vllm_train.config import BOM, decode_utf8, json_problem, read_text
from vllm_train.errors import VllmTrainError

CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates render; a typo must not pass
RecordCheck = Callable[[dict], str | None]  # returns an error message, or None if the record is fine


def load_records(source: Any, check: RecordCheck | None = None, what: str = "dataset") -> list[dict]:
    """Load records from a path (.jsonl/.json/.parquet), a list of dicts, or an HF dataset.

    `check(record)` returns None for a good record or a message naming the bad field; the error then
    reads ``FILE:LINE: MESSAGE`` (JSONL), ``FILE: record N: MESSAGE`` otherwise.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise VllmTrainError(f"{what} file not found: {path}")
        if path.is_dir():
            raise VllmTrainError(f"{what} path is a directory, expected a .jsonl/.json/.parquet file: {path}")
        if path.suffix == ".jsonl":
            records = list(_read_jsonl(path, check))
        elif path.suffix == ".json":
            records = _check_all(_read_json(path), check, f"{path}: record")
        elif path.suffix == ".parquet":
            records = _check_all(_read_parquet(path), check, f"{path}: record")
        else:
            raise VllmTrainError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json or .parquet)")
        label = str(path)
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        records = _check_all([dict(r) for r in source], check, f"{what}: record")
        label = what
    elif isinstance(source, (list, tuple)):
        if not all(isinstance(r, dict) for r in source):
            raise VllmTrainError(f"{what}: every record must be a dict")
        records = _check_all(list(source), check, f"{what}: record")
        label = what
    else:
        raise VllmTrainError(f"{what}: expected a file path, a list of dicts or a datasets.Dataset, "
                             f"got {type(source).__name__}")
    if not records:
        raise VllmTrainError(f"{label}: {what} is empty")
    return records


def source_label(source: Any, what: str) -> str:
    """How messages name a data source: its path, else `what`."""
    return str(source) if isinstance(source, (str, Path)) else what


def _read_jsonl(path: Path, check: RecordCheck | None) -> Iterable[dict]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = decode_utf8(raw[3:] if line_no == 1 and raw.startswith(BOM) else raw, f"{path}:{line_no}")
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise VllmTrainError(f"{path}:{line_no}: malformed JSON ({json_problem(exc)})") from None
            if not isinstance(record, dict):
                raise VllmTrainError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            problem = check(record) if check else None
            if problem:
                raise VllmTrainError(f"{path}:{line_no}: {problem}")
            yield record


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise VllmTrainError(f"{path}:{exc.lineno}: malformed JSON ({json_problem(exc)})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise VllmTrainError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return data


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise VllmTrainError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:
        raise VllmTrainError(f"{path}: cannot read Parquet ({exc})") from None


def _check_all(records: list[dict], check: RecordCheck | None, where: str) -> list[dict]:
    if check:
        for i, record in enumerate(records, start=1):
            problem = check(record)
            if problem:
                raise VllmTrainError(f"{where} {i}: {problem}")
    return records


def check_messages(value: Any, field_name: str) -> str | None:
    """None if `value` is a non-empty list of {"role", "content"} dicts with string content."""
    if not isinstance(value, list) or not value:
        return f"field '{field_name}' must be a non-empty list of messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"field '{field_name}'[{j}] must be an object with 'role' and 'content'"
        if not isinstance(m["content"], str):
            return f"field '{field_name}'[{j}].content must be a string"
        if m["role"] not in CHAT_ROLES:
            return f"field '{field_name}'[{j}]: role {m['role']!r} is unknown ({', '.join(CHAT_ROLES)})"
    return None


def check_text_field(record: dict, name: str, allow_messages: bool = False) -> str | None:
    """None if record[name] is a non-empty string (or, if allowed, a list of messages)."""
    if name not in record:
        return f"missing field '{name}'"
    value = record[name]
    if allow_messages and isinstance(value, list):
        return check_messages(value, name)
    if not isinstance(value, str):
        return f"field '{name}' must be a string" + (" or a list of messages" if allow_messages else "")
    if not value.strip():
        return f"field '{name}' is empty"
    return None
