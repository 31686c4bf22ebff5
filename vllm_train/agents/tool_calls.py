"""Tool calls out of a model turn's text, in the format its chat template taught it.

Each template family writes calls its own way, and the parser must read exactly what the template
renders, so that a parsed call rendered back through the template is the text the model wrote:

- ``hermes`` (Qwen2.5, Qwen3, Hermes; templates containing ``<tool_call>``): one or more
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks after optional content;
- ``llama3_json`` (Llama 3.1-3.3; templates with ``"parameters"`` or ``<|python_tag|>``): the whole turn
  is ``{"name": ..., "parameters": {...}}`` (several joined by ``;``), possibly after ``<|python_tag|>``;
- ``none``: templates without tools: the text is content, never a call.

`parser_for_template` picks one from the template text; a name overrides it. A turn that starts a call
but does not finish a valid one is a parse failure (`ParsedTurn.error`): the episode ends there, since
nothing the environment could answer would be the answer to a call the model meant.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import NamedTuple

from vllm_train.errors import VllmTrainError


class ToolCall(NamedTuple):
    name: str
    arguments: dict

    def as_message_call(self) -> dict:
        """The OpenAI-style entry of an assistant message's ``tool_calls`` (as chat templates read it)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ParsedTurn(NamedTuple):
    content: str  # the text that is not a call
    calls: list[ToolCall]
    error: str | None = None  # set: the turn tried to call a tool and the call is not valid


Parser = Callable[[str], ParsedTurn]

_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


def _call_from_json(text: str, argument_keys: tuple[str, ...]) -> ToolCall | str:
    """A ToolCall from one JSON object, or the reason it is not one."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at char {exc.pos}): {text.strip()[:80]!r}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return f"a call needs a \"name\" string: {text.strip()[:80]!r}"
    key = next((k for k in argument_keys if k in obj), None)
    arguments = obj.get(key, {}) if key else {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"the arguments of {obj['name']!r} are a string that is not JSON"
    if not isinstance(arguments, dict):
        return f"the arguments of {obj['name']!r} must be an object, got {type(arguments).__name__}"
    return ToolCall(obj["name"], arguments)


def parse_hermes(text: str) -> ParsedTurn:
    """``<tool_call>{json}</tool_call>`` blocks; the content is the text before the first block."""
    opened, closed = text.count("<tool_call>"), text.count("</tool_call>")
    if opened == 0 and closed == 0:
        return ParsedTurn(text, [])
    content = text.split("<tool_call>")[0].rstrip("\n")
    if opened != closed:
        return ParsedTurn(content, [], f"{opened} <tool_call> but {closed} </tool_call>")
    calls = []
    for block in _HERMES_BLOCK.findall(text):
        call = _call_from_json(block, ("arguments", "parameters"))
        if isinstance(call, str):
            return ParsedTurn(content, [], call)
        calls.append(call)
    return ParsedTurn(content, calls)


def parse_llama3_json(text: str) -> ParsedTurn:
    """The whole turn as ``{"name": ..., "parameters": {...}}`` (``;``-joined for several), after an
    optional ``<|python_tag|>``; any other text is plain content."""
    body = text.strip()
    tagged = body.startswith(_PYTHON_TAG)
    body = body.removeprefix(_PYTHON_TAG).strip()
    if not tagged and not (body.startswith("{") and '"name"' in body):
        return ParsedTurn(text, [])
    calls = []
    for piece in _split_top_level(body, ";"):
        call = _call_from_json(piece, ("parameters", "arguments"))
        if isinstance(call, str):
            return ParsedTurn("", [], call)
        calls.append(call)
    return ParsedTurn("", calls)


def parse_none(text: str) -> ParsedTurn:
    return ParsedTurn(text, [])


def _split_top_level(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside JSON strings and brackets (a ';' inside an argument stays)."""
    pieces, depth, in_string, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == sep and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


PARSERS: dict[str, Parser] = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "none": parse_none}


def parser_for_template(template: str | None) -> str:
    """The parser name a chat template's text implies (see the module docstring)."""
    template = template or ""
    if "<tool_call>" in template:
        return "hermes"
    if _PYTHON_TAG in template or '"parameters"' in template:
        return "llama3_json"
    return "none"


def get_parser(name: str | None = None, template: str | None = None) -> Parser:
    """The parser called `name`, else the one `template` implies."""
    name = name or parser_for_template(template)
    if name not in PARSERS:
        raise VllmTrainError(f"tool-call parser {name!r}: unknown; expected one of {sorted(PARSERS)}")
    return PARSERS[name]
