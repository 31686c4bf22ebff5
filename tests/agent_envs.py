"""Environments for the multi-turn RL tests (importable as ``agent_envs:Class`` by the CLI in a subprocess)."""

from __future__ import annotations


class TryAgain:
    """Multi-turn without tools: every answer gets "try again"; reward 1 when the last answer is the sum."""

    def reset(self, **row):
        self.answer, self.last = str(row.get("answer")), ""

    def respond(self, text: str) -> str:
        self.last = text
        return "try again"

    def get_reward(self) -> float:
        return float(self.last.strip() == self.answer)


class NoReward:
    def respond(self, text: str) -> None:
        return None


class BrokenConstructor(TryAgain):
    def __init__(self):
        raise RuntimeError("no sandbox")


class BrokenReset(TryAgain):
    def reset(self, **row):
        raise KeyError("question")


class BrokenRespond(TryAgain):
    def respond(self, text: str) -> str:
        raise ValueError("bad state")


class BadReward(TryAgain):
    def get_reward(self):
        return "yes"


class Calculator:
    """Tool use: the model's every turn is read as calls (by the tests' stub parser) to `add` and `divide`."""

    def reset(self, **row):
        self.results = []

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first addend
            b: the second addend
        """
        self.results.append(a + b)
        return a + b

    def divide(self, a: int, b: int) -> float:
        """Divide a by b.

        Args:
            a: the dividend
            b: the divisor
        """
        return a / b

    def get_reward(self) -> float:
        return float(len(self.results))
