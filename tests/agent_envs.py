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
