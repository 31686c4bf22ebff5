"""Environments: loading, tool schemas from hints and docstrings, the author's errors (VllmTrainError
naming class and method) versus the model's (text the model reads), and the tool timeout."""

from __future__ import annotations

import time

import pytest

from vllm_train.agents.environment import load_environment, tool_text
from vllm_train.errors import VllmTrainError


class Calculator:
    def __init__(self):
        self.calls = []

    def reset(self, **row) -> str | None:
        self.answer = row["answer"]
        return " Use the tools."

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.calls.append(("add", a, b))
        return a + b

    def divide(self, a: float, b: float) -> float:
        """Divide a by b.

        Args:
            a: The dividend.
            b: The divisor.
        """
        return a / b

    def wait(self, seconds: float) -> str:
        """Sleep.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "awake"

    def get_reward(self) -> float:
        return 1.0 if ("add", 2, 3) in self.calls else 0.0

    def _private_helper(self):
        return "not a tool"


ADD_SCHEMA = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "description": "The first number."},
        "b": {"type": "integer", "description": "The second number."}}, "required": ["a", "b"]},
    "return": {"type": "integer"}}}


def test_tools_are_the_public_methods_with_their_schemas():
    env_class = load_environment(Calculator)
    assert env_class.tool_names == ["add", "divide", "wait"]
    assert env_class.tools[0] == ADD_SCHEMA
    assert (env_class.has_reset, env_class.has_respond, env_class.has_reward) == (True, False, True)


def test_one_fresh_instance_per_episode_and_its_hooks():
    env_class = load_environment(Calculator)
    first, second = env_class.create(), env_class.create()
    assert first.reset({"answer": 5}) == " Use the tools."
    assert first.call_tool("add", {"a": 2, "b": 3}) == ("5", False)
    assert first.reward() == 1.0 and second.instance.calls == []


def test_the_models_errors_come_back_as_tool_text():
    env = load_environment(Calculator).create(tool_timeout=0.2)
    assert env.call_tool("divide", {"a": 1, "b": 0}) == ("Error: ZeroDivisionError: division by zero", True)
    text, failed = env.call_tool("add", {"a": 1})
    assert failed and text.startswith("Error: TypeError:") and "'b'" in text
    assert env.call_tool("mul", {}) == ("Error: unknown tool 'mul'; the tools are ['add', 'divide', 'wait']", True)
    assert env.call_tool("_private_helper", {}).error


def test_a_slow_tool_times_out():
    env = load_environment(Calculator).create(tool_timeout=0.1)
    started = time.monotonic()
    assert env.call_tool("wait", {"seconds": 1.0}) == ("Error: tool 'wait' timed out after 0.1 s", True)
    assert time.monotonic() - started < 0.8
    assert env.call_tool("wait", {"seconds": 0.0}) == ("awake", False)


def test_tool_text():
    assert tool_text("5") == "5" and tool_text(5) == "5" and tool_text(None) == "null"
    assert tool_text({"x": [1, "é"]}) == '{"x": [1, "é"]}'
    assert tool_text({1, 2}).startswith("{1")  # not JSON: str()


ENV_FILE = '''
class Game:
    def respond(self, text: str):
        return None if text == "5" else "wrong"
'''


def test_load_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(ENV_FILE)
    from_file = load_environment(f"{tmp_path / 'my_envs.py'}:Game")
    assert from_file.has_respond and from_file.tool_names == []
    env = from_file.create()
    assert env.respond("4") == "wrong" and env.respond("5") is None
    assert env.reset({"answer": 5}) is None and env.reward() is None  # no reset, no get_reward: nothing
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_environment("my_envs:Game").name == "Game"


class NoHints:
    def look(self, where):
        """Look.

        Args:
            where: Where.
        """


class BadInit:
    def __init__(self):
        raise RuntimeError("no sandbox")


class BadHooks:
    def reset(self, **row):
        raise KeyError("question")

    def respond(self, text: str):
        return 42

    def get_reward(self):
        return float("nan")


@pytest.mark.parametrize("action,message", [
    (lambda: load_environment("no_colon"), "expected 'module:Class'"),
    (lambda: load_environment("no_such_module_xyz:Env"), "importing 'no_such_module_xyz' failed"),
    (lambda: load_environment("missing.py:Env"), "file not found"),
    (lambda: load_environment("json:NoSuchEnv"), "'json' has no attribute 'NoSuchEnv'"),
    (lambda: load_environment("json:dumps"), "'dumps' is a function, not a class"),
    (lambda: load_environment(NoHints), r"NoHints.look: a tool needs type hints"),
    (lambda: load_environment(BadInit).create(), r"BadInit\(\): the constructor raised RuntimeError: no sandbox"),
    (lambda: load_environment(BadHooks).create().reset({}), r"BadHooks.reset raised KeyError"),
    (lambda: load_environment(BadHooks).create().respond("x"), r"BadHooks.respond returned int 42; expected str"),
    (lambda: load_environment(BadHooks).create().reward(), r"BadHooks.get_reward returned nan"),
])
def test_the_authors_errors_name_class_and_method(action, message):
    with pytest.raises(VllmTrainError, match=message):
        action()
