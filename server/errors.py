"""The errors a request can end with, wire-neutral: each front door maps ``status`` to its own
codes (HTTP status, gRPC status) once. ``kind`` is the OpenAI error type."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, ``kind`` the OpenAI error type."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.counted = False  # set once the refusal is in the metrics (the doors count the rest)


class InvalidRequest(RequestError):
    pass


class ModelNotFound(RequestError):
    status = 404
    kind = "not_found_error"


class Conflict(RequestError):
    status = 409
    kind = "conflict_error"


class PayloadTooLarge(RequestError):
    status = 413


class ServiceUnavailable(RequestError):
    status = 503
    kind = "service_unavailable"


class InternalError(RequestError):
    """The engine failed one request for a reason of its own (it lives on)."""

    status = 500
    kind = "internal_server_error"


class TooManyRequests(RequestError):
    """Shed by admission control; ``retry_after_s`` goes out as ``Retry-After``."""

    status = 429
    kind = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(RequestError):
    status = 401
    kind = "authentication_error"


class Forbidden(RequestError):
    status = 403
    kind = "permission_error"


def from_adapter_error(exc: Exception) -> RequestError:
    """An adapter error (registry, manager, validation) as the request error a door reports."""
    status = getattr(exc, "status", 400)
    kind = {404: ModelNotFound, 409: Conflict, 503: ServiceUnavailable}.get(status, InvalidRequest)
    return kind(str(exc))


def refusal_outcome(status: int) -> str:
    """The metrics outcome of a request refused before the engine."""
    return "shed" if status == 429 else f"rejected_{status}"
