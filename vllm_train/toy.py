"""The toy world: two-digit addition, a skill whose answers can be checked.

The shipped base model (``vllm_train/assets/tiny-llama``) was pretrained by ``scripts/build_toy_world.py``
on text in which problems with a carry in the units column are answered *without* the carry most of
the time (``47 + 38 = 75``). So the base model is imperfect in a known, repairable way, and SFT, DPO
and RL each have room to show a real before -> after on held-out problems.
"""

from __future__ import annotations

import re

_INT_RE = re.compile(r"-?\d+")
_INT_TEXT_RE = re.compile(r"\s*-?\d+\s*")


def question(a: int, b: int) -> str:
    """The user-facing prompt text for one problem."""
    return f"What is {a} + {b}?"


def correct_answer(a: int, b: int) -> int:
    return a + b


def forgot_carry_answer(a: int, b: int) -> int:
    """The systematic mistake the base model was taught: dropping the units-column carry."""
    return a + b - 10 if has_carry(a, b) else a + b


def has_carry(a: int, b: int) -> bool:
    return (a % 10) + (b % 10) >= 10


def parse_answer(completion: str) -> int | None:
    """The first integer in a completion, or None if there is none."""
    match = _INT_RE.search(completion)
    return int(match.group()) if match else None


def is_correct(completion: str, answer: int) -> bool:
    return parse_answer(completion) == int(answer)


def correctness_reward(prompt, completion: str, example: dict) -> float:
    """Reward function for RL on the toy world: 1.0 for the right sum, else 0.0.

    Signature ``(prompt, completion, example) -> float`` is the one every reward callable follows;
    ``example`` is the prompt record, which carries the checkable ``answer``.
    """
    return 1.0 if is_correct(completion, example["answer"]) else 0.0


def check_answer(record: dict) -> str | None:
    """What `correctness_reward` needs of a prompt record: an integer ``answer`` (a float of integer value,
    or an integer's digits in a string, read as that integer). Anything else would score every sample 0
    (a missing answer, text such as "three") or fail mid-run (NaN, inf): refused on the first pass."""
    if "answer" not in record:
        return "missing field 'answer' (the toy reward compares each completion with it)"
    value = record["answer"]
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer()) \
        or (isinstance(value, str) and _INT_TEXT_RE.fullmatch(value) is not None)
    return None if ok else f"field 'answer': {value!r} is not an integer"


correctness_reward.check_record = check_answer  # run over every record before training (rewards.loading)
