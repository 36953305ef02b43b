"""The engine-side bound on token masks: a fill over the limit ends its request (the grammar
refuses the step's token) and is not paid for again; other grammars are untouched. A fake grammar
class for the bookkeeping; vLLM's own class for the API it wraps."""

from __future__ import annotations

import importlib.metadata
import inspect
import time

import torch

from loraplex.server import grammar_guard


def burn_cpu(seconds: float) -> None:
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


def make_grammar_class():
    class FakeGrammar:
        """Each fill costs ``costs[i]`` CPU-seconds at its i-th fill and sets the mask to 1s."""

        def __init__(self, costs: list[float]) -> None:
            self.costs = list(costs)
            self.fills = 0
            self.accepted: list[int] = []

        def fill_bitmask(self, bitmask: torch.Tensor, idx: int) -> None:
            burn_cpu(self.costs[min(self.fills, len(self.costs) - 1)])
            self.fills += 1
            bitmask[idx].fill_(1)

        def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
            self.accepted += tokens
            return True

    return FakeGrammar


def test_a_fill_over_the_limit_ends_its_request_and_is_not_paid_for_again():
    cls = make_grammar_class()
    grammar_guard.bound_mask_fills(cls, limit_s=0.02)
    cheap, costly = cls([0.0]), cls([0.0, 0.0, 0.06])
    bitmask = torch.zeros(2, 4, dtype=torch.int32)
    for step in range(3):
        cheap.fill_bitmask(bitmask, 0)
        costly.fill_bitmask(bitmask, 1)
        assert cheap.accept_tokens("cheap", [step])
        assert costly.accept_tokens("costly", [step]) is (step < 2)  # the step of the slow fill is refused
    assert costly.accepted == [0, 1] and cheap.accepted == [0, 1, 2]
    # a fill before the refusal is reached costs nothing and allows every token
    costly.fill_bitmask(bitmask, 1)
    assert costly.fills == 3 and bitmask[1].tolist() == [-1] * 4 and bitmask[0].tolist() == [1] * 4


def test_bounding_twice_wraps_once_and_takes_the_new_limit():
    cls = make_grammar_class()
    grammar_guard.bound_mask_fills(cls, limit_s=1.0)
    fill = cls.fill_bitmask
    grammar_guard.bound_mask_fills(cls, limit_s=0.01)
    assert cls.fill_bitmask is fill
    grammar = cls([0.03])
    grammar.fill_bitmask(torch.zeros(1, 1, dtype=torch.int32), 0)
    assert not grammar.accept_tokens("r", [1])


def test_the_limit_reaches_the_engine_processes_through_their_environment(monkeypatch):
    monkeypatch.delenv(grammar_guard.LIMIT_ENV, raising=False)
    grammar_guard.set_mask_limit(200.0)
    import os

    assert float(os.environ[grammar_guard.LIMIT_ENV]) == 200.0
    grammar_guard.set_mask_limit(None)
    assert grammar_guard.LIMIT_ENV not in os.environ
    entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "loraplex.server.grammar_guard:register" for ep in entry_points)


def test_vllm_grammar_api_has_not_moved():
    from vllm.v1.structured_output.backend_xgrammar import XgrammarGrammar

    assert list(inspect.signature(XgrammarGrammar.fill_bitmask).parameters) == ["self", "bitmask", "idx"]
    assert list(inspect.signature(XgrammarGrammar.accept_tokens).parameters) == ["self", "request_id", "tokens"]
    assert XgrammarGrammar.__dictoffset__ != 0  # its instances have a __dict__, where the guard keeps its mark
