"""OpenAI-compatible HTTP front door. Thin: validate -> service -> (stream) response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters.manager import AdapterManager
from .adapters.registry import AdapterError
from .admission import retry_after_header
from .config import ServerConfig
from .engine import GenerationChunk
from .openai_protocol import ChatCompletionRequest, CompletionRequest
from .service import (
    GenerationRequest,
    GenerationService,
    InvalidRequest,
    RequestError,
    TooManyRequests,
    collect_choices,
    new_request_id,
    refusal_outcome,
    require_admin,
    require_api_key,
    usage_counts,
)

REQUEST_ID_HEADER = "x-request-id"
TIMEOUT_HEADER = "x-request-timeout"  # seconds the client will wait; admission refuses what cannot make it
MAX_REQUEST_TIMEOUT_S = 24 * 3600
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first" (never seen by it)


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, status, param), status_code=status)


class PayloadLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes`` (declared or streamed)."""

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
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class LoadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1, max_length=256)


def build_app(service: GenerationService, adapters: AdapterManager, config: ServerConfig, *,
              is_ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title="loraplex", version="0.1.0", docs_url=None, redoc_url=None)
    base_model = service.base_model_name

    def rejected(request: Request, status: int) -> None:
        if request.url.path.startswith(("/v1/completions", "/v1/chat/completions")):
            service.metrics.record_outcome(None, refusal_outcome(status))

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        rejected(request, exc.status)
        response = error_response(exc.status, exc.message, exc.kind, exc.param)
        if isinstance(exc, TooManyRequests):
            response.headers["retry-after"] = retry_after_header(exc.retry_after_s)
        return response

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, exc: AdapterError):
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return error_response(exc.status, str(exc), kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        rejected(request, 400)
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    async def inference_auth(request: Request) -> None:
        require_api_key(request.headers.get("authorization"), config.api_key)

    async def admin_auth(request: Request) -> None:
        require_admin(request.headers.get("authorization"), config.admin_token)

    inference = [Depends(inference_auth)]
    admin = [Depends(admin_auth)]

    @app.get("/health")
    async def health():
        if not service.engine.healthy:
            return error_response(503, "the engine has failed", "service_unavailable")
        if service.admission.draining:
            return error_response(503, "draining: the server is shutting down", "service_unavailable")
        if is_ready():
            return {"status": "ok"}
        return error_response(503, "not ready", "service_unavailable")

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/v1/models", dependencies=inference)
    async def list_models():
        created = int(time.time())
        data = [{"id": base_model, "object": "model", "created": created, "owned_by": "loraplex",
                 "root": base_model, "parent": None}]
        for entry in service.registry.adapters():
            if entry.state.value == "ready":
                data.append({"id": entry.name, "object": "model", "created": int(entry.registered_at),
                             "owned_by": "loraplex", "root": str(entry.path), "parent": base_model})
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=inference)
    async def completions(body: CompletionRequest, request: Request):
        _reject_unsupported(body.unsupported())
        resolved = service.resolve(body.model)
        prompts = _completion_prompts(service, body.prompt)
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id("cmpl")
        generations = [
            GenerationRequest(body.model, ids, _options(service, body, len(ids), body.max_tokens),
                              f"{request_id}-{i}", source)
            for i, (ids, source) in enumerate(zip(prompts, _capture_sources(body.prompt, len(prompts))))
        ]
        return await _respond(service, request, body, resolved, generations, request_id, _deadline(request),
                              _completion_events,
                              "text_completion", lambda i, text, finish: {
                                  "index": i, "text": text, "logprobs": None, "finish_reason": finish})

    @app.post("/v1/chat/completions", dependencies=inference)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _reject_unsupported(body.unsupported())
        resolved = service.resolve(body.model)
        ids = service.render_chat(body.template_messages())
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id("chatcmpl")
        generations = [GenerationRequest(body.model, ids, _options(service, body, len(ids), body.output_token_limit),
                                         request_id, {"messages": body.template_messages()})]
        return await _respond(service, request, body, resolved, generations, request_id, _deadline(request),
                              _chat_events,
                              "chat.completion", lambda i, text, finish: {
                                  "index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                  "finish_reason": finish})

    @app.get("/v1/stats", dependencies=inference)
    async def stats():
        """Throughput and latency over the last minute, overall and per adapter (no PromQL needed)."""
        return service.metrics.window.summary()

    @app.get("/v1/adapters", dependencies=inference)
    async def list_adapters():
        return {"object": "list", "base_model": base_model,
                "data": [entry.describe() for entry in service.registry.adapters()]}

    @app.post("/v1/load_lora_adapter", dependencies=admin)
    async def load_lora_adapter(body: LoadAdapterBody):
        entry = await adapters.load(body.lora_name, adapters.resolve_path(body.lora_path))
        return {"message": f"Success: LoRA adapter '{entry.name}' added successfully.", "adapter": entry.describe()}

    @app.post("/v1/adapters/{name}/pin", dependencies=admin)
    async def pin_adapter(name: str):
        return {"adapter": (await adapters.pin(name)).describe()}

    @app.post("/v1/unload_lora_adapter", dependencies=admin)
    async def unload_lora_adapter(body: UnloadAdapterBody):
        entry = await adapters.unload(body.lora_name)
        return {"message": f"Success: LoRA adapter '{entry.name}' removed successfully.", "adapter": entry.describe()}

    return PayloadLimit(app, config.limits.max_payload_bytes)  # type: ignore[return-value]


# -- helpers ------------------------------------------------------------------------------------

def _reject_unsupported(field: str | None) -> None:
    if field is not None:
        raise InvalidRequest(f"'{field}' is not supported by this server", param=field)


def _completion_prompts(service: GenerationService, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [service.tokenize(prompt)]
    if not prompt:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        prompts = [service.tokenize(p) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    if len(prompts) > service.limits.max_n:
        raise InvalidRequest(f"at most {service.limits.max_n} prompts per request", param="prompt")
    return prompts


def _capture_sources(prompt, num_prompts: int) -> list[dict | None]:
    """What --capture-dir records per prompt: the text, or None for token-id prompts."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    return [None] * num_prompts


def _options(service: GenerationService, body, prompt_len: int, max_tokens: int | None):
    return service.sampling_options(
        prompt_len=prompt_len, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        n=body.n, stop=body.stop, seed=body.seed, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, stream=body.stream, ignore_eos=body.ignore_eos)


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
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of seconds in (0, {MAX_REQUEST_TIMEOUT_S}]",
                             param=TIMEOUT_HEADER)
    return time.monotonic() + seconds


async def _respond(service: GenerationService, request: Request, body, resolved,
                   generations: list[GenerationRequest], request_id: str, deadline: float | None, events,
                   object_name: str, make_choice):
    """Run the generations; answer with an SSE stream or one JSON body (both APIs' shared tail)."""
    stream = service.stream_choices(generations, resolved, body.n, deadline)
    headers = {REQUEST_ID_HEADER: request_id}
    if body.stream:
        first = await _prime(stream)
        return StreamingResponse(events(first, stream, request_id, body, generations), headers=headers,
                                 media_type="text/event-stream")
    collected = await _unless_client_leaves(request, collect_choices(stream, len(generations) * body.n))
    if collected is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    texts, _, finish, num_generated = collected
    return JSONResponse({
        "id": request_id, "object": object_name, "created": int(time.time()), "model": body.model,
        "choices": [make_choice(i, texts[i], finish[i]) for i in range(len(texts))],
        "usage": usage_counts(generations, num_generated),
    }, headers=headers)


async def _unless_client_leaves(request: Request, work, poll_s: float = 0.25):
    """Await ``work``; if the client disconnects first, cancel it (which aborts the engine
    requests) and return None. Streams need no such watch: the server cancels them itself."""
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


async def _prime(stream: AsyncIterator):
    """Wait for the first chunk before answering, so early errors get a real HTTP status."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _chunks_with_first(first, stream: AsyncIterator):
    if first is not None:
        yield first
        async for item in stream:
            yield item


async def _event_stream(first, stream, make_chunk, final_extra, body, generations, request_id):
    """Shared SSE loop: one event per chunk, optional usage event, then [DONE]."""
    include_usage = body.include_usage
    num_generated = 0
    try:
        async for item in final_extra(_chunks_with_first(first, stream)):
            if isinstance(item, dict):
                if include_usage:
                    item["usage"] = None
                yield _sse(item)
                continue
            index, chunk = item
            num_generated += len(chunk.token_ids)
            event = make_chunk(index, chunk)
            if event is not None:
                if include_usage:
                    event["usage"] = None
                yield _sse(event)
    except RequestError as exc:
        yield _sse(error_body(exc.message, exc.kind, exc.status, exc.param))
    if include_usage:
        yield _sse({"id": request_id, "object": make_chunk.object_name, "created": int(time.time()),
                    "model": body.model, "choices": [], "usage": usage_counts(generations, num_generated)})
    yield _sse("[DONE]")


def _completion_events(first, stream, request_id, body: CompletionRequest, generations):
    created = int(time.time())

    def make_chunk(index: int, chunk: GenerationChunk):
        return {"id": request_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": index, "text": chunk.text, "logprobs": None,
                             "finish_reason": chunk.finish_reason}]}

    make_chunk.object_name = "text_completion"

    async def passthrough(items):
        async for item in items:
            yield item

    return _event_stream(first, stream, make_chunk, passthrough, body, generations, request_id)


def _chat_events(first, stream, request_id, body: ChatCompletionRequest, generations):
    created = int(time.time())

    def envelope(choices: list[dict]) -> dict:
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": choices}

    def make_chunk(index: int, chunk: GenerationChunk):
        if not chunk.text and chunk.finish_reason is None:
            return None
        delta = {"content": chunk.text} if chunk.text else {}
        return envelope([{"index": index, "delta": delta, "logprobs": None,
                          "finish_reason": chunk.finish_reason}])

    make_chunk.object_name = "chat.completion.chunk"

    async def with_role(items):
        # OpenAI sends the assistant role first, once per choice.
        for index in range(body.n):
            yield envelope([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
        async for item in items:
            yield item

    return _event_stream(first, stream, make_chunk, with_role, body, generations, request_id)
