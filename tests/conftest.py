"""Shared fixtures. One vLLM engine per test session (engine start costs seconds; two in-process
engines in one process are not supported), on the shipped tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    from vllm_train.models import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The session's one real vLLM engine (CPU in CI): LoRA on, max rank 16, two adapter slots, serving
    tolerances.ENGINE_DTYPE (fp32 on CPU, bf16 on CUDA)."""
    from tolerances import ENGINE_DTYPE

    from vllm_train.engine.llm import EngineOptions, VLLMEngine

    eng = VLLMEngine(tiny_model, EngineOptions(max_lora_rank=16, max_loras=2, dtype=ENGINE_DTYPE))
    yield eng
    eng.close()


@pytest.fixture
def shipped():
    """Path of a shipped data file: shipped('sft_train.jsonl')."""
    return data_file


def _run_result_script(script, args: list[str], env: dict[str, str], timeout: int) -> dict:
    """Run a test's script in a fresh interpreter (one vLLM engine per process) with `env` added to
    the environment; return the JSON it printed on its last ``RESULT `` line, or fail with its stderr."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="session")
def run_result_script():
    """`run_result_script(script, args, env, timeout) -> dict`: see `_run_result_script`."""
    return _run_result_script
