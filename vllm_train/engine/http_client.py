"""The HTTP side of vLLM's OpenAI server that publishing needs (stdlib only): requests with one-line
failures and an optional API key, URL parsing, and what a replica serves (``GET /v1/models``)."""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_train.engine.gateway import ALIAS_OWNER
from vllm_train.errors import VllmTrainError

VERSION_RE = re.compile(r"^(?P<name>.+)-v(?P<n>\d+)$")  # a served version: NAME-vN


class HTTPFailure(Exception):
    def __init__(self, url: str, message: str, status: int | None = None):
        super().__init__(message)
        self.url, self.status = url, status


def request(method: str, url: str, payload: dict | None = None, timeout: float = 60.0,
            api_key: str | None = None) -> Any:
    """The decoded JSON (or text) answer; raises `HTTPFailure` with the server's one-line message."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            error = json.loads(body)["error"]
            message = error["message"] if isinstance(error, dict) else str(error)
        except Exception:
            message = body.strip()[:300] or exc.reason
        if exc.code == 401:
            message += " (pass --api-key or set $VLLM_TRAIN_API_KEY)"
        raise HTTPFailure(url, f"HTTP {exc.code}: {message}", exc.code) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
        reason = getattr(exc, "reason", exc)
        raise HTTPFailure(url, f"not reachable ({reason})") from None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body


def healthy(url: str, api_key: str | None = None) -> bool:
    try:
        request("GET", f"{url}/health", timeout=2, api_key=api_key)
        return True
    except Exception:  # not up yet: refused, reset, a half-started HTTP server
        return False


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise VllmTrainError("empty server URL")
    if "://" not in url:
        url = f"http://{url}"
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    items = urls.split(",") if isinstance(urls, str) else [u for part in urls for u in str(part).split(",")]
    out = [normalize_url(u) for u in items if u.strip()]
    if not out:
        raise VllmTrainError("no server URL given")
    if len(set(out)) != len(out):
        raise VllmTrainError(f"server URL listed twice: {', '.join(out)}")
    return out


@dataclass
class ReplicaState:
    """What one replica serves, from ``GET /v1/models``."""
    url: str
    base_name: str
    base_root: str
    adapters: dict[str, str]  # served name -> its files (the staged directory's name behind our middleware)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> served name (`engine.gateway`)

    def versions(self, name: str) -> list[int]:
        found = []
        for served in self.adapters:
            m = VERSION_RE.match(served)
            if m and m["name"] == name:
                found.append(int(m["n"]))
        return sorted(found)


def replica_state(url: str, timeout: float = 30.0, api_key: str | None = None) -> ReplicaState:
    body = request("GET", f"{url}/v1/models", timeout=timeout, api_key=api_key)
    try:
        cards = body["data"]
        base = next(c for c in cards if not c.get("parent"))
    except (TypeError, KeyError, StopIteration):
        raise HTTPFailure(url, "GET /v1/models did not return an OpenAI model list") from None
    adapters = {c["id"]: c.get("root") or "" for c in cards if c.get("parent") and c.get("owned_by") != ALIAS_OWNER}
    aliases = {c["id"]: c.get("root") or "" for c in cards if c.get("parent") and c.get("owned_by") == ALIAS_OWNER}
    return ReplicaState(url, base["id"], base.get("root") or base["id"], adapters, aliases)


def server_info(url: str, timeout: float = 30.0, api_key: str | None = None) -> dict | None:
    """What our middleware (`engine.gateway`) reports: the base model's path and max LoRA rank, the
    aliases; None for a vLLM server started without it."""
    try:
        info = request("GET", f"{url}/vllm-train/server", timeout=timeout, api_key=api_key)
    except HTTPFailure as exc:
        if exc.status == 404:
            return None
        raise
    return info if isinstance(info, dict) else None
