"""gRPC front door (``proto/loraplex/v1``). Thin, like the HTTP one: the same service calls,
the same validation, adapter resolution and metrics; only the wire format differs.

Cancellation and deadlines: grpc.aio cancels the handler when the client cancels or the
deadline passes; the cancellation reaches the engine's generate loop, which aborts the request.
"""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .adapters.manager import AdapterManager
from .adapters.registry import AdapterError
from .admission import retry_after_header
from .config import ServerConfig
from .grpc_gen import loraplex_pb2 as pb
from .grpc_gen import loraplex_pb2_grpc as pb_grpc
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

logger = logging.getLogger(__name__)

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
SERVICE_NAMES = ("loraplex.v1.Generation", "loraplex.v1.Adapters")


def _authorization(context) -> str | None:
    return dict(context.invocation_metadata() or ()).get("authorization")


def _deadline(context) -> float | None:
    """The call's gRPC deadline as a time.monotonic() value (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def status_code(http_status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(http_status, grpc.StatusCode.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, metrics=None):
    status = getattr(exc, "status", 500)
    message = exc.message if isinstance(exc, RequestError) else str(exc)
    if metrics is not None:
        metrics.record_outcome(None, refusal_outcome(status))
    if isinstance(exc, TooManyRequests):
        context.set_trailing_metadata((("retry-after", retry_after_header(exc.retry_after_s)),))
    await context.abort(status_code(status), message)


def _prompt_source(request) -> dict | None:
    """The prompt as the client wrote it, ``{"prompt": text}`` or ``{"messages": [...]}`` (what
    --capture-dir records too); None for token ids or no prompt."""
    which = request.WhichOneof("prompt")
    if which == "text":
        return {"prompt": request.text}
    if which == "chat":
        return {"messages": [{"role": m.role, "content": m.content} for m in request.chat.messages]}
    return None


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, service: GenerationService, config: ServerConfig) -> None:
        self.service = service
        self.config = config

    def _check_api_key(self, context) -> None:
        require_api_key(_authorization(context), self.config.api_key)

    def _prompt_ids(self, request, source: dict | None) -> list[int]:
        if source is not None and "prompt" in source:
            return self.service.tokenize(source["prompt"])
        if source is not None:
            return self.service.render_chat(source["messages"])
        if request.WhichOneof("prompt") == "token_ids":
            return list(request.token_ids.ids)
        raise InvalidRequest("a prompt is required: text, chat or token_ids", param="prompt")

    def _prepare(self, request, context, stream: bool):
        self._check_api_key(context)
        if not request.model:
            raise InvalidRequest("model is required", param="model")
        resolved = self.service.resolve(request.model)
        source = _prompt_source(request)
        ids = self._prompt_ids(request, source)
        s = request.sampling
        options = self.service.sampling_options(
            prompt_len=len(ids),
            max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
            temperature=_bounded(s, "temperature", 0.0, 2.0),
            top_p=_bounded(s, "top_p", 0.0, 1.0, low_open=True),
            n=s.n or 1, stop=list(s.stop), seed=s.seed if s.HasField("seed") else None,
            presence_penalty=_bounded(s, "presence_penalty", -2.0, 2.0),
            frequency_penalty=_bounded(s, "frequency_penalty", -2.0, 2.0),
            stream=stream)
        request_id = request.request_id or new_request_id("grpc")
        return resolved, GenerationRequest(request.model, ids, options, request_id, source)

    async def Generate(self, request, context):
        try:
            resolved, generation = self._prepare(request, context, stream=False)
            n = generation.options.n
            texts, token_ids, finish, num_generated = await collect_choices(
                self.service.stream_choices([generation], resolved, n, _deadline(context)), n)
        except (RequestError, AdapterError) as exc:
            await _abort(context, exc, self.service.metrics)
        return pb.GenerateResponse(
            request_id=generation.request_id, model=request.model,
            choices=[pb.Choice(index=i, text=texts[i], token_ids=token_ids[i], finish_reason=finish[i] or "")
                     for i in range(n)],
            usage=pb.Usage(**usage_counts([generation], num_generated)))

    async def GenerateStream(self, request, context):
        try:
            resolved, generation = self._prepare(request, context, stream=True)
            num_generated = 0
            stream = self.service.stream_choices([generation], resolved, generation.options.n, _deadline(context))
            async for index, chunk in stream:
                num_generated += len(chunk.token_ids)
                yield pb.GenerateStreamResponse(
                    request_id=generation.request_id, index=index, text=chunk.text, token_ids=chunk.token_ids,
                    finish_reason=chunk.finish_reason or "")
        except (RequestError, AdapterError) as exc:
            await _abort(context, exc, self.service.metrics)
            return
        yield pb.GenerateStreamResponse(request_id=generation.request_id,
                                        usage=pb.Usage(**usage_counts([generation], num_generated)))

    async def Tokenize(self, request, context):
        try:
            self._check_api_key(context)
            self.service.resolve(request.model)
            return pb.TokenizeResponse(token_ids=self._prompt_ids(request, _prompt_source(request)))
        except (RequestError, AdapterError) as exc:
            await _abort(context, exc)


def _bounded(message, field: str, low: float, high: float, low_open: bool = False) -> float | None:
    if not message.HasField(field):
        return None
    value = getattr(message, field)
    if not (low < value <= high if low_open else low <= value <= high):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidRequest(f"{field} must be in {interval}", param=field)
    return value


class AdaptersServicer(pb_grpc.AdaptersServicer):
    def __init__(self, adapters: AdapterManager, config: ServerConfig, base_model: str) -> None:
        self.adapters = adapters
        self.config = config
        self.base_model = base_model

    def _check_admin(self, context) -> None:
        require_admin(_authorization(context), self.config.admin_token)

    @staticmethod
    def _info(entry) -> pb.AdapterInfo:
        d = entry.describe()
        return pb.AdapterInfo(name=d["name"], version=d["version"], status=d["status"], error=d["error"] or "",
                              rank=d["rank"] or 0, target_modules=d["target_modules"], path=d["path"],
                              loaded_at_unix=d["loaded_at_unix"], running_requests=d["running_requests"])

    async def ListAdapters(self, request, context):
        try:
            self._check_admin(context)
        except RequestError as exc:
            await _abort(context, exc)
        return pb.ListAdaptersResponse(base_model=self.base_model,
                                       adapters=[self._info(e) for e in self.adapters.registry.adapters()])

    async def GetAdapter(self, request, context):
        try:
            self._check_admin(context)
            return self._info(self.adapters.registry.get(request.name))
        except (RequestError, AdapterError) as exc:
            await _abort(context, exc)

    async def LoadAdapter(self, request, context):
        try:
            self._check_admin(context)
            entry = await self.adapters.load(request.name, self.adapters.resolve_path(request.path))
            return self._info(entry)
        except (RequestError, AdapterError) as exc:
            await _abort(context, exc)

    async def UnloadAdapter(self, request, context):
        try:
            self._check_admin(context)
            return pb.UnloadAdapterResponse(adapter=self._info(await self.adapters.unload(request.name)))
        except (RequestError, AdapterError) as exc:
            await _abort(context, exc)


_MALFORMED = object()  # what a request message that does not decode becomes


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):
    """A request message that does not decode gets INVALID_ARGUMENT from us, rather than grpc's
    own UNKNOWN "Exception deserializing request" (unary requests; streams are left as they are)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # per method, built on its first call

    async def intercept_service(self, continuation, handler_call_details):
        wrapped = self._wrapped.get(handler_call_details.method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: not cached, so random names cannot grow the table
            return None
        wrapped = self._wrapped[handler_call_details.method] = self._tolerant(handler)
        return wrapped

    @staticmethod
    def _tolerant(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def tolerant(data: bytes):
            try:
                return decode(data)
            except Exception:  # noqa: BLE001 - any decoding failure is the caller's malformed message
                return _MALFORMED

        async def reject(context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request message could not be decoded")

        if handler.response_streaming:
            behaviour = handler.unary_stream

            async def unary_stream(request, context):
                if request is _MALFORMED:
                    await reject(context)
                async for response in behaviour(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, request_deserializer=tolerant,
                                                        response_serializer=handler.response_serializer)
        behaviour = handler.unary_unary

        async def unary_unary(request, context):
            if request is _MALFORMED:
                await reject(context)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, request_deserializer=tolerant,
                                                   response_serializer=handler.response_serializer)


def build_grpc_server(service: GenerationService, adapters: AdapterManager, config: ServerConfig,
                      host: str, port: int) -> tuple[grpc.aio.Server, health.HealthServicer]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", config.limits.max_payload_bytes)],
                             interceptors=[MalformedMessageInterceptor()])
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(service, config), server)
    pb_grpc.add_AdaptersServicer_to_server(AdaptersServicer(adapters, config, service.base_model_name), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(f"{host}:{port}")
    return server, health_servicer


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, status)
