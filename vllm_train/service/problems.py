"""The errors a request can meet, each with the HTTP status the server answers and a message that names
the field (or route) at fault. Raised before any state changes; the app turns them into JSON answers."""

from __future__ import annotations


class ServiceProblem(Exception):
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServiceProblem):
    """Malformed or out-of-range input: ``field: what is wrong``."""

    status = 400

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class Unauthorized(ServiceProblem):
    status = 401


class NotFound(ServiceProblem):
    """Unknown id -- or one owned by another API key: the same answer, so ids do not leak."""

    status = 404


class Gone(ServiceProblem):
    """A sampler version that newer weights replaced in its vLLM slot."""

    status = 410


class LimitExceeded(ServiceProblem):
    """A request over a server limit (adapters, tokens, context length)."""

    status = 400  # not 429: the SDK retries a 429 for minutes, and a limit is the caller's to fix


class NotSupported(ServiceProblem):
    """A route or option this server does not implement (named in the message). 400, not 501: the SDK
    retries every 5xx answer for minutes."""

    status = 400
