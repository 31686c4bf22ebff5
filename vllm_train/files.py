"""Reading the text files users give: UTF-8 (a byte order mark accepted), JSON errors with their position,
and YAML or JSON config files, each failure one line naming the file."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from vllm_train.errors import VllmTrainError

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (some editors write one): accepted, not part of the data


def read_text(path: Path) -> str:
    """The UTF-8 text of `path` (a leading BOM dropped); one-line error for bytes that are not UTF-8."""
    check_regular_file(path)
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


def check_regular_file(path: Path, what: str = "") -> None:
    """Refuse an existing path that is not a regular file: reading a FIFO waits for a writer forever, and a
    directory, device or socket is not the data asked for."""
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "a FIFO, socket or device"
        raise VllmTrainError(f"{what + ' ' if what else ''}{path}: not a regular file ({kind}); give a file")


def parse_json(text: str, where: str, *, line: bool = True):
    """`json.loads(text)` with one-line errors naming `where` (plus the line, if `line`): malformed JSON,
    an integer of more digits than Python converts (4300), nesting deeper than the recursion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise VllmTrainError(f"{where}{f':{exc.lineno}' if line else ''}: malformed JSON ({json_problem(exc)})") \
            from None
    except RecursionError:
        raise VllmTrainError(f"{where}: JSON nested too deeply to read (past Python's recursion limit)") from None
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits) for integer string conversion ..."
        raise VllmTrainError(f"{where}: an integer too long to read ({str(exc).split(';')[0]})") from None


def json_problem(exc: json.JSONDecodeError) -> str:
    """json's message with its position: "Expecting value at column 5" (its messages for an unterminated
    string end in "at", which the column completes)."""
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict (one-line errors for missing or malformed files)."""
    path = Path(path)
    if not path.exists():
        raise VllmTrainError(f"config file not found: {path}")
    check_regular_file(path, "config file")
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


def check_can_write(path: Path, flag: str, *, directory: bool = True) -> None:
    """Refuse up front a place a command could not write to at its end: a directory (`directory`) under a
    regular file or where nothing can be created (no permission, /proc), a file in a missing directory or
    onto a directory. Tried by creating (and removing) a temp directory where the output will go."""
    if path.exists() and directory != path.is_dir():
        raise VllmTrainError(f"{flag} {path}: " + ("exists and is not a directory" if directory else
                                                   "is a directory (give a file path)"))
    if not directory and not path.parent.is_dir():
        raise VllmTrainError(f"{flag} {path}: directory {path.parent} does not exist")
    base = path if directory else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise VllmTrainError(f"{flag} {path}: {base} is a file, not a directory")
    try:
        tempfile.TemporaryDirectory(dir=base, prefix=".vllm-train-write-test-").cleanup()
    except OSError as exc:
        raise VllmTrainError(f"{flag} {path}: cannot create files in {base} ({exc.strerror or exc})") from None


BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_bool(value: Any, what: str = "value") -> bool:
    """A boolean as a flag or config file gives it: true/false, yes/no, 1/0 (any case; YAML's booleans and
    the integers 1 and 0 too). Anything else is refused: ``maybe`` is no answer, and reading it as false
    would run what the user did not ask for."""
    word = str(value).strip().lower() if isinstance(value, (str, bool, int)) else None
    if word not in BOOLEANS:
        raise VllmTrainError(f"{what}: {value!r} is not a boolean (true/false, yes/no, 1/0)")
    return BOOLEANS[word]
