"""The HTTP routes the tinker SDK calls (``/api/v1/...``), on FastAPI: JSON in and out, except forward and
forward_backward requests and their results, which the SDK speaks in protobuf (service/wire.py).

Every route needs an API key, sent as the SDK sends it (``X-API-Key``) or as ``Authorization: Bearer``.
Problems answer 4xx with ``{"detail": "<field>: <what is wrong>"}``; an unexpected error answers 500 and
leaves the server running.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from vllm_train.service.config import owner_id
from vllm_train.service.core import Service
from vllm_train.service.fields import get
from vllm_train.service.futures import FutureRecord
from vllm_train.service.problems import BadRequest, NotFound, NotSupported, ServiceProblem, Unauthorized

log = logging.getLogger("vllm_train.service")
PROTOBUF = "application/x-protobuf"


def _key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _owner(service: Service, request: Request) -> str:
    key = _key_of(request)
    if not key:
        raise Unauthorized("missing API key (send X-API-Key: KEY or Authorization: Bearer KEY)")
    allowed = service.config.api_keys
    if allowed and not any(hmac.compare_digest(key.encode(), k.encode()) for k in allowed):
        raise Unauthorized("wrong API key")
    return owner_id(key)


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("body", "not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body", "expected a JSON object")
    return body


def _future(record: FutureRecord, model_id: str | None = None) -> dict:
    return {"request_id": record.request_id, "model_id": model_id}


def build_app(service: Service) -> FastAPI:
    async def expire_sessions():
        while True:
            await asyncio.sleep(min(30.0, service.config.session_ttl_seconds / 2))
            service.expire_sessions()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.futures.bind(asyncio.get_running_loop())
        service.worker.start()
        expiry = asyncio.create_task(expire_sessions())
        yield
        expiry.cancel()
        service.worker.stop()
        service.close()

    app = FastAPI(title="vllm-train service (Tinker API)", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        try:
            request.state.owner = _owner(service, request)
        except ServiceProblem as exc:
            return JSONResponse({"detail": exc.message}, status_code=exc.status)
        return await call_next(request)

    @app.exception_handler(ServiceProblem)
    async def problem_answer(request: Request, exc: ServiceProblem):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected_answer(request: Request, exc: Exception):  # a request's bug must not stop the server
        log.error("unexpected error in %s", request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    api = "/api/v1"

    @app.get(f"{api}/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post(f"{api}/client/config")
    async def client_config():
        # Plain API keys, httpx transport, uncompressed protobuf forward/backward, per-request polling; and
        # forward/backward calls cut by the SDK into requests within --max-batch-tokens: the SDK sizes a chunk
        # by its protobuf bytes, at least 12 a token (an int32 input token and an int64 target)
        return {"pjwt_auth_enabled": False, "use_pyqwest_transport": False, "proto_compress_fwdbwd": False,
                "sample_use_retrieve_futures": False, "custom_loss_server_side": False,
                "sample_join_sampling_session": False, "parallel_fwdbwd_chunks": True,
                "fwdbwd_max_chunk_bytes_count": 12 * service.config.max_batch_tokens}

    @app.post(f"{api}/client/dynamic_config")
    async def client_dynamic_config():
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @app.post(f"{api}/auth/token")
    async def auth_token():
        raise NotSupported("auth/token: this server takes API keys only (no JWT exchange)")

    @app.post(f"{api}/telemetry")
    async def telemetry():
        return {"status": "accepted"}  # the SDK's own diagnostics: not kept

    @app.get(f"{api}/get_server_capabilities")
    async def capabilities():
        return service.capabilities()

    @app.post(f"{api}/create_session")
    async def create_session(request: Request):
        return service.create_session(request.state.owner, await _json(request))

    @app.post(f"{api}/session_heartbeat")
    async def session_heartbeat(request: Request):
        return service.heartbeat(request.state.owner, await _json(request))

    @app.post(f"{api}/sessions/{{session_id}}/finish")
    async def finish_session(request: Request, session_id: str):
        return service.finish_session(request.state.owner, session_id)

    @app.post(f"{api}/create_model")
    async def create_model(request: Request):
        return _future(service.create_model(request.state.owner, await _json(request)))

    @app.post(f"{api}/get_info")
    async def get_info(request: Request):
        return service.get_info(request.state.owner, await _json(request))

    @app.post(f"{api}/forward_backward")
    async def forward_backward(request: Request):
        if PROTOBUF not in request.headers.get("content-type", ""):
            raise BadRequest("body", f"forward_backward takes {PROTOBUF} (as the tinker SDK sends it)")
        if request.headers.get("content-encoding"):
            raise BadRequest("content-encoding", "compressed bodies are not accepted (client config says so)")
        body = await request.body()
        return _future(service.forward_backward(request.state.owner, body))

    def run_operation_route(name: str) -> None:
        """POST {api}/NAME: `service.NAME` on the run the JSON body's `model_id` names, answered with the
        queued job's future (optim_step, unload_model, save_weights_for_sampler, save_weights, load_weights)."""
        operation = getattr(service, name)

        async def route(request: Request):
            body = await _json(request)
            return _future(operation(request.state.owner, body), body.get("model_id"))

        app.post(f"{api}/{name}", name=name)(route)

    for name in ("optim_step", "unload_model", "save_weights_for_sampler", "save_weights", "load_weights"):
        run_operation_route(name)

    @app.post(f"{api}/create_sampling_session")
    async def create_sampling_session(request: Request):
        return service.create_sampling_session(request.state.owner, await _json(request))

    @app.get(f"{api}/samplers/{{sampling_session_id}}")
    async def get_sampler(request: Request, sampling_session_id: str):
        return service.get_sampler(request.state.owner, sampling_session_id)

    @app.post(f"{api}/asample")
    async def asample(request: Request):
        return service.asample(request.state.owner, await _json(request))

    @app.get(f"{api}/training_runs/{{model_id}}/checkpoints")
    async def list_checkpoints(request: Request, model_id: str):
        return service.list_checkpoints(request.state.owner, model_id)

    @app.get(f"{api}/training_runs")
    async def training_runs(request: Request, limit: int = 20, offset: int = 0):
        return service.training_runs(request.state.owner, max(0, min(limit, 1000)), max(0, offset))

    @app.post(f"{api}/retrieve_future")
    async def retrieve_future(request: Request):
        request_id = get(await _json(request), "request_id", str)
        record = service.futures.get(request_id, request.state.owner)
        if record is None:
            raise NotFound(f"request_id: no request {request_id!r} for this API key")
        if not await service.futures.wait(record, service.config.poll_seconds):
            return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
        if record.error is not None:
            return {"error": record.error, "category": record.category}
        if isinstance(record.result, bytes):
            return Response(record.result, media_type=PROTOBUF)
        return record.result

    @app.post(f"{api}/cancel_future")
    async def cancel_future(request: Request):
        get(await _json(request), "request_id", str)
        return {}  # queued work is short; it runs to completion

    @app.api_route(f"{api}/{{rest:path}}", methods=["GET", "POST", "PUT", "DELETE"])
    async def unknown_route(rest: str):
        raise NotFound(f"/api/v1/{rest}: not a route of this server (vllm-train service implements the tinker "
                       "SDK's training, sampling and checkpoint routes)")

    return app
