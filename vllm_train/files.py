"""Reading the text files users give: UTF-8 (a byte order mark accepted), JSON errors with their position,
and YAML or JSON config files, each failure one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_train.errors import VllmTrainError

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (some editors write one): accepted, not part of the data


def read_text(path: Path) -> str:
    """The UTF-8 text of `path` (a leading BOM dropped); one-line error for bytes that are not UTF-8."""
    raw = path.read_bytes()
    return decode_utf8(raw[3:] if raw.startswith(BOM) else raw, str(path))


def decode_utf8(raw: bytes, where: str) -> str:
    """`raw` as UTF-8 text; one-line error naming `where` and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        place = f"line {line}, " if raw.count(b"\n", 0, len(raw) - 1) else ""
        raise VllmTrainError(f"{where}: not valid UTF-8 ({place}byte {exc.start + 1}: "
                             f"{raw[exc.start:exc.end]!r}); save the file as UTF-8") from None


def json_problem(exc: json.JSONDecodeError) -> str:
    """json's message with its position: "Expecting value at column 5" (its messages for an unterminated
    string end in "at", which the column completes)."""
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict (one-line errors for missing or malformed files)."""
    path = Path(path)
    if not path.is_file():
        raise VllmTrainError(f"config file not found: {path}")
    text = read_text(path)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VllmTrainError(f"{path}:{exc.lineno}: cannot parse config: {json_problem(exc)}") from None
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError carry the line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VllmTrainError(f"{path}: cannot parse config: {first}") from None
    if not isinstance(data, dict):
        raise VllmTrainError(f"{path}: a config file must hold a mapping of field: value")
    return data
