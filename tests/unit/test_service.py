"""Request limits and stream merging of the shared service layer, with a fake engine."""

import asyncio

import pytest

from server.adapters.registry import AdapterRegistry
from server.admission import AdmissionController
from server.config import LimitsConfig
from server.metrics import Metrics
from server.service import GenerationService, InvalidRequest, ModelNotFound, merge_streams


class FakeEngine:
    tokenizer = None


def make_service(**limits) -> GenerationService:
    return GenerationService(FakeEngine(), AdapterRegistry("base"), LimitsConfig(**limits), Metrics("base"),
                             "base", max_model_len=100, admission=AdmissionController(4, 4))


def options(service, **overrides):
    kwargs = dict(prompt_len=10, max_tokens=5, temperature=0.0, top_p=1.0, n=1, stop=None, seed=None,
                  presence_penalty=None, frequency_penalty=None, stream=False)
    kwargs.update(overrides)
    return service.sampling_options(**kwargs)


def test_defaults_fill_remaining_context():
    service = make_service(max_tokens=1000)
    assert options(service, max_tokens=None).max_tokens == 90


@pytest.mark.parametrize("overrides, param", [
    ({"prompt_len": 0}, "prompt"),
    ({"prompt_len": 100}, "prompt"),
    ({"max_tokens": 95}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"stop": ["x" * 65]}, "stop"),
    ({"stop": [""]}, "stop"),
])
def test_limits(overrides, param):
    with pytest.raises(InvalidRequest) as info:
        options(make_service(), **overrides)
    assert info.value.param == param


def test_max_tokens_server_limit():
    with pytest.raises(InvalidRequest, match="limit of 8"):
        options(make_service(max_tokens=8), max_tokens=9)


def test_resolve_unknown_model_is_not_found():
    with pytest.raises(ModelNotFound):
        make_service().resolve("nope")
    assert make_service().resolve("base").adapter is None


def test_merge_streams_interleaves_and_propagates_errors():
    async def gen(values, delay, fail=False):
        for v in values:
            await asyncio.sleep(delay)
            yield v
        if fail:
            raise RuntimeError("boom")

    async def collect(streams):
        return [item async for item in merge_streams(streams)]

    items = asyncio.run(collect([gen([1, 2, 3], 0.001), gen(["a", "b"], 0.0015)]))
    assert sorted(i for i, _ in items) == [0, 0, 0, 1, 1]
    assert [v for i, v in items if i == 0] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(collect([gen([1], 0.001, fail=True), gen([2, 3, 4], 0.01)]))


def test_prompt_token_limit_is_enforced():
    service = make_service(max_prompt_tokens=8)
    with pytest.raises(InvalidRequest, match="at most 8"):
        options(service, prompt_len=9)
