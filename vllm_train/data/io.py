"""Read training records from JSONL / JSON / Parquet files, Hugging Face `datasets` objects, or a split of a
dataset on the Hugging Face hub (`HubDataset`, read with the optional `datasets` library).

Every record is checked up front, so a bad line fails before any training starts, with an error that
names the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_train.errors import VllmTrainError
from vllm_train.files import BOM, decode_utf8, json_problem, read_text
from vllm_train.hub import hub_cache_dir

CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates render; a typo must not pass
RecordCheck = Callable[[dict], str | None]  # returns an error message, or None if the record is fine
RecordReader = Callable[[dict], dict]  # a record in a shape users have -> the shape a dataset reads (or RecordProblem)


class RecordProblem(ValueError):
    """What is wrong with one record, in one line naming the field (`load_records` adds file and line)."""


@dataclass(frozen=True)
class HubDataset:
    """One split of a dataset on the Hugging Face hub (``--dataset-name ORG/NAME [--dataset-config C]
    [--split S]``), read with `datasets.load_dataset`: its caches, HF_HOME, and HF_HUB_OFFLINE=1 /
    HF_DATASETS_OFFLINE=1 as that library reads them. Offline, a dataset not in `datasets`' own cache is
    read from the files an earlier online load left in the hub cache."""

    name: str
    split: str = "train"
    config: str | None = None

    def __str__(self) -> str:
        return f"{self.name}[{self.config + ':' if self.config else ''}{self.split}]"

    def rows(self) -> list[dict]:
        try:
            import datasets
        except ImportError:
            raise VllmTrainError(f"dataset {self}: reading hub datasets needs the `datasets` library "
                                 f"(pip install 'vllm-train[hub]')") from None
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split).to_list()
        except (ConnectionError, FileNotFoundError) as exc:
            if not datasets.config.HF_HUB_OFFLINE:
                raise VllmTrainError(f"dataset {self}: {_first_line(exc)}") from None
        except Exception as exc:  # unknown split or config, no such dataset, gated, ...
            raise VllmTrainError(f"dataset {self}: {_first_line(exc)}") from None
        local = self._hub_snapshot(datasets.config.HF_DATASETS_CACHE)
        try:
            return datasets.load_dataset(local, self.config, split=self.split).to_list()
        except Exception as exc:
            raise VllmTrainError(f"dataset {self}: {_first_line(exc)}") from None

    def _hub_snapshot(self, datasets_cache: Any) -> str:
        """The dataset repo's snapshot directory in the hub cache (offline), or one line saying it is not there."""
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(self.name, repo_type="dataset", cache_dir=hub_cache_dir(), local_files_only=True)
        except Exception:
            hub_cache = hub_cache_dir() or "default"
            raise VllmTrainError(f"dataset {self}: offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and not in the "
                                 f"datasets cache ({datasets_cache}) nor the hub cache ({hub_cache}): load it once "
                                 f"online, or give a data file") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_records(source: Any, check: RecordCheck | None = None, what: str = "dataset",
                 read: RecordReader | None = None) -> list[dict]:
    """Load records from a path (.jsonl/.json/.parquet), a list of dicts, an HF dataset or a `HubDataset`.

    `read(record)` (optional) turns each record into the shape the caller wants, raising `RecordProblem`;
    `check(record)` then returns None for a good record or a message naming the bad field. Either error
    reads ``FILE:LINE: MESSAGE`` (JSONL), ``FILE: record N: MESSAGE`` otherwise. Rows of `datasets`
    objects drop their null fields (`datasets` fills a column a row lacks with null).
    """
    accept = _acceptor(check, read)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise VllmTrainError(f"{what} file not found: {path}")
        if path.is_dir():
            raise VllmTrainError(f"{what} path is a directory, expected a .jsonl/.json/.parquet file: {path}")
        if path.suffix == ".jsonl":
            records = list(_read_jsonl(path, accept))
        elif path.suffix == ".json":
            records = _accept_all(_read_json(path), accept, f"{path}: record")
        elif path.suffix == ".parquet":
            records = _accept_all(_read_parquet(path), accept, f"{path}: record")
        else:
            raise VllmTrainError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json or .parquet)")
        label = str(path)
    elif isinstance(source, HubDataset):
        records = _accept_all(_without_nulls(source.rows()), accept, f"{source}: record")
        label = str(source)
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        records = _accept_all(_without_nulls(source), accept, f"{what}: record")
        label = what
    elif isinstance(source, (list, tuple)):
        if not all(isinstance(r, dict) for r in source):
            raise VllmTrainError(f"{what}: every record must be a dict")
        records = _accept_all(list(source), accept, f"{what}: record")
        label = what
    else:
        raise VllmTrainError(f"{what}: expected a file path, a list of dicts, a datasets.Dataset or a HubDataset, "
                             f"got {type(source).__name__}")
    if not records:
        raise VllmTrainError(f"{label}: {what} is empty")
    return records


def source_label(source: Any, what: str) -> str:
    """How messages name a data source: its path, else `what`."""
    return str(source) if isinstance(source, (str, Path, HubDataset)) else what


def _acceptor(check: RecordCheck | None, read: RecordReader | None) -> Callable[[dict], dict | str]:
    """record -> the record (read into shape, if `read`), or the one-line problem with it."""

    def accept(record: dict) -> dict | str:
        try:
            record = read(record) if read else record
        except RecordProblem as exc:
            return str(exc)
        return (check(record) if check else None) or record

    return accept


def _without_nulls(rows: Iterable[dict]) -> list[dict]:
    return [{k: v for k, v in dict(row).items() if v is not None} for row in rows]


def _read_jsonl(path: Path, accept: Callable[[dict], dict | str]) -> Iterable[dict]:
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
            record = accept(record)
            if isinstance(record, str):
                raise VllmTrainError(f"{path}:{line_no}: {record}")
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


def _accept_all(records: list[dict], accept: Callable[[dict], dict | str], where: str) -> list[dict]:
    out = []
    for i, record in enumerate(records, start=1):
        record = accept(record)
        if isinstance(record, str):
            raise VllmTrainError(f"{where} {i}: {record}")
        out.append(record)
    return out


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
