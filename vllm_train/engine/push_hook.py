"""`make_push_hook`: a trainer's `on_save` callback that publishes each saved adapter to running vLLM
OpenAI servers as the next version of a name (what `vllm-train sft --push-to` uses)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from vllm_train.engine.server import NAME_RE, VERSION_RE, AdapterPublisher
from vllm_train.errors import VllmTrainError


def make_push_hook(urls: str | list[str], name: str, *, keep: int = 2, strict: bool = False, check: bool = True,
                   **publisher_kwargs) -> Callable[[Path], None]:
    """An `on_save` callback that publishes every adapter dir a trainer writes (checkpoints and final)
    to the servers at `urls` as the next version of `name`:

        trainer = LoRATrainer(model, config, on_save=make_push_hook("http://127.0.0.1:8000", name="sft"))

    A failed push prints one warning line and training goes on (the previous version keeps serving);
    `strict=True` raises instead. Name and servers are checked now (`check=False` skips the servers), so
    a typo or a server that is not up fails before training starts.
    """
    publisher = AdapterPublisher(urls, keep=keep, **publisher_kwargs)
    if not isinstance(name, str) or not NAME_RE.match(name) or VERSION_RE.match(name):
        raise VllmTrainError(f"--push-name {name!r} is invalid (letters, digits, '.', '_', '-'; no '-vN' suffix)")
    if check:
        publisher.states("start the servers before training with --push-to")

    def push(path: Path) -> None:
        try:
            served = publisher.publish(path, name)
        except VllmTrainError as exc:
            if strict:
                raise
            print(f"warning: push of {path} failed: {exc}", file=sys.stderr, flush=True)
            return
        print(f"pushed {path} -> {served} on {len(publisher.urls)} replica(s)", file=sys.stderr, flush=True)

    push.publisher = publisher  # type: ignore[attr-defined]
    return push
