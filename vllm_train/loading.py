"""The one boundary between a user's files and the libraries that load them (transformers, tokenizers,
safetensors, jinja2, json).

Every call into such a library that reads a model, tokenizer, chat template or adapter runs inside
`library_errors(where)`. What the library raises about the file -- an OSError, malformed JSON, a
safetensors error, a size mismatch, a Jinja syntax or template error, a bad config value, a recursion or
integer-size limit -- becomes one `VllmTrainError` line naming `where`; the CLI prints it and exits 2.
Our own errors pass through unchanged, and so do KeyboardInterrupt and SystemExit (not `Exception`s).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from vllm_train.errors import VllmTrainError
from vllm_train.files import json_problem


@contextlib.contextmanager
def library_errors(where: str | Path) -> Iterator[None]:
    """Run the block; a library's exception becomes one line ``WHERE: what went wrong``."""
    try:
        yield
    except VllmTrainError:
        raise
    except Exception as exc:
        raise VllmTrainError(f"{where}: {describe(exc)}") from None


def describe(exc: BaseException) -> str:
    """One line for a library's exception: the first line of its message, with its kind where it helps."""
    import jinja2

    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"chat template syntax error at line {exc.lineno}: {exc.message}"
    if isinstance(exc, jinja2.TemplateError):
        return f"chat template error: {exc.message or type(exc).__name__}"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON ({json_problem(exc)})"
    if isinstance(exc, RecursionError):
        return "nested too deeply to read (a recursion limit)"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if isinstance(exc, RuntimeError) and "size mismatch" in str(exc):  # torch's load_state_dict, many lines
        text = next(line for line in lines if "size mismatch" in line)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
