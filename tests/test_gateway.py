"""The middleware `vllm-train serve` puts in front of every vLLM server route (`engine.gateway.ServeGuard`),
on a stand-in app with vLLM's answer shapes (the real servers: tests/test_serve.py)."""

from __future__ import annotations

import json

import pytest

KEY = "s3cret-key"
STAGED = "/dev/shm/vllm-train-adapters-0/group-0123456789abcdef/sft-v2-deadbeef"
MODEL = "/home/alice/models/tiny-llama"


def _stand_in_vllm():
    """Routes shaped like vLLM's: the model list with absolute roots, a completion that names the model
    it was asked for, a LoRA load that fails naming a path, and whatever else (a catch-all)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    seen: list[dict] = []

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": "tiny-llama", "object": "model", "root": MODEL, "parent": None, "owned_by": "vllm"},
            {"id": "sft-v2", "object": "model", "root": STAGED, "parent": "tiny-llama", "owned_by": "vllm"}]})

    async def completions(request):
        body = await request.json()
        seen.append(body)
        return JSONResponse({"model": body["model"], "choices": []})

    async def load(request):
        body = await request.json()
        return JSONResponse({"error": {"message": f"No adapter found for {body.get('lora_path')} (from {MODEL})",
                                       "code": 404}}, status_code=404)

    async def anything(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/load_lora_adapter", load, methods=["POST"]),
                            Route("/{path:path}", anything, methods=["GET", "POST", "DELETE"])])
    return app, seen


@pytest.fixture
def client(monkeypatch):
    from starlette.testclient import TestClient

    from vllm_train.engine import gateway

    monkeypatch.setenv(gateway.API_KEY_ENV, KEY)
    monkeypatch.setenv(gateway.MODEL_ENV, MODEL)
    monkeypatch.setenv(gateway.MAX_RANK_ENV, "16")
    app, seen = _stand_in_vllm()
    c = TestClient(gateway.ServeGuard(app))
    c.seen = seen
    return c


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"), ("POST", "/adapters"), ("DELETE", "/adapters/sft-v2"),
    ("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/metrics"), ("GET", "/health"), ("POST", "/pause"),
    ("GET", "/vllm-train/server"), ("POST", "/vllm-train/aliases"), ("GET", "/no/such/route"),
])
def test_every_route_needs_the_key(client, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-Api-Key": KEY}):
        response = client.request(method, path, headers=headers, json={"model": "sft-v2"})
        assert response.status_code == 401, (headers, response.text)
        assert "API key" in response.json()["error"]["message"]
    assert client.seen == []
    assert client.request(method, path, headers=AUTH, json={"model": "sft-v2"}).status_code != 401


def test_models_and_errors_carry_no_absolute_paths(client):
    listing = client.get("/v1/models", headers=AUTH)
    assert listing.status_code == 200 and "/" not in "".join(c["root"] for c in listing.json()["data"])
    assert [c["root"] for c in listing.json()["data"]] == ["tiny-llama", "sft-v2-deadbeef"]
    assert int(listing.headers["content-length"]) == len(listing.content)
    error = client.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "x-v1", "lora_path": "/srv/a/b/x"})
    assert error.status_code == 404
    assert error.json()["error"]["message"] == "No adapter found for x (from tiny-llama)"
    assert client.get("/vllm-train/server", headers=AUTH).json() == {"model": MODEL, "max_lora_rank": 16,
                                                                      "aliases": {}}


def test_alias_answers_with_its_version(client):
    assert client.post("/vllm-train/aliases", headers=AUTH, json={"sft": "sft-v2"}).json() == {
        "aliases": {"sft": "sft-v2"}}
    answer = client.post("/v1/completions", headers=AUTH, json={"model": "sft", "prompt": "1 + 1 ="})
    assert answer.json()["model"] == "sft-v2"
    assert client.seen[-1] == {"model": "sft-v2", "prompt": "1 + 1 ="}
    assert client.post("/v1/completions", headers=AUTH, json={"model": "tiny-llama"}).json()["model"] == "tiny-llama"
    cards = {c["id"]: c for c in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert cards["sft"]["root"] == "sft-v2" and cards["sft"]["parent"] == "tiny-llama"
    client.post("/vllm-train/aliases", headers=AUTH, json={"sft": None})
    assert "sft" not in {c["id"] for c in client.get("/v1/models", headers=AUTH).json()["data"]}
    for bad in ([1], {"sft": 3}, "x"):
        assert client.post("/vllm-train/aliases", headers=AUTH, content=json.dumps(bad)).status_code == 400


def test_without_a_key_nothing_is_guarded_but_paths_stay_hidden(monkeypatch):
    from starlette.testclient import TestClient

    from vllm_train.engine import gateway

    monkeypatch.delenv(gateway.API_KEY_ENV, raising=False)
    app, _ = _stand_in_vllm()
    client = TestClient(gateway.ServeGuard(app))
    assert client.get("/health").status_code == 200
    assert MODEL not in client.get("/v1/models").text
