"""gRPC front door (``proto/loraplex/v1``): translates messages into the service's
:class:`~server.service.InferenceRequest` and its events back; errors are mapped to gRPC status
codes in one place (:func:`_grpc_errors`). The rules live in the service, as for HTTP.

Cancellation and deadlines: grpc.aio cancels the handler when the client cancels or the
deadline passes; the cancellation reaches the engine's generate loop, which aborts the request.
A streaming client that stops reading is cut off after ``--stream-send-timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .adapters.manager import AdapterManager
from .adapters.registry import AdapterError
from .admission import retry_after_header
from .auth import require_admin, require_api_key, require_reader
from .config import ServerConfig
from .errors import InvalidRequest, RequestError, TooManyRequests, from_adapter_error
from .grpc_gen import loraplex_pb2 as pb
from .grpc_gen import loraplex_pb2_grpc as pb_grpc
from .service import GenerationService, InferenceRequest, Prepared, SamplingInput, collect_choices
from .structured import StructuredInput

logger = logging.getLogger(__name__)

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
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


def _grpc_errors(count_refusals: bool = False):
    """Decorator: RequestError / AdapterError -> the call's status (with Retry-After when shed).
    ``count_refusals``: an inference call's refusals the service did not count are counted."""

    def wrap(method):
        async def abort(self, context, exc):
            error = exc if isinstance(exc, RequestError) else from_adapter_error(exc)
            if count_refusals:
                self.service.count_refusal(error)
            if isinstance(error, TooManyRequests):
                context.set_trailing_metadata((("retry-after", retry_after_header(error.retry_after_s)),))
            await context.abort(status_code(error.status), error.message)

        @functools.wraps(method)
        async def unary(self, request, context):
            try:
                return await method(self, request, context)
            except (RequestError, AdapterError) as exc:
                await abort(self, context, exc)
        return unary

    return wrap


def _sampling(s: pb.SamplingParameters) -> SamplingInput:
    def optional(name: str):
        return getattr(s, name) if s.HasField(name) else None

    return SamplingInput(max_tokens=optional("max_tokens"), temperature=optional("temperature"),
                         top_p=optional("top_p"), n=s.n or 1, stop=tuple(s.stop), seed=optional("seed"),
                         presence_penalty=optional("presence_penalty"),
                         frequency_penalty=optional("frequency_penalty"), ignore_eos=s.ignore_eos,
                         logprobs=optional("logprobs"), logit_bias=dict(s.logit_bias), top_k=optional("top_k"),
                         min_p=optional("min_p"), repetition_penalty=optional("repetition_penalty"),
                         min_tokens=optional("min_tokens"), stop_token_ids=tuple(s.stop_token_ids),
                         structured=_structured(s))


def _structured(s: pb.SamplingParameters) -> StructuredInput | None:
    which = s.WhichOneof("constraint")
    if which is None:
        return None
    if which == "choice":
        return StructuredInput(choice=tuple(s.choice.values))
    return StructuredInput(**{which: getattr(s, which)})


def _logprobs(items) -> list[pb.TokenLogprob] | None:
    return None if items is None else [
        pb.TokenLogprob(token=item.token, logprob=item.logprob,
                        top_logprobs=[pb.TopLogprob(token=token, logprob=logprob) for token, logprob in item.top])
        for item in items]


def _inference_request(request, context, *, stream: bool) -> InferenceRequest:
    which = request.WhichOneof("prompt")
    if which is None:
        raise InvalidRequest("a prompt is required: text, chat or token_ids", param="prompt")
    sampling = _sampling(request.sampling) if hasattr(request, "sampling") else SamplingInput()
    wire = InferenceRequest(model=request.model, sampling=sampling, stream=stream,
                            request_id=getattr(request, "request_id", "") or None, deadline=_deadline(context),
                            id_prefix="grpc")
    if which == "chat":
        wire.messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    elif which == "text":
        wire.prompts = [request.text]
    else:
        wire.prompts = [list(request.token_ids.ids)]
    return wire


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, service: GenerationService, config: ServerConfig) -> None:
        self.service = service
        self.config = config

    @_grpc_errors(count_refusals=True)
    async def Generate(self, request, context):
        require_api_key(_authorization(context), self.config.api_key)
        events = self.service.run(_inference_request(request, context, stream=False))
        try:
            prepared: Prepared = await events.__anext__()
            choices = await collect_choices(events, prepared)
        finally:
            await events.aclose()
        return pb.GenerateResponse(
            request_id=prepared.request_id, model=request.model,
            choices=[pb.Choice(index=i, text=choices.texts[i], token_ids=choices.token_ids[i],
                               finish_reason=choices.finish_reasons[i] or "", logprobs=_logprobs(choices.logprobs[i]))
                     for i in range(prepared.num_choices)],
            usage=pb.Usage(**prepared.usage(choices.num_generated)))

    @_grpc_errors(count_refusals=True)
    async def GenerateStream(self, request, context):
        """Server streaming through ``context.write`` (so each send can be bounded in time)."""
        require_api_key(_authorization(context), self.config.api_key)
        events = self.service.run(_inference_request(request, context, stream=True))
        try:
            prepared: Prepared = await events.__anext__()
            num_generated = 0
            async for index, chunk in events:
                num_generated += len(chunk.token_ids)
                await self._send(context, pb.GenerateStreamResponse(
                    request_id=prepared.request_id, index=index, text=chunk.text, token_ids=chunk.token_ids,
                    finish_reason=chunk.finish_reason or "", logprobs=_logprobs(chunk.logprobs)))
            await self._send(context, pb.GenerateStreamResponse(request_id=prepared.request_id,
                                                                usage=pb.Usage(**prepared.usage(num_generated))))
        finally:
            await events.aclose()

    async def _send(self, context, message) -> None:
        """One message, within the send timeout: a client that stops reading is cut off."""
        try:
            async with asyncio.timeout(self.config.stream_send_timeout_s):  # no task per send, unlike wait_for
                await context.write(message)
        except TimeoutError:
            self.service.metrics.stalled_streams.inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the client read nothing for {self.config.stream_send_timeout_s:g} s")

    @_grpc_errors()
    async def Tokenize(self, request, context):
        require_api_key(_authorization(context), self.config.api_key)
        return pb.TokenizeResponse(token_ids=await self.service.tokenize(
            _inference_request(request, context, stream=False)))


class AdaptersServicer(pb_grpc.AdaptersServicer):
    def __init__(self, adapters: AdapterManager, config: ServerConfig, base_model: str) -> None:
        self.adapters = adapters
        self.config = config
        self.base_model = base_model

    def _check_admin(self, context) -> None:
        require_admin(_authorization(context), self.config.admin_token)

    def _reader_is_admin(self, context) -> bool:
        return require_reader(_authorization(context), self.config.api_key, self.config.admin_token)

    @staticmethod
    def _info(entry, admin: bool) -> pb.AdapterInfo:
        d = entry.describe(admin=admin)
        return pb.AdapterInfo(name=d["name"], version=d["version"], status=d["status"], error=d["error"] or "",
                              rank=d["rank"] or 0, target_modules=d["target_modules"], path=d.get("path") or "",
                              loaded_at_unix=d["loaded_at_unix"], running_requests=d["running_requests"],
                              sha256=d["sha256"] or "", pinned=d["pinned"])

    @_grpc_errors()
    async def ListAdapters(self, request, context):
        admin = self._reader_is_admin(context)
        return pb.ListAdaptersResponse(base_model=self.base_model,
                                       adapters=[self._info(e, admin) for e in self.adapters.registry.adapters()])

    @_grpc_errors()
    async def GetAdapter(self, request, context):
        admin = self._reader_is_admin(context)
        return self._info(self.adapters.registry.get(request.name), admin)

    @_grpc_errors()
    async def LoadAdapter(self, request, context):
        self._check_admin(context)
        return self._info(await self.adapters.load_lora_path(request.name, request.path), True)

    @_grpc_errors()
    async def UnloadAdapter(self, request, context):
        self._check_admin(context)
        return pb.UnloadAdapterResponse(adapter=self._info(await self.adapters.unload(request.name), True))


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
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        await context.write(response)
                else:
                    await result

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
