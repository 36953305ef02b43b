"""The one wrapper around vLLM's ``AsyncLLM``: generate (streamed), abort, add/remove/pin adapters.

The engine runs in the server's own process and event loop (vLLM's engine core runs in a
child process it spawns itself). Nothing else in the server imports vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .adapters.registry import AdapterVersion
from .adapters.store import snapshot_fingerprint
from .config import EngineConfig
from .grammar_budget import KINDS as BUDGETED_KINDS
from .grammar_budget import GrammarBudget, MaskHold, ProcessCompiler
from .grammar_guard import ENGINE_LIMIT_FACTOR, set_mask_limit
from .structured import StructuredSpec

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass(frozen=True)
class SamplingOptions:
    """Engine-independent sampling parameters, already validated by the front door."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # each token's logprob and this many top alternatives; None: none
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), token ids ascending
    # vLLM's sampling extensions: top_k 0 = all tokens; min_tokens before a stop may end it
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    structured: StructuredSpec | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's text and logprob, and the most likely tokens at its position (most
    likely first, as many as asked for)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class GenerationChunk:
    """What one engine step produced for one choice (``index``) of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


class EngineUnavailable(RuntimeError):
    pass


class EngineRequestFailed(RuntimeError):
    """The engine ended one request with an error (a grammar it could not compile, or one whose
    token mask cost over the limit: ``grammar_guard.py``); it lives on."""


# JSON has no -inf: a token the model gives no chance at all is reported as this (as vLLM does).
MIN_LOGPROB = -9999.0


@dataclass
class FinishedTiming:
    """Engine-side phases of one finished request, in seconds."""

    queued_s: float
    prefill_s: float
    decode_s: float


@dataclass
class EngineStepStats:
    """What the engine reports after a step (plain data; no vLLM types leave this module)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    running_adapters: list[str]  # adapter names (not versions)
    waiting_adapters: list[str]


# The engine knows an adapter version as "<name>@v<version>"; what a router sees is "<name>".
VERSION_MARK = "@v"


def _adapter_names(lora_names) -> list[str]:
    return sorted({name.rpartition(VERSION_MARK)[0] or name for name in lora_names})


def _stats_relay_factory(on_stats):
    """A vLLM stat logger that hands each step's stats to ``on_stats`` in the server's loop."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StatsRelay(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            finished = [FinishedTiming(f.queued_time, f.prefill_time, f.decode_time)
                        for f in (iteration_stats.finished_requests if iteration_stats else ())]
            if scheduler_stats is None:
                if finished:
                    on_stats(None, finished)
                return
            on_stats(EngineStepStats(
                num_running=scheduler_stats.num_running_reqs, num_waiting=scheduler_stats.num_waiting_reqs,
                kv_cache_usage=scheduler_stats.kv_cache_usage,
                running_adapters=_adapter_names(scheduler_stats.running_lora_adapters),
                waiting_adapters=_adapter_names(scheduler_stats.waiting_lora_adapters)), finished)

        def log_engine_initialized(self) -> None:
            pass

    return StatsRelay


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 on GPUs and on CPUs that multiply bf16 natively (AVX512-BF16/AMX);
    float32 on other CPUs, where bf16 matmuls are emulated and ~3x slower than fp32."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bfloat16" if native else "float32"


def resolve_enforce_eager(enforce_eager: bool | None) -> bool:
    """None: CUDA graphs where there is CUDA (every LoRA op in the path is graph-safe), eager elsewhere."""
    import torch

    return (not torch.cuda.is_available()) if enforce_eager is None else enforce_eager


def build_engine_args(config: EngineConfig):
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=config.model_path,
        tokenizer=config.model_path,
        dtype=resolve_dtype(config.dtype),
        max_model_len=config.max_model_len,
        kv_cache_memory_bytes=int(config.kv_cache_gib * GiB),
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        block_size=config.block_size,
        enable_lora=config.enable_lora,
        max_loras=config.max_loras,
        max_lora_rank=config.max_lora_rank,
        max_cpu_loras=config.max_cpu_loras,
        lora_dtype=config.lora_dtype,
        lora_target_modules=list(config.lora_target_modules) if config.lora_target_modules else None,
        seed=config.seed,
        enforce_eager=resolve_enforce_eager(config.enforce_eager),
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        data_parallel_size=config.data_parallel_size,
        disable_log_stats=True,
        # compact JSON needs one backend that can leave whitespace out: xgrammar (vLLM's first choice)
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        if config.json_whitespace == "compact" else StructuredOutputsConfig(),
    )


class AdapterRejected(RuntimeError):
    """The engine's own LoRA loader refused an adapter (the engine itself lives on)."""


class Engine:
    """Owns the ``AsyncLLM``. Create with :meth:`start` inside the running event loop."""

    def __init__(self, config: EngineConfig, llm) -> None:
        self.config = config
        self._llm = llm
        self.tokenizer = llm.get_tokenizer()
        model_config = llm.model_config
        self.served_dtype = str(model_config.dtype).removeprefix("torch.")
        # The dtype vLLM stores adapter weights in (its LoRA config, resolved against the model's)
        lora_config = getattr(getattr(llm, "vllm_config", None), "lora_config", None)
        self.adapter_dtype = (str(lora_config.lora_dtype).removeprefix("torch.") if lora_config is not None
                              and config.lora_dtype != "auto" else self.served_dtype)
        self._max_position_embeddings = getattr(model_config.hf_text_config, "max_position_embeddings", None)
        self._vocab_size = model_config.get_vocab_size()
        # Adapter slots in the engine's CPU-side cache as last seen (our adds and removals, and
        # every refresh); the slots this server removed itself since the last refresh.
        self._resident: set[int] = set()
        self._removed_since_refresh: set[int] = set()
        # Adapters the engine has loaded (explicitly, checked) and not removed since, with their
        # snapshot's fingerprint then: after an LRU eviction the step that schedules one reloads
        # its validated, read-only snapshot, if that is unchanged.
        self._loaded_before: dict[int, tuple | None] = {}
        self._reloaded_since_refresh: set[int] = set()
        # Structured-output constraints are checked here, one at a time, off the event loop; then
        # what the engine would compile is compiled once under a CPU-time budget (None: unbounded).
        self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-grammar")
        mask_budget_s = config.grammar_mask_budget_ms / 1e3 if config.grammar_mask_budget_ms else None
        self._grammar_budget = (GrammarBudget(config.grammar_compile_budget_s, self._start_grammar_compiler,
                                              mask_budget_s=mask_budget_s)
                                if config.grammar_compile_budget_s else None)
        self._tokenizer_info_json: str | None = None
        self._tokenizer_info_lock = threading.Lock()

    @classmethod
    def start(cls, config: EngineConfig, on_stats=None) -> "Engine":
        """``on_stats(step: EngineStepStats | None, finished: list[FinishedTiming])`` is called
        after every engine step (from the server's event loop)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        logger.info("starting vLLM engine on %s (lora_kernels=%s)", config.model_path, config.lora_kernels)
        # read by our plugin in the engine's processes when they start
        set_mask_limit(None if config.grammar_mask_budget_ms is None
                       else ENGINE_LIMIT_FACTOR * config.grammar_mask_budget_ms)
        if config.cpu_reserved_cores is not None:  # read by vLLM's CPU worker when it starts
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(config.cpu_reserved_cores)
        stat_loggers = [_stats_relay_factory(on_stats)] if on_stats else None
        # (not kept in a local: vLLM's start keeps tracebacks that hold this frame, and the engine
        # must be collectable once shut down)
        return cls(config, AsyncLLM.from_engine_args(build_engine_args(config), stat_loggers=stat_loggers))

    # -- generation -----------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return not self._llm.errored

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        request_id: str,
        adapter: AdapterVersion | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Yield new text per choice as the engine produces it (deltas when streaming,
        one final chunk per choice otherwise). Cancelling the iteration aborts the request."""
        if self._llm.errored:
            raise EngineUnavailable("the engine is not running")
        params = self._sampling_params(options)
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        outputs = self._llm.generate({"prompt_token_ids": prompt_token_ids}, params, request_id,
                                     lora_request=self._lora_request(adapter))
        try:
            async with contextlib.aclosing(outputs):  # our close aborts the engine request at once
                async for output in outputs:
                    for completion in output.outputs:
                        if completion.finish_reason == "error":
                            raise EngineRequestFailed("the engine failed this request")
                        token_ids = list(completion.token_ids)
                        yield GenerationChunk(
                            index=completion.index,
                            text=completion.text,
                            token_ids=token_ids,
                            finish_reason=completion.finish_reason,
                            logprobs=None if options.logprobs is None else _token_logprobs(
                                token_ids, completion.logprobs, options.logprobs),
                        )
        except EngineDeadError as exc:
            raise EngineUnavailable("the engine has failed; this request was not completed") from exc
        except VLLMClientError as exc:  # the engine's input validation: the request's own fault
            raise ValueError(str(exc)) from exc

    @staticmethod
    def _sampling_params(options: SamplingOptions):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=options.n,
            temperature=options.temperature,
            top_p=options.top_p,
            max_tokens=options.max_tokens,
            stop=list(options.stop) or None,
            seed=options.seed,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            ignore_eos=options.ignore_eos,
            logprobs=options.logprobs,
            logit_bias=dict(options.logit_bias) or None,
            top_k=options.top_k,
            min_p=options.min_p,
            repetition_penalty=options.repetition_penalty,
            min_tokens=options.min_tokens,
            stop_token_ids=list(options.stop_token_ids) or None,
            structured_outputs=_structured_outputs(options.structured),
            output_kind=RequestOutputKind.DELTA if options.stream else RequestOutputKind.FINAL_ONLY,
        )

    async def check_options(self, options: SamplingOptions, tenant: str = "",
                            num_sequences: int = 1) -> MaskHold | None:
        """The engine's own sampling checks, before any work: raises ValueError with its message.
        A structured-output constraint is converted by the engine's backend as the engine will do
        it (xgrammar, or its fallbacks), in a worker thread: a schema it cannot handle is refused
        here, and a large one never holds up the event loop. Then what xgrammar would compile is
        compiled once, under the grammar budget (``tenant``: whose turn it takes there;
        ``num_sequences``: the request's prompts x n, each a mask at every step). Returns the
        request's hold on its tenant's mask budget (release it when the request ends; None: none)."""
        from vllm.exceptions import VLLMClientError

        try:
            params = self._sampling_params(options)
        except (TypeError, ValueError, VLLMClientError) as exc:
            raise ValueError(str(exc)) from None
        if options.structured is not None:
            compiled = await asyncio.get_running_loop().run_in_executor(self._checks, self._verify, params)
            if compiled is not None and self._grammar_budget is not None:
                return await self._grammar_budget.check(tenant, *compiled, num_sequences=num_sequences)
        return None

    def _verify(self, params) -> tuple[str, str] | None:
        """vLLM's checks of ``params``; then (kind, text) of what xgrammar will compile for it (None
        when another backend takes it)."""
        from vllm.v1.structured_output.request import get_structured_output_key

        llm = self._llm
        try:
            params.verify(llm.model_config, llm.vllm_config.speculative_config,
                          llm.vllm_config.structured_outputs_config, self.tokenizer)
        except Exception as exc:  # noqa: BLE001 - whatever the backend raises is this request's refusal
            raise ValueError(str(exc).strip() or type(exc).__name__) from None
        structured = params.structured_outputs
        if structured is None or structured._backend != "xgrammar":
            return None
        option, spec = get_structured_output_key(structured)  # (a choice is a grammar by now)
        kind = option.name.lower()
        return (kind, spec) if kind in BUDGETED_KINDS else None

    def _start_grammar_compiler(self) -> ProcessCompiler:
        """A grammar budget lane's compiler: xgrammar on the engine's tokenizer, as vLLM's backend
        builds it (in the lane's thread)."""
        with self._tokenizer_info_lock:  # (each lane's thread starts its own compiler)
            if self._tokenizer_info_json is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self._vocab_size)
                self._tokenizer_info_json = info.serialize_json()
        return ProcessCompiler(self._tokenizer_info_json, any_whitespace=self.config.json_whitespace != "compact")

    def start_grammar_compiler(self) -> None:
        """Start the grammar budget's compiler now, in its thread, so that the first structured
        request does not wait for it."""
        if self._grammar_budget is not None:
            self._grammar_budget.prestart()

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    # -- adapters -------------------------------------------------------------------------------
    @staticmethod
    def _lora_request(adapter: AdapterVersion | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        if adapter.snapshot_path is None:
            raise ValueError(f"adapter {adapter.name} v{adapter.version} has no snapshot")
        return LoRARequest(lora_name=f"{adapter.name}{VERSION_MARK}{adapter.version}",
                           lora_int_id=adapter.adapter_slot, lora_path=str(adapter.snapshot_path))

    def check_adapter(self, path: Path, expected_modules: frozenset[str]) -> None:
        """Run vLLM's worker-side LoRA loading (its PEFT helper, its legality checks and
        ``LoRAModel.from_local_checkpoint``, on CPU, in the dtype it stores adapters in) on ``path``: what it
        refuses would otherwise be refused inside an engine step, which kills the engine. Blocking:
        call from a worker thread. Raises :class:`AdapterRejected`."""
        import torch
        from vllm.config.lora import LoRAConfig
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        try:
            lora_config = LoRAConfig(max_lora_rank=self.config.max_lora_rank, max_loras=self.config.max_loras,
                                     max_cpu_loras=self.config.max_cpu_loras)
            helper = PEFTHelper.from_local_dir(str(path), self._max_position_embeddings)
            helper.validate_legal(lora_config)
            LoRAModel.from_local_checkpoint(str(path), set(expected_modules), peft_helper=helper, lora_model_id=1,
                                            device="cpu", dtype=getattr(torch, self.adapter_dtype),
                                            model_vocab_size=self._vocab_size)
        except Exception as exc:  # noqa: BLE001 - whatever the loader raises is a refusal
            raise AdapterRejected(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    async def _snapshot_fingerprint(adapter: AdapterVersion) -> tuple | None:
        """``stat`` of the adapter's snapshot files, in a worker thread (off the event loop)."""
        return await asyncio.to_thread(snapshot_fingerprint, Path(adapter.snapshot_path))

    async def add_adapter(self, adapter: AdapterVersion) -> None:
        """Load ``adapter`` into the engine's CPU cache (or refresh its LRU position), awaited
        and checked: a refusal raises :class:`AdapterRejected` and the engine lives."""
        try:
            await self._llm.add_lora(self._lora_request(adapter))
        except Exception as exc:  # vLLM returns the worker's failure as an exception
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):
                raise EngineUnavailable("the engine has failed") from exc
            raise AdapterRejected(str(exc)) from exc
        self._resident.add(adapter.adapter_slot)
        self._loaded_before[adapter.adapter_slot] = await self._snapshot_fingerprint(adapter)

    async def ensure_adapter(self, adapter: AdapterVersion) -> bool:
        """Before a request is scheduled: load its adapter explicitly the first time, so a load
        never happens for the first time inside an engine step (where a refusal would kill the
        engine). An adapter the engine loaded before and evicted since is reloaded by the step
        that schedules its request, from the same validated, read-only snapshot: no separate
        round trip to the engine (which would wait for a step to end, then the request for the
        next). If the snapshot's files changed since that load (they are read-only, but a
        privileged hand could still touch them), the load is explicit and checked again, so a
        broken file fails only its own adapter. Returns whether it was resident (a hit of the
        engine's adapter cache)."""
        slot = adapter.adapter_slot
        if slot in self._resident:
            return True
        fingerprint = self._loaded_before.get(slot)
        if fingerprint is not None and fingerprint == await self._snapshot_fingerprint(adapter):
            self._resident.add(slot)  # it is once its step runs
            self._reloaded_since_refresh.add(slot)
            return False
        await self.add_adapter(adapter)
        return False

    async def refresh_residency(self) -> tuple[int, int]:
        """Ask the engine which adapters are resident: (how many, how many left the cache since
        the last refresh without this server removing them, i.e. LRU evictions)."""
        resident = set(await self._llm.list_loras())
        gone = self._resident - resident
        # (one reloaded since the last refresh and not yet scheduled is not an eviction)
        evicted = len(gone - self._removed_since_refresh - self._reloaded_since_refresh)
        self._resident = resident
        self._removed_since_refresh.clear()
        self._reloaded_since_refresh.clear()
        return len(resident), evicted

    async def remove_adapter(self, adapter: AdapterVersion) -> None:
        self._resident.discard(adapter.adapter_slot)
        self._loaded_before.pop(adapter.adapter_slot, None)
        self._removed_since_refresh.add(adapter.adapter_slot)
        await self._llm.remove_lora(adapter.adapter_slot)

    def shutdown(self) -> None:
        llm, self._llm = self._llm, _StoppedEngine()
        llm.shutdown()
        self._checks.shutdown(wait=False, cancel_futures=True)
        if self._grammar_budget is not None:
            self._grammar_budget.close()
        # vLLM's AsyncLLM sits in reference cycles: collected now, while vLLM's modules are alive
        # (left to the interpreter's exit, its __del__ shuts it down again and prints a traceback).
        del llm
        gc.collect()


class _StoppedEngine:
    """What an ``Engine`` holds after :meth:`Engine.shutdown`: errored, and every call refused."""

    errored = True

    def get_num_unfinished_requests(self) -> int:
        return 0

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol lookups (copy, pickle, hasattr) see a plain object
            raise AttributeError(name)
        raise EngineUnavailable("the engine is shut down")


def _structured_outputs(spec: StructuredSpec | None):
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if spec.kind == "json":
        return StructuredOutputsParams(json=spec.value)
    if spec.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if spec.kind == "regex":
        return StructuredOutputsParams(regex=spec.value)
    return StructuredOutputsParams(choice=spec.choices())


def _token_logprobs(token_ids: list[int], positions, num_top: int) -> list[TokenLogprob]:
    """vLLM's per-position ``{token id: Logprob}`` (the chosen token and the top ``num_top``) as
    plain data; the positions are this chunk's (deltas when streaming)."""
    positions = list(positions or ())[-len(token_ids):] if token_ids else []
    result = []
    for token_id, candidates in zip(token_ids, positions):
        chosen = candidates.get(token_id) if candidates else None
        top = sorted((c for c in (candidates or {}).values() if c.rank is not None and c.rank <= num_top),
                     key=lambda c: c.rank)[:num_top]
        result.append(TokenLogprob(
            token=_token_text(chosen), logprob=_finite(chosen.logprob if chosen else -math.inf),
            top=tuple((_token_text(c), _finite(c.logprob)) for c in top)))
    return result


def _token_text(logprob) -> str:
    return (getattr(logprob, "decoded_token", None) or "") if logprob is not None else ""


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB
