"""The cost bounds on a structured-output constraint: each constraint not seen before is compiled
once, in a child process, under a CPU-time budget, and enforced there for a few sample steps under
a per-token budget, before the engine is given it.

Why: vLLM's backend (xgrammar 0.2.8) spends about a CPU-second per bounded string (``maxLength``,
``minLength``) or counted repetition, so a 9 KB schema of 200 such strings compiles for ~2 min,
and the 32 KiB bound allows ~10 min. The engine compiles in a pool of (cores + 1) // 2 threads
shared by every tenant, and a compile cannot be stopped: one tenant's schema would hold every
other tenant's structured request (and a core) for as long as it takes. Here a compile over the
budget is killed with its process and the request refused (400), and the verdict is kept, so the
same constraint costs nothing the next time. Checks run on two lanes (two compiler processes),
a tenant on at most one at a time, so one tenant's slow schemas leave the other lane to everyone
else.

Why the sample steps: at every engine step, vLLM fills the token mask of each structured request
in the batch, one after another on the engine's thread, before the batch's step runs. A regex of
nested or overlapping repetitions compiles at once and still costs xgrammar seconds per mask
(``(([^x]*){20}){6}``: ~9 CPU-seconds, 15 characters), so 16 tokens of it held another tenant's
one-second request for 69 s. Here the compiled constraint is walked for a few steps (random tokens
it allows) and its mask fills timed; when two of them are over the per-token budget it is refused
(400).
A walk samples; a constraint whose costly states only a rare path reaches can pass, and then the
engine's own bound (``grammar_guard.py``) ends its request at its first slow mask. The verdict
keeps the mask's cost: a request pays it once per sequence, and a tenant's requests in flight
share one budget of it (:class:`MaskHold`; over it, a 429).

The bookkeeping (verdicts, turns, abandoned checks) is plain asyncio; only :class:`ProcessCompiler`
starts a process, and only that process imports xgrammar.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger(__name__)

# The kinds of constraint the engine compiles (vLLM's StructuredOutputOptions, by name; a choice
# reaches the engine as a grammar).
KINDS = ("json", "json_object", "regex", "grammar")


class CompileOverBudget(Exception):
    """The compile used more than its budget; the compiler was stopped."""


class CompileStalled(Exception):
    """The compile got too little CPU to finish in ``WALL_FACTOR`` times its budget (a busy
    machine, not the constraint's fault); the compiler was stopped."""


class CompilerBusy(Exception):
    """The request's constraint could not be checked now (a busy machine): retry later (429)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CompilerLost(Exception):
    """The compiler process died (or could not start) during the compile."""


class MaskBudgetFull(CompilerBusy):
    """The tenant's structured requests in flight already cost its mask budget at every step:
    retry when one has finished (429)."""


class MaskHold:
    """A request's share of its tenant's mask cost in flight (CPU-seconds per engine step), held
    from its check until :meth:`release` (once; again is a no-op)."""

    def __init__(self, in_flight: dict[str, float], tenant: str, cost_s: float) -> None:
        self._in_flight, self.tenant, self.cost_s = in_flight, tenant, cost_s
        in_flight[tenant] = in_flight.get(tenant, 0.0) + cost_s

    def release(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        left = in_flight[self.tenant] - self.cost_s
        if left > 1e-12:
            in_flight[self.tenant] = left
        else:
            del in_flight[self.tenant]


@dataclass(frozen=True)
class Compiled:
    """What compiling one constraint gave: ``error`` (why it did not compile; None: it did), and
    ``mask_s``, the CPU-seconds of a token's mask on the sample steps (:func:`mask_cost_s`)."""

    error: str | None = None
    mask_s: float = 0.0


class Compiler(Protocol):
    def compile(self, kind: str, spec: str, budget_s: float, mask_budget_s: float | None) -> Compiled:
        """Compile one constraint and walk its sample steps (blocking; the walk stops once its mask
        cost is over ``mask_budget_s``). Raises :class:`CompileOverBudget`,
        :class:`CompileStalled` or :class:`CompilerLost`; after any of them the compiler is closed."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Verdict:
    """A checked constraint: ``refusal`` (why it is refused; None: it is not), and ``mask_s``, the
    CPU-seconds of one of its token masks on the sample steps (0: not tried)."""

    refusal: str | None = None
    mask_s: float = 0.0


class VerdictCache:
    """Verdicts by constraint (kind and text, hashed). Least recently used first out."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._verdicts: OrderedDict[bytes, Verdict] = OrderedDict()
        self._max_entries = max_entries

    @staticmethod
    def key(kind: str, spec: str) -> bytes:
        return hashlib.sha256(f"{kind}\0{spec}".encode("utf-8", "surrogatepass")).digest()

    def get(self, key: bytes) -> Verdict | None:
        """The verdict, None when not known."""
        verdict = self._verdicts.get(key)
        if verdict is not None:
            self._verdicts.move_to_end(key)
        return verdict

    def put(self, key: bytes, verdict: Verdict) -> None:
        self._verdicts[key] = verdict
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > self._max_entries:
            self._verdicts.popitem(last=False)

    def __len__(self) -> int:
        return len(self._verdicts)


@dataclass
class _TenantTurn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # checks of this tenant holding or waiting for the lock


@dataclass
class _Check:
    """One constraint being checked, shared by every request that asked for it meanwhile."""

    waiting: int = 0  # requests still waiting for the verdict
    task: asyncio.Task | None = field(default=None, repr=False)


class _Lane:
    """One compiler process and the thread that talks to it. A lane whose compile went over the
    budget starts a new process before it is free again (the tenant that caused it waits for it)."""

    def __init__(self, budget: "GrammarBudget", index: int) -> None:
        self.budget = budget
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"loraplex-grammar-{index}")
        self.compiler: Compiler | None = None
        self.retry_start_at = 0.0

    def ensure_compiler(self) -> Compiler | None:
        """The lane's compiler, started when needed (in the lane's thread). None when it cannot
        start: then constraints pass unchecked, as without a budget, and a start is tried again
        after ``RETRY_START_S``."""
        if self.compiler is None and time.monotonic() >= self.retry_start_at:
            try:
                self.compiler = self.budget.make_compiler()
            except Exception:  # noqa: BLE001 - a compiler that cannot start must not refuse every request
                logger.exception("a grammar compiler could not start; structured outputs pass unchecked on its "
                                 "lane for %.0f s", self.budget.RETRY_START_S)
                self.retry_start_at = time.monotonic() + self.budget.RETRY_START_S
        return self.compiler

    def compile(self, kind: str, spec: str) -> Verdict | None:
        """The verdict of one compile, in the lane's thread (None: no compiler, not checked).
        Raises :class:`CompileStalled` (after restarting the compiler): no verdict."""
        budget = self.budget
        compiler = self.ensure_compiler()
        if compiler is None:
            return None
        started = time.perf_counter()
        try:
            compiled = compiler.compile(kind, spec, budget.budget_s, budget.mask_budget_s)
        except (CompileOverBudget, CompileStalled, CompilerLost) as exc:
            self.compiler = None
            self.ensure_compiler()  # (before the lane is free: see the class docstring)
            if isinstance(exc, CompileStalled):
                logger.warning("a structured-output constraint got too little CPU to compile; the request is told "
                               "to retry")
                raise
            if isinstance(exc, CompileOverBudget):
                logger.warning("structured-output constraint refused: over the %.1f s compile budget", budget.budget_s)
                refusal = (f"this structured-output constraint takes more than {budget.budget_s:g} CPU-seconds to "
                           "compile and try, this server's limit; bounded lengths and counts (maxLength, "
                           "minLength, maxItems, {m,n} in a regex or pattern) and nested repetitions ((a*)*) "
                           "cost the most")
            else:
                logger.warning("the grammar compiler failed on a structured-output constraint: %s", exc)
                refusal = "the structured-output constraint could not be compiled (the compiler failed on it)"
            return Verdict(refusal)
        logger.debug("constraint compiled and tried in %.2f s (%s; mask cost %.1f ms)",
                     time.perf_counter() - started, kind, 1e3 * compiled.mask_s)
        if compiled.error is not None:
            return Verdict(f"the structured-output constraint cannot be compiled: {compiled.error}")
        refusal = mask_refusal(compiled.mask_s, 1, budget.mask_budget_s)
        if refusal is not None:
            logger.warning("structured-output constraint refused: a token's mask took %.0f ms (limit %g ms)",
                           1e3 * compiled.mask_s, 1e3 * budget.mask_budget_s)
        return Verdict(refusal, compiled.mask_s)

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)
        compiler, self.compiler = self.compiler, None
        if compiler is not None:
            compiler.close()


class GrammarBudget:
    """``await check(tenant, kind, spec)`` raises ValueError (the request's 400) when the
    constraint cannot be compiled (and tried) within ``budget_s`` CPU-seconds, fails to compile, or
    two of its token masks cost more than ``mask_budget_s`` CPU-seconds each on the sample steps
    (None: not tried), and :class:`CompilerBusy` (429) when the machine gave its compile too little CPU to
    tell.

    ``lanes`` compilers run checks side by side; a tenant has at most one check on a lane (and
    while its over-budget compile's lane restarts, that restart is its turn too), so a tenant
    whose schemas are slow holds one lane, and the other tenants' checks run on the others."""

    RETRY_START_S = 60.0

    def __init__(self, budget_s: float, make_compiler: Callable[[], Compiler], lanes: int = 2,
                 max_verdicts: int = 4096, mask_budget_s: float | None = None) -> None:
        if not budget_s > 0:
            raise ValueError("the grammar compile budget must be positive")
        if mask_budget_s is not None and not mask_budget_s > 0:
            raise ValueError("the grammar mask budget must be positive (None: not tried)")
        if lanes < 1:
            raise ValueError("the grammar budget needs at least one lane")
        self.budget_s = budget_s
        self.mask_budget_s = mask_budget_s
        self.make_compiler = make_compiler
        self._verdicts = VerdictCache(max_verdicts)
        self._checks: dict[bytes, _Check] = {}
        # A tenant's checks run one at a time (its own lock); lanes go to tenants in the order they
        # asked (a FIFO queue of free lanes).
        self._tenant_turns: dict[str, _TenantTurn] = {}
        # Per tenant: the mask cost (CPU-seconds per engine step) of its checked requests in flight.
        self._mask_in_flight: dict[str, float] = {}
        self._lanes = [_Lane(self, i) for i in range(lanes)]
        self._free_lanes: asyncio.Queue[_Lane] = asyncio.Queue()
        for lane in self._lanes:
            self._free_lanes.put_nowait(lane)

    def prestart(self) -> None:
        """Start every lane's compiler now, in the background: each is a process importing
        xgrammar, seconds of work."""
        for lane in self._lanes:
            lane.thread.submit(lane.ensure_compiler)

    async def check(self, tenant: str, kind: str, spec: str, num_sequences: int = 1) -> MaskHold | None:
        """``num_sequences``: how many sequences of the request the constraint steers at once (its
        prompts x n), each a mask at every step. Returns the request's hold on its tenant's mask
        budget (None: nothing to hold), which the caller releases when the request ends; raises
        :class:`MaskBudgetFull` (a :class:`CompilerBusy`) when the tenant's requests in flight
        already hold too much of it."""
        if kind not in KINDS:
            raise ValueError(f"unknown constraint kind {kind!r}")
        if kind == "json_object":  # one fixed grammar (any JSON object), cheap: nothing to check
            return None
        key = VerdictCache.key(kind, spec)
        verdict = self._verdicts.get(key)
        if verdict is None:
            check = self._checks.get(key)
            if check is None:
                check = self._checks[key] = _Check()
                check.task = asyncio.ensure_future(self._run(key, check, tenant, kind, spec))
            check.waiting += 1
            try:
                # (shielded: a request that leaves does not stop a compile that has started, so
                # the lane is held until it ends and its verdict is kept)
                busy, verdict = await asyncio.shield(check.task)
            finally:
                check.waiting -= 1
            if busy:
                raise CompilerBusy("the server is too busy to check this structured-output constraint now; retry",
                                   retry_after_s=self.budget_s)
            if verdict is None:  # not checked (no compiler): it passes, as without a budget
                return None
        if verdict.refusal is not None:
            raise ValueError(verdict.refusal)
        mask_budget_s, cost_s = self.mask_budget_s, num_sequences * verdict.mask_s
        if mask_budget_s is None or not cost_s:
            return None
        refusal = mask_refusal(verdict.mask_s, num_sequences, mask_budget_s)
        if refusal is not None:
            raise ValueError(refusal)
        held_s = self._mask_in_flight.get(tenant, 0.0)
        if held_s + cost_s > mask_budget_s:
            raise MaskBudgetFull(f"this model's structured requests in flight already cost {1e3 * held_s:.1f} ms of "
                                 f"CPU at each engine step for their token masks, and this one would add "
                                 f"{1e3 * cost_s:.1f} ms (this server's limit: {1e3 * mask_budget_s:g} ms); retry when "
                                 "one has finished", retry_after_s=1.0)
        return MaskHold(self._mask_in_flight, tenant, cost_s)

    async def _run(self, key: bytes, check: _Check, tenant: str, kind: str, spec: str) -> tuple[bool, Verdict | None]:
        """(busy, verdict): busy when the machine gave the compile too little CPU (no verdict);
        verdict None when it was not checked."""
        turn = self._tenant_turns.get(tenant)
        if turn is None:
            turn = self._tenant_turns[tenant] = _TenantTurn()
        turn.users += 1
        try:
            async with turn.lock:
                verdict = self._verdicts.get(key)
                if verdict is not None or not check.waiting:  # decided meanwhile, or nobody waits any more
                    return False, verdict
                lane = await self._free_lanes.get()
                try:
                    verdict = await asyncio.get_running_loop().run_in_executor(lane.thread, lane.compile, kind, spec)
                except CompileStalled:
                    return True, None
                finally:
                    self._free_lanes.put_nowait(lane)
                if verdict is not None:
                    self._verdicts.put(key, verdict)
                return False, verdict
        finally:
            self._checks.pop(key, None)
            turn.users -= 1
            if not turn.users:
                del self._tenant_turns[tenant]

    def close(self) -> None:
        for check in list(self._checks.values()):
            if check.task is not None:
                check.task.cancel()
        for lane in self._lanes:
            lane.close()


def mask_refusal(mask_s: float, num_sequences: int, mask_budget_s: float | None) -> str | None:
    """Why ``num_sequences`` sequences steered by a constraint whose token mask costs ``mask_s``
    CPU-seconds are refused (each fills its mask at every step), None when they are not."""
    if mask_budget_s is None or num_sequences * mask_s <= mask_budget_s:
        return None
    if num_sequences == 1:
        cost, advice = ("", "nested or overlapping repetitions (such as (a*)* or ([^x]*){20} in a regex or "
                            "pattern) cost the most")
    else:
        cost, advice = (f" and sequence: {num_sequences} sequences at once (prompts x n) would cost "
                        f"{1e3 * num_sequences * mask_s:.0f} ms at each step", "ask for fewer at once")
    return (f"enforcing this structured-output constraint costs {1e3 * mask_s:.0f} ms of CPU per generated token"
            f"{cost} (this server's limit: {1e3 * mask_budget_s:g} ms), and every request in the engine's batch "
            f"would wait for it at each step; {advice}")


# -- the compiler process ---------------------------------------------------------------------
PR_SET_PDEATHSIG = 1  # prctl(2)


class ProcessCompiler:
    """xgrammar's compiler, configured as vLLM's backend configures it, in a child process that is
    killed when a compile and its sample steps go over the budget (CPU time of the child, read
    every 50 ms; a wall clock of ``WALL_FACTOR`` times the budget stops it too, on a machine too
    busy to give it CPU)."""

    POLL_S = 0.05
    WALL_FACTOR = 10.0
    START_TIMEOUT_S = 300.0

    def __init__(self, tokenizer_info_json: str, any_whitespace: bool) -> None:
        import multiprocessing

        import psutil

        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=compiler_main, args=(child_conn, tokenizer_info_json, any_whitespace),
                                        name="loraplex-grammar-compiler", daemon=True)
        self._process.start()
        child_conn.close()
        self._ps = psutil.Process(self._process.pid)
        try:
            ready = self._conn.poll(self.START_TIMEOUT_S) and self._conn.recv()
        except (EOFError, OSError):  # it died while starting
            ready = None
        if not ready:
            self.close()
            raise CompilerLost("the grammar compiler did not start")

    def _cpu_s(self) -> float:
        times = self._ps.cpu_times()
        return times.user + times.system

    def compile(self, kind: str, spec: str, budget_s: float, mask_budget_s: float | None) -> Compiled:
        try:
            cpu_start, wall_start = self._cpu_s(), time.monotonic()
            self._conn.send((kind, spec, mask_budget_s))
            while not self._conn.poll(self.POLL_S):
                if self._cpu_s() - cpu_start > budget_s:
                    self.close()
                    raise CompileOverBudget()
                if time.monotonic() - wall_start > self.WALL_FACTOR * budget_s:
                    self.close()
                    raise CompileStalled()
            status, detail = self._conn.recv()
        except (CompileOverBudget, CompileStalled):
            raise
        except Exception as exc:  # noqa: BLE001 - EOF, a broken pipe, the process gone (psutil): lost
            self.close()
            raise CompilerLost(f"{type(exc).__name__}: {exc}") from None
        return Compiled(mask_s=detail) if status == "ok" else Compiled(error=detail)

    def close(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=5)
        self._conn.close()


MASK_WALKS = 4  # sample walks through a compiled constraint, each of up to MASK_WALK_STEPS tokens
MASK_WALK_STEPS = 16


def compiler_main(conn, tokenizer_info_json: str, any_whitespace: bool) -> None:
    """The child: compile what the parent sends and walk its sample steps, one at a time, in one
    thread, no cache (the parent keeps the verdicts), until the pipe closes; at a lower CPU
    priority than the engine and the doors (its budget is CPU time, so that costs a constraint
    nothing but wall time)."""
    import ctypes
    import os
    import signal

    os.nice(10)
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the server, even mid-compile
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(tokenizer_info_json), max_threads=1,
                                   cache_enabled=False)
    # vLLM's compact JSON: no whitespace, and no space after its separators
    json_options = {"any_whitespace": any_whitespace, "separators": None if any_whitespace else (",", ":")}
    conn.send(("ready", None))
    while True:
        try:
            kind, spec, mask_budget_s = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if kind == "json":
                compiled = compiler.compile_json_schema(spec, **json_options)
            elif kind == "regex":
                compiled = compiler.compile_regex(spec)
            else:
                compiled = compiler.compile_grammar(spec)
            conn.send(("ok", mask_cost_s(compiled, mask_budget_s) if mask_budget_s is not None else 0.0))
        except Exception as exc:  # noqa: BLE001 - the constraint's own failure, reported
            message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())  # (xgrammar's time and source line)
            conn.send(("error", f"{type(exc).__name__}: {message[:500]}"))


def mask_cost_s(compiled, stop_above_s: float, walks: int = MASK_WALKS, steps: int = MASK_WALK_STEPS) -> float:
    """CPU-seconds of the second-costliest token-mask fill (what vLLM's engine does for the
    constraint at every step) over ``walks`` walks of up to ``steps`` tokens, each token drawn at
    random (seeded: the same verdict every time) from those the mask allows, end-of-sequence
    excepted: one slow fill alone (the first mask of a broad regex, ~15 ms for ``.{0,200}`` here)
    is forgiven. Stops at the second fill over ``stop_above_s``."""
    import torch
    import xgrammar as xgr

    generator = torch.Generator().manual_seed(0)
    vocab_size = compiled.tokenizer_info.vocab_size
    stop_token_ids = torch.tensor(compiled.tokenizer_info.stop_token_ids, dtype=torch.long)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab_size / 32)] int32, bit t%32 of word t//32
    bit_of = torch.arange(32, dtype=torch.int32)
    costliest = [0.0, 0.0]  # the two costliest fills, ascending
    for _ in range(walks):
        matcher = xgr.GrammarMatcher(compiled)
        for _ in range(steps):
            started = time.process_time()
            matcher.fill_next_token_bitmask(bitmask)
            costliest = sorted((*costliest, time.process_time() - started))[1:]
            if costliest[0] > stop_above_s:
                return costliest[0]
            allowed = ((bitmask[0].unsqueeze(1) >> bit_of) & 1).flatten()[:vocab_size].bool()  # [vocab_size]
            allowed[stop_token_ids] = False
            allowed_ids = allowed.nonzero().flatten()  # [num_allowed]
            if not allowed_ids.numel():
                break
            token = int(allowed_ids[torch.randint(allowed_ids.numel(), (1,), generator=generator)])
            if not matcher.accept_token(token) or matcher.is_terminated():
                break
    return costliest[0]
