"""The one request path both front doors share.

A door translates its wire format into an :class:`InferenceRequest` and iterates
:meth:`GenerationService.run`: lease the adapter version (resolution and lease in one step),
check every bound and tokenize (large inputs off the event loop), admit, make sure the adapter is
in the engine, generate; the lease and the admission ticket are released in one ``finally``.
The first event is a :class:`Prepared` (what usage counts need), then ``(choice, chunk)`` pairs.
Errors are :class:`~server.errors.RequestError`; each door maps their ``status`` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from .adapters.manager import AdapterManager, Lease
from .adapters.registry import AdapterError
from .admission import BASE_MODEL_KEY, AdmissionController, Draining, Overloaded, Ticket
from .capture import CaptureWriter
from .config import LimitsConfig
from .engine import (Engine, EngineRequestFailed, EngineUnavailable, GenerationChunk, SamplingOptions,
                     TokenLogprob)
from .errors import (InternalError, InvalidRequest, RequestError, ServiceUnavailable, TooManyRequests,
                     from_adapter_error, refusal_outcome)
from .grammar_budget import CompilerBusy, MaskHold
from .metrics import Metrics
from .prompts import PromptBuilder, check_text
from .structured import StructuredInput, check_structured

logger = logging.getLogger(__name__)

# A client's own request id: 1-128 printable ASCII characters without spaces (it is echoed in
# every event and logged, so nothing that could forge a log line or bloat a stream).
REQUEST_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # a token id as a JSON object key
MAX_MODEL_NAME_CHARS = 256


@dataclass(frozen=True)
class SamplingInput:
    """Sampling parameters as the client sent them (None: not given); bounds are checked here."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | Sequence[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per token (0: only the chosen token's); None: off
    # token id (an int, or its decimal digits: JSON keys are strings) -> bias added to its logit
    logit_bias: Mapping | None = None
    # vLLM's extensions (what its clients send in extra_body)
    top_k: int | None = None  # 0 or -1: off
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: Sequence[int] | None = None
    structured: StructuredInput | None = None


@dataclass
class InferenceRequest:
    """One request, whatever door it came through. Exactly one of ``prompts`` (completions: texts
    or token-id lists) and ``messages`` (chat: ``{"role", "content"}`` dicts) is given."""

    model: str
    sampling: SamplingInput = field(default_factory=SamplingInput)
    prompts: Sequence[str | Sequence[int]] = ()
    messages: Sequence[dict] | None = None
    stream: bool = False
    request_id: str | None = None  # the client's own id, if it sent one
    deadline: float | None = None  # time.monotonic() by which the client gives up
    id_prefix: str = "cmpl"


@dataclass
class GenerationRequest:
    """One prompt of a request, ready for the engine."""

    model: str
    prompt_token_ids: list[int]
    options: SamplingOptions
    request_id: str
    # What the client sent ({"prompt": text} or {"messages": [...]}), for --capture-dir; None = never captured.
    capture_source: dict | None = None


@dataclass
class Prepared:
    """The first event of :meth:`GenerationService.run`: the request passed every check."""

    request_id: str
    generations: list[GenerationRequest]
    n: int
    # its share of its tenant's mask cost in flight (grammar_budget.py), released when it ends
    mask_hold: MaskHold | None = field(default=None, repr=False)

    @property
    def num_choices(self) -> int:
        return len(self.generations) * self.n

    def usage(self, num_generated: int) -> dict[str, int]:
        num_prompt = sum(len(g.prompt_token_ids) for g in self.generations)
        return {"prompt_tokens": num_prompt, "completion_tokens": num_generated,
                "total_tokens": num_prompt + num_generated}


class GenerationService:
    def __init__(self, *, engine: Engine, adapters: AdapterManager, prompts: PromptBuilder, limits: LimitsConfig,
                 metrics: Metrics, admission: AdmissionController, base_model_name: str, max_model_len: int,
                 capture: CaptureWriter | None = None) -> None:
        self.engine = engine
        self.adapters = adapters
        self.prompts = prompts
        self.limits = limits
        self.metrics = metrics
        self.admission = admission
        self.base_model_name = base_model_name
        self.max_model_len = max_model_len
        self.capture = capture

    # -- the request path ------------------------------------------------------------------------
    async def run(self, request: InferenceRequest) -> AsyncIterator[Prepared | tuple[int, GenerationChunk]]:
        """Prepared, then (choice index, chunk) as the engine produces them. Cancelling the
        iteration aborts the engine requests."""
        arrival = time.perf_counter()
        lease: Lease | None = None
        prepared: Prepared | None = None
        ticket: Ticket | None = None
        started, finished, generating = 0.0, False, False
        try:
            request_id = self._request_id(request)
            lease = self._lease(request.model)
            prepared = await self._prepare(request, request_id)
            yield prepared
            queue_key = request.model if lease is not None else BASE_MODEL_KEY
            ticket = await self._admit(queue_key, prepared, request.deadline, lease)
            started = time.perf_counter()
            if lease is not None:
                await self._ensure_in_engine(lease)
            generating = True
            streams = [self._generate(g, lease, arrival) for g in prepared.generations]
            async with contextlib.aclosing(merge_streams(streams)) as merged:  # closing aborts at once
                async for prompt_index, chunk in merged:
                    yield prompt_index * prepared.n + chunk.index, chunk
            finished = True
        except RequestError as exc:
            if not generating:
                self.count_refusal(exc)
            exc.counted = True  # a failure in the engine is counted by its outcome
            raise
        finally:
            if ticket is not None:
                self.admission.release(ticket, time.perf_counter() - started if finished else None)
            if prepared is not None and prepared.mask_hold is not None:
                prepared.mask_hold.release()
            if lease is not None:
                lease.release()

    async def tokenize(self, request: InferenceRequest) -> list[int]:
        """The token ids the server would use for the request's (first) prompt."""
        lease = self._lease(request.model)
        try:
            ids, _ = await self._tokenize(request, 1)
            return ids[0]
        finally:
            if lease is not None:
                lease.release()

    def count_refusal(self, refusal: RequestError | int) -> None:
        """Count a request refused before the engine, once (the doors call this for the refusals
        the service never saw: authentication, undecodable bodies, their own translation)."""
        status = refusal
        if isinstance(refusal, RequestError):
            if refusal.counted:
                return
            refusal.counted = True
            status = refusal.status
        self.metrics.record_outcome(None, refusal_outcome(status))

    # -- steps -----------------------------------------------------------------------------------
    @staticmethod
    def _request_id(request: InferenceRequest) -> str:
        if request.request_id is None or request.request_id == "":
            return f"{request.id_prefix}-{uuid.uuid4().hex}"
        if not isinstance(request.request_id, str) or not REQUEST_ID_PATTERN.fullmatch(request.request_id):
            raise InvalidRequest("the request id must be 1-128 printable ASCII characters without spaces",
                                 param="request_id")
        return request.request_id

    def _lease(self, model: str) -> Lease | None:
        """None for the base model; else a lease on the adapter's ready version."""
        if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME_CHARS:
            raise InvalidRequest(f"model must be a name of 1-{MAX_MODEL_NAME_CHARS} characters", param="model")
        check_text(model, "model")
        if model == self.base_model_name:
            return None
        try:
            return self.adapters.lease(model)
        except AdapterError as exc:
            error = from_adapter_error(exc)
            error.param = "model"
            raise error from None

    async def _prepare(self, request: InferenceRequest, request_id: str) -> Prepared:
        n = request.sampling.n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.limits.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.limits.max_n}", param="n")
        prompt_ids, sources = await self._tokenize(request, n)
        generations = []
        for i, (ids, source) in enumerate(zip(prompt_ids, sources)):
            options = self.sampling_options(len(ids), request.sampling, request.stream)
            suffix = f"-{i}" if request.messages is None else ""
            generations.append(GenerationRequest(request.model, ids, options, f"{request_id}{suffix}", source))
        options = generations[0].options
        try:
            mask_hold = await self.engine.check_options(options, tenant=request.model,
                                                        num_sequences=len(generations) * options.n)
        except ValueError as exc:  # the engine's own sampling checks, before any work
            raise InvalidRequest(str(exc), param="response_format" if options.structured else None) from None
        except CompilerBusy as exc:  # too little CPU to check it, or its tenant's mask budget is in use
            raise TooManyRequests(str(exc), retry_after_s=exc.retry_after_s) from None
        return Prepared(request_id, generations, n, mask_hold)

    async def _tokenize(self, request: InferenceRequest, n: int) -> tuple[list[list[int]], list[dict | None]]:
        """Token ids and capture source per prompt; counts are checked before any tokenizing."""
        prompts = self.prompts
        if request.messages is not None:
            messages = prompts.check_messages(request.messages)
            size = sum(len(m["content"]) for m in messages)
            ids = await prompts.run(prompts.encode_chat, messages, size=size)
            return [ids], [{"messages": messages}]
        if not request.prompts:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(request.prompts) * n > self.limits.max_n:
            raise InvalidRequest(f"{len(request.prompts)} prompts x n={n} exceeds this server's limit of "
                                 f"{self.limits.max_n} choices per request", param="prompt")
        texts = [check_text(p, "prompt") for p in request.prompts if isinstance(p, str)]
        encoded = iter(await prompts.run(lambda: [prompts.encode_text(t) for t in texts],
                                         size=sum(len(t) for t in texts)) if texts else ())
        ids_list: list[list[int]] = []
        sources: list[dict | None] = []
        for prompt in request.prompts:
            if isinstance(prompt, str):
                ids_list.append(next(encoded))
                sources.append({"prompt": prompt})
            else:
                ids_list.append(prompts.check_token_ids(prompt))
                sources.append(None)  # token-id prompts are never captured
        return ids_list, sources

    def sampling_options(self, prompt_len: int, s: SamplingInput, stream: bool) -> SamplingOptions:
        """Every sampling bound, for both doors."""
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
        max_tokens = min(room, limits.max_tokens) if s.max_tokens is None else _integer(s.max_tokens, "max_tokens")
        if max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if max_tokens > limits.max_tokens:
            raise InvalidRequest(f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}",
                                 param="max_tokens")
        if max_tokens > room:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens", param="max_tokens")
        stops = (s.stop,) if isinstance(s.stop, str) else tuple(s.stop or ())
        if len(stops) > limits.max_stop_sequences:
            raise InvalidRequest(f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop")
        for stop in stops:
            if not isinstance(stop, str) or not stop or len(stop) > limits.max_stop_length:
                raise InvalidRequest(
                    f"each stop sequence must have 1 to {limits.max_stop_length} characters", param="stop")
            check_text(stop, "stop")
        seed = None if s.seed is None else _integer(s.seed, "seed")
        if seed is not None and not 0 <= seed < 2**63:
            raise InvalidRequest("seed must be in [0, 2^63)", param="seed")
        top_k = 0 if s.top_k is None else _integer(s.top_k, "top_k")
        if not -1 <= top_k <= self.prompts.max_token_id + 1:
            raise InvalidRequest(f"top_k must be -1 or 0 (off) or at most the vocabulary's "
                                 f"{self.prompts.max_token_id + 1} tokens", param="top_k")
        min_tokens = 0 if s.min_tokens is None else _integer(s.min_tokens, "min_tokens")
        if not 0 <= min_tokens <= max_tokens:
            raise InvalidRequest(f"min_tokens must be between 0 and max_tokens ({max_tokens})", param="min_tokens")
        stop_token_ids = () if s.stop_token_ids is None else tuple(s.stop_token_ids)
        if len(stop_token_ids) > limits.max_stop_token_ids:
            raise InvalidRequest(f"at most {limits.max_stop_token_ids} stop token ids are allowed",
                                 param="stop_token_ids")
        self.prompts.check_token_ids(stop_token_ids, param="stop_token_ids")
        logprobs = None if s.logprobs is None else _integer(s.logprobs, "logprobs")
        if logprobs is not None and not 0 <= logprobs <= limits.max_logprobs:
            raise InvalidRequest(f"logprobs must be between 0 and {limits.max_logprobs}", param="logprobs")
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=_in_range(s.temperature, "temperature", 0.0, 2.0, default=1.0),
            top_p=_in_range(s.top_p, "top_p", 0.0, 1.0, default=1.0, low_open=True),
            n=s.n,
            stop=stops,
            seed=seed,
            presence_penalty=_in_range(s.presence_penalty, "presence_penalty", -2.0, 2.0, default=0.0),
            frequency_penalty=_in_range(s.frequency_penalty, "frequency_penalty", -2.0, 2.0, default=0.0),
            stream=stream,
            ignore_eos=bool(s.ignore_eos),
            logprobs=logprobs,
            logit_bias=self._logit_bias(s.logit_bias),
            top_k=max(top_k, 0),
            min_p=_in_range(s.min_p, "min_p", 0.0, 1.0, default=0.0),
            repetition_penalty=_in_range(s.repetition_penalty, "repetition_penalty", 0.0, 2.0, default=1.0,
                                         low_open=True),
            min_tokens=min_tokens,
            stop_token_ids=stop_token_ids,
            structured=None if s.structured is None or not s.structured.num_given else check_structured(
                s.structured, limits),
        )

    def _logit_bias(self, given) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``logit_bias``: at most ``max_logit_bias`` token ids of the vocabulary, each
        biased by a number in [-100, 100] (-100 bans the token, 100 all but forces it)."""
        if not given:
            return ()
        if not isinstance(given, Mapping):
            raise InvalidRequest("logit_bias must map token ids to numbers", param="logit_bias")
        if len(given) > self.limits.max_logit_bias:
            raise InvalidRequest(f"logit_bias has {len(given)} entries; at most {self.limits.max_logit_bias} are "
                                 f"allowed", param="logit_bias")
        biases: dict[int, float] = {}
        for key, bias in given.items():
            token = int(key) if isinstance(key, str) and TOKEN_ID_KEY.fullmatch(key) else key
            self.prompts.check_token_ids([token], param="logit_bias")
            biases[token] = _in_range(bias, "logit_bias", -100.0, 100.0, default=0.0)
        return tuple(sorted(biases.items()))

    async def _admit(self, queue_key: str, prepared: Prepared, deadline: float | None,
                     lease: Lease | None) -> Ticket:
        cost = sum(len(g.prompt_token_ids) + g.options.max_tokens * g.options.n for g in prepared.generations)
        adapter_name = None if lease is None else lease.adapter.name
        try:
            ticket = await self.admission.acquire(queue_key, cost, deadline)
        except Overloaded as exc:
            raise TooManyRequests(exc.message, exc.retry_after_s) from None
        except Draining as exc:
            raise ServiceUnavailable(str(exc)) from None
        self.metrics.observe_admission_wait(adapter_name, ticket.queue_wait_s)
        return ticket

    async def _ensure_in_engine(self, lease: Lease) -> None:
        try:
            await self.adapters.ensure_in_engine(lease)
        except AdapterError as exc:
            raise from_adapter_error(exc) from None
        except EngineUnavailable as exc:
            raise ServiceUnavailable(str(exc)) from None

    async def _generate(self, request: GenerationRequest, lease: Lease | None,
                        arrival: float) -> AsyncIterator[GenerationChunk]:
        """One prompt on the engine; yields chunks, records metrics, log line and capture.
        Latencies count from ``arrival`` (perf_counter), when the client's request came in."""
        adapter = None if lease is None else lease.adapter
        adapter_name = None if adapter is None else adapter.name
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
            if captured is not None:  # (file writes in a worker thread: a slow disk must not stall the loop)
                await asyncio.to_thread(self.capture.record_all, request.model, request.capture_source,
                                        ["".join(pieces) for pieces in captured.values()])
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "ok":  # (cancelled while its capture line was being written: it was served in full)
                outcome = "aborted"
            raise
        except EngineUnavailable as exc:
            outcome = "failed_503"
            raise ServiceUnavailable(str(exc)) from exc
        except ValueError as exc:  # vLLM's input validation
            outcome = "failed_400"
            raise InvalidRequest(str(exc)) from exc
        except EngineRequestFailed as exc:
            if request.options.structured is None:
                outcome = "failed_500"
                raise InternalError(str(exc)) from exc
            outcome = "failed_400"  # its only per-request failures: a grammar it cannot compile, or too costly a mask
            raise InvalidRequest("the engine could not compile or enforce this request's structured-output "
                                 "constraint (a token's mask can cost more than this server allows)",
                                 param="response_format") from exc
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


def _integer(value, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{param} must be an integer", param=param)
    return value


def _in_range(value, param: str, low: float, high: float, *, default: float, low_open: bool = False) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            low < value <= high if low_open else low <= value <= high):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidRequest(f"{param} must be a number in {interval}", param=param)
    return float(value)


@dataclass
class Choices:
    """The choices of a finished run: text, token ids, finish reason and (when asked for)
    per-token logprobs of each, and the tokens generated in all."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str | None]
    logprobs: list[list[TokenLogprob] | None]
    num_generated: int = 0


async def collect_choices(events: AsyncIterator, prepared: Prepared) -> Choices:
    """Drain the chunks of a run (after its Prepared) into its choices."""
    num_choices = prepared.num_choices
    choices = Choices([""] * num_choices, [[] for _ in range(num_choices)], [None] * num_choices,
                      [None] * num_choices)
    async for index, chunk in events:
        choices.texts[index] += chunk.text
        choices.token_ids[index].extend(chunk.token_ids)
        choices.finish_reasons[index] = chunk.finish_reason or choices.finish_reasons[index]
        if chunk.logprobs is not None:
            choices.logprobs[index] = (choices.logprobs[index] or []) + chunk.logprobs
        choices.num_generated += len(chunk.token_ids)
    return choices


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators; yields ``(stream_index, item)`` as items arrive.

    An exception in any stream cancels the others and propagates.
    """
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for item in stream:
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
