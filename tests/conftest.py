"""Shared fixtures. One vLLM engine per test session (engine start costs seconds; two in-process
engines in one process are not supported), on the shipped tiny model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from vllm_train.assets import TINY_MODEL, data_file  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return str(TINY_MODEL)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from vllm_train.trainers.common import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The session's one real vLLM engine (CPU in CI): LoRA on, max rank 16, two adapter slots."""
    from vllm_train.engine.llm import EngineOptions, VLLMEngine

    eng = VLLMEngine(tiny_model, EngineOptions(max_lora_rank=16, max_loras=2))
    yield eng
    eng.close()


@pytest.fixture
def shipped():
    """Path of a shipped data file: shipped('sft_train.jsonl')."""
    return data_file
