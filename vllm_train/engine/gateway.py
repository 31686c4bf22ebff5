"""What `vllm-train serve` adds to each vLLM OpenAI server process: one ASGI middleware, installed with
vLLM's ``--middleware`` option (the same in vLLM 0.26 and 0.32), outermost, so it sees every request.

* **An API key on every route** (``$VLLM_TRAIN_API_KEY`` in the server's environment): vLLM's own
  ``--api-key`` guards only ``/v1``-style prefixes, not runtime LoRA loading through the SageMaker
  routes (``/adapters``, ``/invocations``), ``/tokenize``, ``/pause``, ``/metrics`` and the rest.
* **No absolute server paths to clients:** the ``root`` of each card in ``GET /v1/models`` and any path
  in an error response shrink to their last component (a staged version's directory name).
* **Stable aliases:** the publisher points ``NAME`` at the newest version ``NAME-vN`` once every replica
  serves it (``POST /vllm-train/aliases``); a request for model ``NAME`` is answered by that version
  (the response names it), and ``GET /v1/models`` lists the alias with ``root`` = its version.
* ``GET /vllm-train/server``: the base model's path and the server's max LoRA rank, which the publisher
  validates adapters against.

State (the aliases) lives in this process: one API server process per replica, as `engine.replicas`
starts them. Runs inside vLLM's server; imports only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

API_KEY_ENV = "VLLM_TRAIN_API_KEY"
MODEL_ENV = "VLLM_TRAIN_SERVER_MODEL"
MAX_RANK_ENV = "VLLM_TRAIN_SERVER_MAX_LORA_RANK"
OWN_PREFIX = "/vllm-train/"
ALIAS_OWNER = "vllm-train-alias"  # `owned_by` of the alias cards in GET /v1/models
# An absolute path of two or more components (not the path part of a URL): shown as its last component.
_ABS_PATH_RE = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"`,;:()\[\]{}<>]+/)+([^\s/'\"`,;:()\[\]{}<>]+)")


def scrub_paths(text: str) -> str:
    return _ABS_PATH_RE.sub(r"\1", text)


class ServeGuard:
    """The middleware (vLLM builds it as ``ServeGuard(app)``)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app
        key = os.environ.get(API_KEY_ENV)
        self.key_sha = hashlib.sha256(key.encode()).digest() if key else None
        self.model = os.environ.get(MODEL_ENV, "")
        rank = os.environ.get(MAX_RANK_ENV, "")
        self.max_lora_rank = int(rank) if rank.isdigit() else None
        self.aliases: dict[str, str] = {}  # alias -> served version name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        if self.key_sha is not None and not self._authorized(scope):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _send_json(send, 401, {"error": {
                "message": "missing or wrong API key (send 'Authorization: Bearer KEY')", "type": "Unauthorized",
                "code": 401}})
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith(OWN_PREFIX):
            return await self._own_route(scope, receive, send)
        if scope["method"] == "POST" and self.aliases and _is_json(scope):
            scope, receive = await self._resolve_alias(scope, receive)
        await self.app(scope, receive, self._scrubbing(send, models=path == "/v1/models"))

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return secrets.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self.key_sha)
        return False

    # ---- our routes ------------------------------------------------------------------------------
    async def _own_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, method = scope["path"][len(OWN_PREFIX):], scope["method"]
        if route == "server" and method == "GET":
            return await _send_json(send, 200, {"model": self.model, "max_lora_rank": self.max_lora_rank,
                                                "aliases": self.aliases})
        if route == "aliases" and method == "POST":
            try:
                update = json.loads(await _read_body(receive))
                ok = isinstance(update, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                                      for k, v in update.items())
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
            if not ok:
                return await _send_json(send, 400, {"error": {
                    "message": "expected a JSON object {alias: version name or null}", "code": 400}})
            for alias, target in update.items():
                if target is None:
                    self.aliases.pop(alias, None)
                else:
                    self.aliases[alias] = target
            return await _send_json(send, 200, {"aliases": self.aliases})
        return await _send_json(send, 404, {"error": {"message": f"no route {method} {scope['path']}", "code": 404}})

    # ---- aliases in requests ---------------------------------------------------------------------
    async def _resolve_alias(self, scope: Scope, receive: Receive) -> tuple[Scope, Receive]:
        """A JSON request body whose "model" is an alias gets the alias's version instead."""
        body = await _read_body(receive)
        try:
            request = json.loads(body) if body else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            request = None  # vLLM answers malformed bodies itself
        if isinstance(request, dict) and isinstance(request.get("model"), str) and request["model"] in self.aliases:
            request["model"] = self.aliases[request["model"]]
            body = json.dumps(request).encode()
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # waits for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return scope, replay

    # ---- responses -------------------------------------------------------------------------------
    def _scrubbing(self, send: Send, models: bool) -> Send:
        """`send` that rewrites /v1/models and error responses (buffered: both are small)."""
        held: dict[str, Any] = {}

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start" and (models or message["status"] >= 400):
                held["start"], held["body"] = message, []
                return
            if message["type"] != "http.response.body" or "start" not in held:
                return await send(message)
            held["body"].append(message.get("body", b""))
            if message.get("more_body"):
                return
            start = held.pop("start")
            body = b"".join(held.pop("body"))
            body = self._models_body(body) if models and start["status"] < 400 else \
                scrub_paths(body.decode("utf-8", "replace")).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return wrapped

    def _models_body(self, body: bytes) -> bytes:
        try:
            listing = json.loads(body)
            cards = listing["data"]
            base = next(c for c in cards if not c.get("parent"))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, StopIteration):
            return scrub_paths(body.decode("utf-8", "replace")).encode()
        for card in cards:
            if isinstance(card.get("root"), str):
                card["root"] = PurePosixPath(card["root"]).name or card["root"]
        served = {c.get("id") for c in cards}
        for alias, target in self.aliases.items():
            if target in served:
                cards.append({**base, "id": alias, "root": target, "parent": base["id"], "owned_by": ALIAS_OWNER})
        return json.dumps(listing).encode()


def _is_json(scope: Scope) -> bool:
    return any(k == b"content-type" and v.split(b";")[0].strip().lower() == b"application/json"
               for k, v in scope["headers"])


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _send_json(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
