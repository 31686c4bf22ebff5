"""Building the service from its config and running it with uvicorn: in the foreground (the CLI) or on a
background thread (tests, notebooks: `start_in_thread` returns once it answers)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_train import hub
from vllm_train.service.app import build_app
from vllm_train.service.config import ServiceConfig
from vllm_train.service.core import Service
from vllm_train.service.tenants import TenantModel


def build_service(config: ServiceConfig, engine=None) -> Service:
    """The service for `config`: the base model loaded once for training, and (with sampling on) a vLLM
    engine with one LoRA slot per adapter plus one spare (`VLLMEngine` pins every slot but one). `engine`:
    an engine to use instead of building one (one in-process engine per process: tests share theirs)."""
    from transformers import AutoConfig

    from vllm_train.errors import VllmTrainError

    path = hub.resolve(config.model)
    model_config = AutoConfig.from_pretrained(path)
    tenants = TenantModel(path, config.max_adapters, device="cuda" if torch.cuda.is_available() else "cpu")
    max_context = getattr(model_config, "max_position_embeddings", None) or 2048
    if config.sampling and engine is None:
        from vllm_train.engine.llm import EngineOptions, VLLMEngine

        engine = VLLMEngine(path, EngineOptions(max_lora_rank=config.max_lora_rank, max_loras=config.max_adapters + 1,
                                                kv_cache_gib=config.kv_cache_gib, **config.extra_engine))
    if engine is not None and config.max_lora_rank > engine.options.max_lora_rank:
        raise VllmTrainError(f"--max-lora-rank {config.max_lora_rank}: the engine serves ranks up to "
                             f"{engine.options.max_lora_rank}")
    tokenizer_id = str(Path(path).resolve()) if Path(path).exists() else path  # what the SDK's get_tokenizer loads
    return Service(config, tenants, tokenizer_id=tokenizer_id, vocab_size=model_config.vocab_size,
                   max_context=max_context, engine=engine if config.sampling else None)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class RunningService:
    service: Service
    url: str
    server: object  # uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(service: Service, timeout: float = 60) -> RunningService:
    """Serve `service` on a background thread (port 0 in the config: a free port); returns when it listens."""
    import uvicorn

    config = service.config
    port = config.port or free_port(config.host)
    server = uvicorn.Server(uvicorn.Config(build_app(service), host=config.host, port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="vllm-train-service-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start on {config.host}:{port}")
        time.sleep(0.05)
    return RunningService(service, f"http://{config.host}:{port}", server, thread)


def serve_forever(service: Service) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully (queued work finishes its current job)."""
    import signal

    import uvicorn

    # uvicorn stops gracefully on these signals and then raises them again once it is done: caught here, so
    # the process ends normally (status 0) instead of by the default handler
    stopped: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = uvicorn.Server(uvicorn.Config(build_app(service), host=service.config.host, port=service.config.port,
                                               log_level="warning"))
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
