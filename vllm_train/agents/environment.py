"""Environments an episode talks to: a user-written class, one fresh instance per episode.

Two shapes, one loader (`load_environment`, from ``module:Class``, ``path/to/file.py:Class`` or the class):

- TRL's ``environment_factory`` shape, for tool use. ``reset(self, **row) -> str | None`` receives every
  field of the prompt record (a returned string is appended to the last user message), and every other
  public method is a tool the model may call. A tool's JSON schema (OpenAI function format, what chat
  templates take as ``tools=``) comes from its type hints and Google-style ``Args:`` docstring, through
  transformers' `get_json_schema` -- the same schemas TRL gives the template.
- Multi-turn without tools: ``respond(self, text) -> str | None``: the model's turn in, the next user
  message out; None ends the episode.

Either may define ``get_reward(self) -> float`` to own the episode's reward.

Whose fault is an error decides where it goes. Everything the environment's author controls -- the
import, the constructor, ``reset``/``respond``/``get_reward`` raising or returning the wrong type, a tool
without a schema -- is a `VllmTrainError` naming the class and method: the run stops. What the *model*
controls is not an error: a tool that raises (bad arguments, a failed lookup), an unknown tool, or a tool
that runs past ``tool_timeout`` returns its error as the tool's text, which the model reads and can
recover from; `ToolResult.error` marks it so the episode counts it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import numbers
import threading
from pathlib import Path
from typing import Any, NamedTuple

from vllm_train.errors import VllmTrainError

HOOKS = ("reset", "respond", "get_reward")  # the environment's own methods; every other public one is a tool


class ToolResult(NamedTuple):
    text: str  # what goes back to the model as the tool message's content
    error: bool = False  # the tool raised, timed out or does not exist


def load_environment(spec: str | type) -> EnvironmentClass:
    """The environment class named by ``module:Class`` / ``file.py:Class``, or given as a class."""
    if isinstance(spec, type):
        return EnvironmentClass(spec)
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise VllmTrainError(f"environment {spec!r}: expected 'module:Class' or 'path/to/file.py:Class'")
    module_name, class_name = spec.split(":")
    cls = getattr(_import(module_name, spec), class_name, None)
    if cls is None:
        raise VllmTrainError(f"environment {spec!r}: '{module_name}' has no attribute '{class_name}'")
    if not isinstance(cls, type):
        raise VllmTrainError(f"environment {spec!r}: '{class_name}' is a {type(cls).__name__}, not a class")
    return EnvironmentClass(cls)


def _import(module_name: str, spec: str):
    try:
        if not module_name.endswith(".py"):
            return importlib.import_module(module_name)
        path = Path(module_name)
        if not path.is_file():
            raise VllmTrainError(f"environment {spec!r}: file not found: {path}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        return module
    except VllmTrainError:
        raise
    except Exception as exc:
        raise VllmTrainError(f"environment {spec!r}: importing '{module_name}' failed: "
                             f"{type(exc).__name__}: {exc}") from None


class EnvironmentClass:
    """An environment class, checked once: its tools and their schemas, and which hooks it defines."""

    def __init__(self, cls: type):
        self.cls = cls
        self.name = cls.__qualname__
        self.has_reset, self.has_respond, self.has_reward = (callable(getattr(cls, h, None)) for h in HOOKS)
        self.tool_names = [n for n in _public_methods(cls) if n not in HOOKS]
        self.tools = [self._schema(n) for n in self.tool_names]

    def _schema(self, name: str) -> dict:
        from transformers.utils.chat_template_utils import get_json_schema

        try:
            return get_json_schema(getattr(self.cls, name))
        except Exception as exc:
            raise VllmTrainError(f"environment {self.name}.{name}: a tool needs type hints and a Google-style "
                                 f"docstring with 'Args:' ({type(exc).__name__}: {exc})") from None

    def create(self, tool_timeout: float | None = 30.0) -> EnvironmentInstance:
        """A fresh instance for one episode (the constructor takes no arguments)."""
        try:
            instance = self.cls()
        except Exception as exc:
            raise VllmTrainError(f"environment {self.name}(): the constructor raised "
                                 f"{type(exc).__name__}: {exc}") from None
        return EnvironmentInstance(self, instance, tool_timeout)


def _public_methods(cls: type) -> list[str]:
    """Public functions of `cls` and its bases, in definition order (base classes first)."""
    names = dict.fromkeys(n for klass in reversed(cls.__mro__[:-1]) for n in vars(klass))
    return [n for n in names if not n.startswith("_") and _is_method(inspect.getattr_static(cls, n))]


def _is_method(attribute: Any) -> bool:
    return inspect.isfunction(attribute) or isinstance(attribute, staticmethod)


class EnvironmentInstance:
    """One episode's environment: its hooks, checked, and its tools, run with a timeout."""

    def __init__(self, kind: EnvironmentClass, instance: Any, tool_timeout: float | None):
        self.kind, self.instance, self.tool_timeout = kind, instance, tool_timeout

    @property
    def tools(self) -> list[dict]:
        return self.kind.tools

    @property
    def can_respond(self) -> bool:
        return self.kind.has_respond

    def reset(self, row: dict) -> str | None:
        """``reset(**row)`` (nothing without a reset method): text to append to the last user message."""
        if not self.kind.has_reset:
            return None
        return self._hook("reset", (str, type(None)), **row)

    def respond(self, text: str) -> str | None:
        """The next user message after the model's `text`; None ends the episode."""
        return self._hook("respond", (str, type(None)), text)

    def reward(self) -> float | None:
        """``get_reward()`` as a finite float (None without a get_reward method)."""
        if not self.kind.has_reward:
            return None
        value = self._hook("get_reward", (numbers.Real,))
        if isinstance(value, bool) or not math.isfinite(value):
            raise VllmTrainError(f"environment {self.kind.name}.get_reward returned {value!r}; expected a "
                                 f"finite float")
        return float(value)

    def _hook(self, method: str, types: tuple[type, ...], *args, **kwargs):
        try:
            value = getattr(self.instance, method)(*args, **kwargs)
        except Exception as exc:
            raise VllmTrainError(f"environment {self.kind.name}.{method} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(value, types):
            expected = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise VllmTrainError(f"environment {self.kind.name}.{method} returned {type(value).__name__} "
                                 f"{value!r:.80}; expected {expected}")
        return value

    def call_tool(self, name: str, arguments: dict) -> ToolResult:
        """Run tool `name` with keyword `arguments`; whatever goes wrong comes back as the tool's text."""
        if name not in self.kind.tool_names:
            return ToolResult(f"Error: unknown tool {name!r}; the tools are {self.kind.tool_names}", True)
        method = getattr(self.instance, name)
        finished, outcome = run_with_timeout(lambda: method(**arguments), self.tool_timeout)
        if not finished:
            return ToolResult(f"Error: tool {name!r} timed out after {self.tool_timeout} s", True)
        if isinstance(outcome, BaseException):
            return ToolResult(f"Error: {type(outcome).__name__}: {outcome}", True)
        return ToolResult(tool_text(outcome))


def tool_text(value: Any) -> str:
    """A tool's return value as message text: strings as they are, anything else as JSON (else str())."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def run_with_timeout(fn, timeout: float | None) -> tuple[bool, Any]:
    """(finished, fn()'s value or the exception it raised), waiting at most `timeout` seconds.

    A daemon thread per call, not a ThreadPoolExecutor: a tool that never returns cannot be killed, and
    an executor's worker would then block the interpreter's exit (executors join their threads at exit);
    a daemon thread is abandoned instead. The instance it was using should not be reused -- the episode
    goes on only with the timeout text, and the next episode gets a fresh instance."""
    box: list[Any] = []

    def target():
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 -- the tool's failure is the model's to read
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="vllm-train-tool")
    thread.start()
    thread.join(timeout)
    return (not thread.is_alive(), box[0] if box else None)
