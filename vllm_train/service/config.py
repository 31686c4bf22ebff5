"""`vllm-train service`'s settings, validated in one place (the CLI maps its flags onto this)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from vllm_train.errors import VllmTrainError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
KEY_PREFIX = "tml-"  # the tinker SDK refuses to send any other key (its ApiKeyAuthProvider)


@dataclass
class ServiceConfig:
    model: str  # a local directory or a hub id: the one base every adapter trains on
    host: str = "127.0.0.1"
    port: int = 8000
    # each key is a tenant that sees only its own runs; none: any tml- key is accepted, on loopback only
    api_keys: tuple[str, ...] = ()
    max_adapters: int = 4
    max_lora_rank: int = 32
    state_dir: str | None = None
    max_batch_tokens: int = 65536  # tokens in one forward/backward pass (and one request)
    sampling: bool = True  # start a vLLM engine for sampling (tests of training alone may leave it off)
    kv_cache_gib: float | None = None  # vLLM's KV cache (CPU default 0.5 GiB)
    poll_seconds: float = 20.0  # how long a retrieve_future waits for a result before "try again"
    session_ttl_seconds: float = 600.0  # a session without a heartbeat this long ends; its runs are unloaded
    extra_engine: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.api_keys = tuple(self.api_keys)
        for key in self.api_keys:
            if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + 8:
                raise VllmTrainError(f"--api-key: keys must start with '{KEY_PREFIX}' (the tinker SDK sends no other) "
                                     "and have at least 8 more characters")
        if not self.api_keys and self.host not in LOOPBACK:
            raise VllmTrainError(f"--host {self.host} without an API key would let anyone who reaches it train and "
                                 "sample: set $VLLM_TRAIN_API_KEY (or --api-key)")
        if not 1 <= self.max_adapters <= 256:
            raise VllmTrainError(f"--max-adapters {self.max_adapters}: expected 1..256")
        if self.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise VllmTrainError(f"--max-lora-rank {self.max_lora_rank}: vLLM accepts 1, 8, 16, 32, 64, 128, 256, "
                                 "320 or 512")
        if not 0 <= self.port <= 65535:
            raise VllmTrainError(f"--port {self.port}: expected 0..65535")
        if not self.session_ttl_seconds > 0:
            raise VllmTrainError(f"--session-ttl-seconds {self.session_ttl_seconds}: expected > 0 (the SDK "
                                 "heartbeats every 10 s)")
        if self.max_batch_tokens < 1:
            raise VllmTrainError(f"--max-batch-tokens {self.max_batch_tokens}: expected >= 1")


def owner_id(api_key: str) -> str:
    """Who a key is, without keeping the key: its SHA-256, shortened."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:24]
