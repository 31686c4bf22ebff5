"""The shipped toy world: a tiny pretrained model and its data sets (built by scripts/build_toy_world.py)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TINY_MODEL = ASSETS_DIR / "tiny-llama"
TINY_TP_MODEL = ASSETS_DIR / "tiny-llama-2kv"  # the same model with 2 KV heads: splits over 2 tensor-parallel ranks
# tiny-llama's recipe plus transcripts that call an `add` tool (Hermes format): the tool-using agent examples
TINY_TOOLS_MODEL = ASSETS_DIR / "tiny-llama-tools"
DATA_DIR = ASSETS_DIR / "data"


def data_file(name: str) -> Path:
    """Path of a shipped data file, e.g. data_file("sft_train.jsonl")."""
    return DATA_DIR / name
