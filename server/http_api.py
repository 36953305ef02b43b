"""OpenAI-compatible HTTP front door: translates JSON bodies and headers into the service's
:class:`~server.service.InferenceRequest`, and its events back into OpenAI responses (JSON or
SSE). The rules live in the service; only wire format, and the client's connection, are here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters.manager import AdapterManager
from .adapters.registry import AdapterError, AdapterState
from .admission import retry_after_header
from .auth import require_admin, require_api_key, require_reader
from .config import ServerConfig
from .errors import RequestError, TooManyRequests, from_adapter_error
from .openai_format import ChatFormat, CompletionFormat, error_body, sse_events
from .openai_protocol import ChatCompletionRequest, CompletionRequest
from .service import GenerationService, InferenceRequest, Prepared, SamplingInput, collect_choices

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
TIMEOUT_HEADER = "x-request-timeout"  # seconds the client will wait; admission refuses what cannot make it
MAX_REQUEST_TIMEOUT_S = 24 * 3600
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first" (never seen by it)
INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: any text a client sent (a lone surrogate included) can be echoed."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return AsciiJSONResponse(error_body(message, kind, status, param), status_code=status)


class PayloadLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes``, declared or streamed (chunked).
    The body is read here, up to the limit, and handed on whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"request body exceeds {self.max_bytes} bytes", "invalid_request_error")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BoundedStreamingResponse(StreamingResponse):
    """SSE whose every send must complete within ``send_timeout_s``: a client that stops reading
    (its socket buffers full) is cut off, which aborts its engine request and frees its slot."""

    def __init__(self, content, *, send_timeout_s: float, on_stall: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.send_timeout_s = send_timeout_s
        self.on_stall = on_stall

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                async with asyncio.timeout(self.send_timeout_s):  # no task per send (wait_for makes one)
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            async with asyncio.timeout(self.send_timeout_s):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # Cut off: the request is aborted below; returning with the response incomplete makes
            # the server close the connection (one log line, no traceback).
            self.on_stall()
            logger.info("cut off a stream whose client read nothing for %g s", self.send_timeout_s)
        finally:
            await self.body_iterator.aclose()


class LoadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1, max_length=256)


@dataclass
class HttpDoor:
    """What the routes need, kept on ``app.state.door``."""

    service: GenerationService
    adapters: AdapterManager
    config: ServerConfig
    is_ready: Callable[[], bool]


def _door(request: Request) -> HttpDoor:
    return request.app.state.door


async def inference_auth(request: Request) -> None:
    require_api_key(request.headers.get("authorization"), _door(request).config.api_key)


async def admin_auth(request: Request) -> None:
    require_admin(request.headers.get("authorization"), _door(request).config.admin_token)


def _reader_is_admin(request: Request) -> bool:
    config = _door(request).config
    return require_reader(request.headers.get("authorization"), config.api_key, config.admin_token)


router = APIRouter()
inference = [Depends(inference_auth)]
admin = [Depends(admin_auth)]


@router.get("/health")
async def health(request: Request):
    door = _door(request)
    if not door.service.engine.healthy:
        return error_response(503, "the engine has failed", "service_unavailable")
    if door.service.admission.draining:
        return error_response(503, "draining: the server is shutting down", "service_unavailable")
    if door.is_ready():
        return {"status": "ok"}
    return error_response(503, "not ready", "service_unavailable")


@router.get("/metrics")
async def metrics(request: Request):
    metrics = _door(request).service.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


@router.get("/v1/models")
async def list_models(request: Request):
    _reader_is_admin(request)
    service = _door(request).service
    base = service.base_model_name
    data = [{"id": base, "object": "model", "created": int(time.time()), "owned_by": "loraplex", "root": base,
             "parent": None}]
    for entry in service.adapters.registry.adapters():
        if entry.state is AdapterState.READY:
            data.append({"id": entry.name, "object": "model", "created": int(entry.registered_at),
                         "owned_by": "loraplex", "root": entry.name, "parent": base})
    return {"object": "list", "data": data}


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    as_admin = _reader_is_admin(request)
    service = _door(request).service
    return {"object": "list", "base_model": service.base_model_name,
            "data": [entry.describe(admin=as_admin) for entry in service.adapters.registry.adapters()]}


@router.get("/v1/stats", dependencies=inference)
async def stats(request: Request):
    """Throughput and latency over the last minute, overall and per adapter (no PromQL needed)."""
    return _door(request).service.metrics.window.summary()


@router.post("/v1/completions", dependencies=inference)
async def completions(body: CompletionRequest, request: Request):
    body.reject_unsupported()
    prompts = [body.prompt] if isinstance(body.prompt, str) or _is_token_ids(body.prompt) else list(body.prompt)
    return await _respond(request, CompletionFormat(body), InferenceRequest(
        model=body.model, sampling=_sampling(body, body.max_tokens), prompts=prompts, stream=body.stream,
        request_id=request.headers.get(REQUEST_ID_HEADER), deadline=_deadline(request), id_prefix="cmpl"))


@router.post("/v1/chat/completions", dependencies=inference)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    body.reject_unsupported()
    return await _respond(request, ChatFormat(body), InferenceRequest(
        model=body.model, sampling=_sampling(body, body.output_token_limit), messages=body.plain_messages(),
        stream=body.stream, request_id=request.headers.get(REQUEST_ID_HEADER), deadline=_deadline(request),
        id_prefix="chatcmpl"))


@router.post("/v1/load_lora_adapter", dependencies=admin)
async def load_lora_adapter(body: LoadAdapterBody, request: Request):
    adapters = _door(request).adapters
    entry = await adapters.load_lora_path(body.lora_name, body.lora_path)
    return AsciiJSONResponse({"message": f"Success: LoRA adapter '{entry.name}' added successfully.",
                              "adapter": entry.describe(admin=True)})


@router.post("/v1/adapters/{name}/pin", dependencies=admin)
async def pin_adapter(name: str, request: Request):
    return AsciiJSONResponse({"adapter": (await _door(request).adapters.pin(name)).describe(admin=True)})


@router.post("/v1/unload_lora_adapter", dependencies=admin)
async def unload_lora_adapter(body: UnloadAdapterBody, request: Request):
    entry = await _door(request).adapters.unload(body.lora_name)
    return AsciiJSONResponse({"message": f"Success: LoRA adapter '{entry.name}' removed successfully.",
                              "adapter": entry.describe(admin=True)})


def build_app(service: GenerationService, adapters: AdapterManager, config: ServerConfig, *,
              is_ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title="loraplex", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.door = HttpDoor(service, adapters, config, is_ready)
    app.include_router(router)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(AdapterError, _adapter_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return PayloadLimit(app, config.limits.max_payload_bytes)  # type: ignore[return-value]


# -- errors -------------------------------------------------------------------------------------

def _count_if_inference(request: Request, refusal: RequestError | int) -> None:
    """Refusals the service did not count (authentication, undecodable bodies, translation) are
    counted here."""
    if request.url.path.startswith(INFERENCE_PATHS):
        _door(request).service.count_refusal(refusal)


async def _request_error(request: Request, exc: RequestError):
    _count_if_inference(request, exc)
    response = error_response(exc.status, exc.message, exc.kind, exc.param)
    if isinstance(exc, TooManyRequests):
        response.headers["retry-after"] = retry_after_header(exc.retry_after_s)
    return response


async def _adapter_error(request: Request, exc: AdapterError):
    error = from_adapter_error(exc)
    return error_response(error.status, error.message, error.kind)


async def _validation_error(request: Request, exc: RequestValidationError):
    _count_if_inference(request, 400)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return error_response(400, message, "invalid_request_error", param)


async def _http_error(_: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


# -- requests -----------------------------------------------------------------------------------

def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, int) for p in prompt)


def _sampling(body, max_tokens: int | None) -> SamplingInput:
    return SamplingInput(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, n=body.n,
                         stop=body.stop, seed=body.seed, presence_penalty=body.presence_penalty,
                         frequency_penalty=body.frequency_penalty, ignore_eos=body.ignore_eos,
                         logprobs=body.num_logprobs, logit_bias=body.logit_bias, top_k=body.top_k,
                         min_p=body.min_p, repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
                         stop_token_ids=body.stop_token_ids, structured=body.structured_input())


def _deadline(request: Request) -> float | None:
    """The client's deadline from ``x-request-timeout`` (seconds), as a time.monotonic() value."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_REQUEST_TIMEOUT_S:
        from .errors import InvalidRequest

        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of seconds in (0, {MAX_REQUEST_TIMEOUT_S}]",
                             param=TIMEOUT_HEADER)
    return time.monotonic() + seconds


# -- responses ----------------------------------------------------------------------------------

async def _respond(request: Request, fmt: CompletionFormat | ChatFormat, inference_request: InferenceRequest):
    """Run the request; answer with an SSE stream or one JSON body. Until the first token, a
    client that disconnects (while queued, say) is noticed and its request cancelled."""
    door = _door(request)
    events = door.service.run(inference_request)
    try:
        prepared: Prepared = await events.__anext__()
        if fmt.body.stream:
            started = await _unless_client_leaves(request, _first_chunk(events))
            if started is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return BoundedStreamingResponse(
                sse_events(fmt, prepared, started[0], events), media_type="text/event-stream",
                headers={REQUEST_ID_HEADER: prepared.request_id}, send_timeout_s=door.config.stream_send_timeout_s,
                on_stall=door.service.metrics.stalled_streams.inc)
        collected = await _unless_client_leaves(request, collect_choices(events, prepared))
    except BaseException:
        await events.aclose()
        raise
    if collected is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return AsciiJSONResponse({
        "id": prepared.request_id, "object": fmt.object_name, "created": int(time.time()), "model": fmt.body.model,
        "choices": [fmt.choice(i, collected.texts[i], collected.finish_reasons[i], collected.logprobs[i])
                    for i in range(len(collected.texts))],
        "usage": prepared.usage(collected.num_generated)}, headers={REQUEST_ID_HEADER: prepared.request_id})


async def _first_chunk(events: AsyncIterator) -> tuple:
    """The first (choice, chunk) pair, so that errors before it get a real HTTP status; (None,)
    when the run ends without any."""
    try:
        return (await events.__anext__(),)
    except StopAsyncIteration:
        return (None,)


async def _unless_client_leaves(request: Request, work, poll_s: float = 0.25):
    """Await ``work``; if the client disconnects first, cancel it (which aborts the engine
    requests, or leaves the admission queue) and return None."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()
