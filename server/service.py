"""What both front doors (HTTP, gRPC) share: model resolution, request limits, prompt
rendering, and one generation path that records metrics and adapter usage.

Front doors translate their wire format into :class:`GenerationRequest` and the
:class:`RequestError` subclasses back into their own status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from .adapters.registry import AdapterError, AdapterRegistry, AdapterVersion
from .admission import BASE_MODEL_KEY, AdmissionController, Draining, Overloaded, Ticket
from .capture import CaptureWriter
from .config import LimitsConfig
from .engine import Engine, EngineUnavailable, GenerationChunk, SamplingOptions
from .metrics import Metrics

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, ``kind`` the OpenAI error type."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(RequestError):
    pass


class ModelNotFound(RequestError):
    status = 404
    kind = "not_found_error"


class ServiceUnavailable(RequestError):
    status = 503
    kind = "service_unavailable"


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


def refusal_outcome(status: int) -> str:
    """The metrics outcome of a request refused before the engine."""
    return "shed" if status == 429 else f"rejected_{status}"


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class GenerationRequest:
    model: str
    prompt_token_ids: list[int]
    options: SamplingOptions
    request_id: str
    # What the client sent ({"prompt": text} or {"messages": [...]}), for --capture-dir; None = never captured.
    capture_source: dict | None = None


@dataclass
class ResolvedModel:
    adapter: AdapterVersion | None  # None = the base model

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter else None


class GenerationService:
    def __init__(self, engine: Engine, registry: AdapterRegistry, limits: LimitsConfig,
                 metrics: Metrics, base_model_name: str, max_model_len: int,
                 admission: AdmissionController, capture: CaptureWriter | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.limits = limits
        self.metrics = metrics
        self.base_model_name = base_model_name
        self.max_model_len = max_model_len
        self.tokenizer = engine.tokenizer
        self.admission = admission
        self.capture = capture
        self._background: set[asyncio.Task] = set()

    # -- model resolution ----------------------------------------------------------------------
    def resolve(self, model: str) -> ResolvedModel:
        if model == self.base_model_name:
            return ResolvedModel(adapter=None)
        try:
            return ResolvedModel(adapter=self.registry.resolve(model))
        except AdapterError as exc:
            error = ModelNotFound if exc.status == 404 else ServiceUnavailable
            raise error(str(exc), param="model") from exc

    # -- prompts -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render_chat(self, messages: list[dict]) -> list[int]:
        if len(messages) > self.limits.max_chat_messages:
            raise InvalidRequest(
                f"messages has {len(messages)} entries; at most {self.limits.max_chat_messages} are allowed",
                param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template error is the caller's malformed conversation
            raise InvalidRequest(f"messages could not be rendered with the chat template: {exc}",
                                 param="messages") from exc
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- limits --------------------------------------------------------------------------------
    def sampling_options(self, *, prompt_len: int, max_tokens: int | None, temperature: float | None,
                         top_p: float | None, n: int, stop: str | Sequence[str] | None, seed: int | None,
                         presence_penalty: float | None, frequency_penalty: float | None,
                         stream: bool, ignore_eos: bool = False) -> SamplingOptions:
        limits = self.limits
        if prompt_len == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if limits.max_prompt_tokens is not None and prompt_len > limits.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has {prompt_len} tokens; this server accepts at most "
                                 f"{limits.max_prompt_tokens}", param="prompt")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len} tokens",
                param="prompt")
        if max_tokens is None:
            max_tokens = min(room, limits.max_tokens)
        if max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if max_tokens > limits.max_tokens:
            raise InvalidRequest(f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}",
                                 param="max_tokens")
        if max_tokens > room:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens", param="max_tokens")
        if not 1 <= n <= limits.max_n:
            raise InvalidRequest(f"n must be between 1 and {limits.max_n}", param="n")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > limits.max_stop_sequences:
            raise InvalidRequest(f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop")
        for s in stops:
            if not s or len(s) > limits.max_stop_length:
                raise InvalidRequest(
                    f"each stop sequence must have 1 to {limits.max_stop_length} characters", param="stop")
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            n=n,
            stop=stops,
            seed=seed,
            presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0,
            stream=stream,
            ignore_eos=ignore_eos,
        )

    # -- generation ----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest, resolved: ResolvedModel,
                       arrival: float | None = None) -> AsyncIterator[GenerationChunk]:
        """Run one request on the engine; yields chunks, records metrics, releases the adapter.
        ``arrival`` (perf_counter) is when the client's request came in: latencies count from it."""
        adapter = resolved.adapter
        adapter_name = resolved.adapter_name
        if adapter is not None:
            self.registry.acquire(adapter)
        arrival = time.perf_counter() if arrival is None else arrival
        first_token_at: float | None = None
        last_output_at = arrival
        num_generated = 0
        outcome = "failed_500"
        captured: dict[int, list[str]] | None = {} if self.capture and request.capture_source else None
        try:
            async for chunk in self.engine.generate(request.prompt_token_ids, request.options,
                                                    request.request_id, adapter):
                if captured is not None:
                    captured.setdefault(chunk.index, []).append(chunk.text)
                now = time.perf_counter()
                if chunk.token_ids:
                    if first_token_at is None:
                        first_token_at = now
                    elif request.options.stream:
                        self.metrics.observe_inter_token(adapter_name, now - last_output_at)
                    last_output_at = now
                num_generated += len(chunk.token_ids)
                yield chunk
            outcome = "ok"
            if captured is not None:
                for pieces in captured.values():
                    self.capture.record(request.model, request.capture_source, "".join(pieces))
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "aborted"
            raise
        except EngineUnavailable as exc:
            outcome = "failed_503"
            raise ServiceUnavailable(str(exc)) from exc
        except ValueError as exc:  # vLLM's input validation (e.g. a token id out of range)
            outcome = "failed_400"
            raise InvalidRequest(str(exc)) from exc
        finally:
            end = time.perf_counter()
            logger.info("request %s %s", request.request_id, outcome, extra={
                "request_id": request.request_id, "adapter": adapter_name or "", "outcome": outcome,
                "ttft_ms": None if first_token_at is None else round(1000 * (first_token_at - arrival), 2),
                "e2e_ms": round(1000 * (end - arrival), 2), "generated_tokens": num_generated})
            self.metrics.request_finished(
                adapter_name, outcome,
                ttft_s=None if first_token_at is None else first_token_at - arrival,
                e2e_s=end - arrival,
                num_prompt_tokens=len(request.prompt_token_ids),
                num_generated_tokens=num_generated)
            if adapter is not None and self.registry.release(adapter):
                self._spawn(self.engine.remove_adapter(adapter))

    def stream_choices(self, generations: list[GenerationRequest], resolved: ResolvedModel, n: int,
                       deadline: float | None = None) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """One merged stream over all prompts of a request, admitted as one unit; yields
        (choice index, chunk). ``deadline`` (time.monotonic) is the client's, if it gave one."""
        arrival = time.perf_counter()
        cost = sum(len(g.prompt_token_ids) + g.options.max_tokens * g.options.n for g in generations)
        queue_key = resolved.adapter_name or BASE_MODEL_KEY

        async def choices():
            ticket = await self.admit(queue_key, cost, deadline, resolved.adapter_name)
            started, finished = time.perf_counter(), False
            try:
                streams = [self.generate(g, resolved, arrival) for g in generations]
                async for prompt_index, chunk in merge_streams(streams):
                    yield prompt_index * n + chunk.index, chunk
                finished = True
            finally:
                self.admission.release(ticket, time.perf_counter() - started if finished else None)

        return choices()

    async def admit(self, queue_key: str, cost: float, deadline: float | None, adapter_name: str | None) -> Ticket:
        try:
            ticket = await self.admission.acquire(queue_key, cost, deadline)
        except Overloaded as exc:
            raise TooManyRequests(exc.message, exc.retry_after_s) from None
        except Draining as exc:
            raise ServiceUnavailable(str(exc)) from None
        self.metrics.observe_admission_wait(adapter_name, ticket.queue_wait_s)
        return ticket

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def collect_choices(stream: AsyncIterator[tuple[int, GenerationChunk]],
                          num_choices: int) -> tuple[list[str], list[list[int]], list[str | None], int]:
    """Drain a choices stream: text, token ids and finish reason per choice, and tokens generated."""
    texts = [""] * num_choices
    token_ids: list[list[int]] = [[] for _ in range(num_choices)]
    finish: list[str | None] = [None] * num_choices
    num_generated = 0
    async for index, chunk in stream:
        texts[index] += chunk.text
        token_ids[index].extend(chunk.token_ids)
        finish[index] = chunk.finish_reason or finish[index]
        num_generated += len(chunk.token_ids)
    return texts, token_ids, finish, num_generated


def usage_counts(generations: list[GenerationRequest], num_generated: int) -> dict[str, int]:
    num_prompt = sum(len(g.prompt_token_ids) for g in generations)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_generated,
            "total_tokens": num_prompt + num_generated}


def _bearer_matches(authorization: str | None, secret: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <secret>`` value."""
    import hmac

    return hmac.compare_digest((authorization or "").encode(), f"Bearer {secret}".encode())


def require_api_key(authorization: str | None, api_key: str | None) -> None:
    """Inference calls (HTTP and gRPC): open unless the server was started with ``--api-key``."""
    if api_key is not None and not _bearer_matches(authorization, api_key):
        raise Unauthorized("a valid API key is required (authorization: Bearer <key>)")


def require_admin(authorization: str | None, admin_token: str | None) -> None:
    """Adapter admin calls (HTTP and gRPC): disabled without ``--admin-token``."""
    if admin_token is None:
        raise Forbidden("admin calls are disabled: start the server with --admin-token")
    if not _bearer_matches(authorization, admin_token):
        raise Unauthorized("a valid admin token is required (authorization: Bearer <token>)")


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators; yields ``(stream_index, item)`` as items arrive.

    An exception in any stream cancels the others and propagates.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
