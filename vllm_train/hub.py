"""Names of models and adapters -> local directories: a local path as given, or a Hugging Face hub id
(``ORG/NAME``) fetched once with ``huggingface_hub.snapshot_download`` into the hub cache, whose snapshot
directory the Hugging Face loaders and vLLM then both read (one download shared by both).

The environment is read at each call, not at import: ``HF_HUB_CACHE`` / ``HF_HOME`` pick the cache and
``HF_HUB_OFFLINE=1`` resolves from the cache alone. A local path wins over a hub id of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vllm_train.errors import VllmTrainError

# A hub repo id as Hugging Face spells it: NAME or ORG/NAME, no leading '.', '/' or '~', no '..'.
# Files neither transformers nor vLLM loads: other frameworks' weights, and Meta's original checkpoints
# (``original/consolidated.*.pth``, as large as the model itself)
NOT_LOADED = ["*.gguf", "*.onnx", "onnx/*", "*.msgpack", "*.h5", "*.tflite", "*.ot", "*.mlmodel", "coreml/*",
              "openvino/*", "original/*", "*.pth"]
HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def is_hub_id(name: str) -> bool:
    """True when `name` is not an existing local path and is spelled like a hub repo id (``ORG/NAME``)."""
    text = str(name)
    return not Path(text).expanduser().exists() and "/" in text and bool(HUB_ID_RE.match(text)) and ".." not in text


def model_reference(name: str) -> str:
    """What a saved adapter records as its base (``base_model_name_or_path``): the hub id as given, or the
    absolute path of a local directory (so PEFT's ``AutoPeftModelForCausalLM`` finds it from anywhere)."""
    text = str(name)
    return text if is_hub_id(text) else os.path.abspath(os.path.expanduser(text))


def hub_cache_dir() -> str | None:
    """The hub cache from the environment now (None: huggingface_hub's own default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(name: str, revision: str | None = None, what: str = "--model") -> str:
    """The local directory of `name`: a local path unchanged, a hub id downloaded (or found in the cache).
    A hub id that cannot be had raises one `VllmTrainError` line naming `what`, the id and the reason."""
    text = str(name)
    if not is_hub_id(text):
        return text
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return snapshot_download(text, revision=revision, cache_dir=hub_cache_dir(), local_files_only=offline,
                                 ignore_patterns=NOT_LOADED)
    except Exception as exc:  # RepositoryNotFoundError, LocalEntryNotFoundError, network errors, ...
        where = f"revision {revision}" if revision else "its main revision"
        if offline:
            reason = (f"not in the hub cache {hub_cache_dir() or '(default)'} with HF_HUB_OFFLINE=1 "
                      f"(download it once online, or give a local directory)")
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VllmTrainError(f"{what} {text}: not a local directory, and cannot get {where} from the Hugging Face "
                             f"hub: {reason}") from None


def repo_id_of(name: str) -> str:
    """`name` as the hub id it stands for: a snapshot directory of the hub cache
    (``.../models--ORG--NAME/snapshots/<commit>``) -> ``ORG/NAME``; anything else unchanged."""
    parts = Path(str(name).rstrip("/")).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return str(name)
