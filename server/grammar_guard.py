"""The engine-side bound on a structured request's token masks: a mask that costs more than the
limit to fill ends its request, through vLLM's own path for a grammar that rejects a token.

Why: the grammar budget (``grammar_budget.py``) times a new constraint's masks on a few sample
steps before the engine gets it, and a sample can miss states that only some outputs reach (a
long forced prefix, one branch among many). vLLM fills each structured request's mask on the
engine's thread at every step, the batch waiting; unbounded, such a constraint would cost every
other request that much at each of its tokens. Here it costs one slow step: the fill is timed
(the thread's CPU time), and over the limit the grammar refuses the step's token, which vLLM
answers by finishing the request with an error (the service's 400).

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in each process it starts;
the server passes the limit to them through their environment (:func:`set_mask_limit`, before
the engine starts), as the LoRA kernels' selection is passed.
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

LIMIT_ENV = "LORAPLEX_GRAMMAR_MASK_LIMIT_MS"
# The engine's limit against the sample steps' budget (``--max-grammar-mask-ms``): a constraint
# that passed its sample steps near the budget is not ended mid-answer by one slow step.
ENGINE_LIMIT_FACTOR = 4.0


def set_mask_limit(limit_ms: float | None) -> None:
    """Called before the engine starts: the CPU-milliseconds one mask fill may take in the engine
    (None: unbounded)."""
    if limit_ms is None:
        os.environ.pop(LIMIT_ENV, None)
    else:
        os.environ[LIMIT_ENV] = repr(float(limit_ms))


def register() -> None:
    """vLLM plugin hook: bound xgrammar's mask fills in this process when the server set a limit."""
    value = os.environ.get(LIMIT_ENV)
    if not value:
        return
    from vllm.v1.structured_output.backend_xgrammar import XgrammarGrammar

    bound_mask_fills(XgrammarGrammar, float(value) / 1e3)
    logger.info("loraplex grammar guard: a structured request's mask over %s ms ends it (pid %d)", value, os.getpid())


def bound_mask_fills(grammar_class: type, limit_s: float) -> None:
    """Wrap ``grammar_class``'s ``fill_bitmask(bitmask, idx)`` and ``accept_tokens(request_id,
    tokens)`` (vLLM's ``StructuredOutputGrammar``): after a fill over ``limit_s`` of this thread's
    CPU time, the grammar accepts no more tokens, and any fill before then allows every token
    (its result is refused anyway) instead of paying for the mask again. Once per class."""
    if getattr(grammar_class, "_loraplex_mask_limit_s", None) is not None:
        grammar_class._loraplex_mask_limit_s = limit_s
        return
    fill_bitmask, accept_tokens = grammar_class.fill_bitmask, grammar_class.accept_tokens
    grammar_class._loraplex_mask_limit_s = limit_s

    def bounded_fill_bitmask(self, bitmask, idx: int) -> None:
        if self.__dict__.get("_loraplex_mask_over_s") is not None:
            bitmask[idx].fill_(-1)  # (every bit set: any token; it is refused at accept)
            return
        started = time.thread_time()
        fill_bitmask(self, bitmask, idx)
        spent_s = time.thread_time() - started
        if spent_s > grammar_class._loraplex_mask_limit_s:
            self.__dict__["_loraplex_mask_over_s"] = spent_s

    def bounded_accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        over_s = self.__dict__.get("_loraplex_mask_over_s")
        if over_s is not None:
            logger.warning("request %s ended: its structured-output constraint's token mask took %.0f ms of CPU "
                           "(limit %.0f ms), and the engine's batch waits for it at every step", request_id,
                           1e3 * over_s, 1e3 * grammar_class._loraplex_mask_limit_s)
            return False
        return accept_tokens(self, request_id, tokens)

    grammar_class.fill_bitmask = bounded_fill_bitmask
    grammar_class.accept_tokens = bounded_accept_tokens
