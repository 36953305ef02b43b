"""The gRPC front door against the real server, over real grpc.aio channels."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraplex.server.grpc_gen import loraplex_pb2 as pb
from loraplex.server.grpc_gen import loraplex_pb2_grpc as pb_grpc

from .conftest import ADMIN_TOKEN, wait_until_engine_idle

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


def run(coro):
    return asyncio.run(coro)


def greedy(model: str, max_tokens: int = 8, prompt: str = PROMPT) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, text=prompt,
                              sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0))


async def unary(server, request, **kwargs):
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        return await pb_grpc.GenerationStub(channel).Generate(request, **kwargs)


async def streamed(server, request):
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        return [m async for m in pb_grpc.GenerationStub(channel).GenerateStream(request)]


def test_unary_and_stream_agree_with_each_other_and_with_http(server, client, base_model_name, adapter_names):
    for model in (base_model_name, *adapter_names[:2]):
        response = run(unary(server, greedy(model)))
        messages = run(streamed(server, greedy(model)))
        streamed_text = "".join(m.text for m in messages)
        http_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        assert response.choices[0].text == streamed_text == http_text, model
        assert response.choices[0].finish_reason == "length"
        assert len(response.choices[0].token_ids) == 8
        assert response.usage.completion_tokens == 8
        assert messages[-1].usage.completion_tokens == 8  # the last message carries usage
        assert len([m for m in messages if m.token_ids]) >= 2
        assert [t for m in messages for t in m.token_ids] == list(response.choices[0].token_ids)


def test_chat_and_token_id_prompts(server, base_model_name):
    chat = pb.GenerateRequest(model=base_model_name, sampling=pb.SamplingParameters(max_tokens=4, temperature=0),
                              chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi")]))
    assert run(unary(server, chat)).choices[0].text

    async def tokenize():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await pb_grpc.GenerationStub(channel).Tokenize(
                pb.TokenizeRequest(model=base_model_name, text=PROMPT))

    ids = list(run(tokenize()).token_ids)
    by_ids = pb.GenerateRequest(model=base_model_name, token_ids=pb.TokenIds(ids=ids),
                                sampling=pb.SamplingParameters(max_tokens=8, temperature=0))
    assert run(unary(server, by_ids)).choices[0].text == run(unary(server, greedy(base_model_name))).choices[0].text


def test_logit_bias_as_over_http(server, client, adapter_names):
    """A ban (-100) on the greedy first token moves it; HTTP gives the same text; a token past
    the vocabulary is INVALID_ARGUMENT."""
    model = adapter_names[0]
    first = run(unary(server, greedy(model, max_tokens=4))).choices[0].token_ids[0]
    request = greedy(model, max_tokens=4)
    request.sampling.logit_bias[first] = -100
    banned = run(unary(server, request)).choices[0]
    assert banned.token_ids[0] != first
    http = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                     logit_bias={str(first): -100})
    assert http.choices[0].text == banned.text
    request.sampling.logit_bias[10**6] = 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(unary(server, request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in info.value.details()


def test_stop_token_ids_and_min_tokens(server, adapter_names):
    """A stop token id ends the answer where it comes; min_tokens holds every stop off until then;
    top_k = 1 at temperature 1 is greedy."""
    model = adapter_names[0]
    ids = list(run(unary(server, greedy(model, max_tokens=6))).choices[0].token_ids)
    at = next(i for i in range(1, 6) if ids[i] not in ids[:i])
    request = greedy(model, max_tokens=6)
    request.sampling.stop_token_ids.append(ids[at])
    stopped = run(unary(server, request)).choices[0]
    assert stopped.finish_reason == "stop" and list(stopped.token_ids)[:at] == ids[:at]
    assert len(stopped.token_ids) <= at + 1
    request.sampling.min_tokens = 6
    held_off = run(unary(server, request)).choices[0]
    assert len(held_off.token_ids) == 6 and ids[at] not in list(held_off.token_ids)
    top_1 = greedy(model, max_tokens=6)
    top_1.sampling.temperature, top_1.sampling.top_k, top_1.sampling.seed = 1.0, 1, 5
    assert list(run(unary(server, top_1)).choices[0].token_ids) == ids


@pytest.mark.parametrize("request_, code", [
    (pb.GenerateRequest(model="no-such-adapter", text="x"), grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(model="SmolLM2-135M-Instruct", text="x",
                        sampling=pb.SamplingParameters(temperature=5)), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(model="SmolLM2-135M-Instruct"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(model="SmolLM2-135M-Instruct", text="x",
                        sampling=pb.SamplingParameters(max_tokens=10**6)), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_status_codes(server, request_, code):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(unary(server, request_))
    assert info.value.code() == code
    assert info.value.details()


def test_cancel_mid_stream_frees_the_engine(server, base_model_name):
    async def cancel_after_two_chunks():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            call = pb_grpc.GenerationStub(channel).GenerateStream(greedy(base_model_name, max_tokens=800))
            received = 0
            async for _ in call:
                received += 1
                if received == 2:
                    call.cancel()
                    break
            return received

    assert run(cancel_after_two_chunks()) == 2
    assert wait_until_engine_idle(server) == 0


def test_deadline_exceeded_is_reported_and_aborts(server, base_model_name):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(unary(server, greedy(base_model_name, max_tokens=800), timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until_engine_idle(server) == 0


def test_health_and_reflection(server):
    async def check():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="loraplex.v1.Generation"))
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = [r async for r in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            return health.status, [s.name for s in responses[0].list_services_response.service]

    status, services = run(check())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert {"loraplex.v1.Generation", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= set(services)


def test_adapters_service_needs_the_admin_token_for_changes_and_paths(server, adapter_names):
    """As on HTTP: listing is an inference call (names, versions, states); paths and raw errors,
    and loading or unloading, need the admin token."""
    async def call(metadata):
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await pb_grpc.AdaptersStub(channel).ListAdapters(pb.ListAdaptersRequest(), metadata=metadata)

    async def unload(metadata):
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await pb_grpc.AdaptersStub(channel).UnloadAdapter(pb.UnloadAdapterRequest(name=adapter_names[1]),
                                                                     metadata=metadata)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(unload(()))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    public = {a.name: a for a in run(call(())).adapters}
    assert public[adapter_names[0]].path == "" and public[adapter_names[0]].status == "ready"
    listing = run(call((("authorization", f"Bearer {ADMIN_TOKEN}"),)))
    by_name = {a.name: a for a in listing.adapters}
    assert set(adapter_names) <= set(by_name) and by_name[adapter_names[0]].path
    assert by_name[adapter_names[0]].status == "ready" and by_name[adapter_names[0]].rank == 8


def test_a_load_whose_deadline_passes_leaves_no_half_loaded_version(server, client, hf_base_model, tmp_path):
    """A careless operator's LoadAdapter with a deadline shorter than the load: the server cancels
    the handler mid-load; the version is failed (not left loading, its snapshot and engine entry
    dropped), and a second load of the same name, given time, serves."""
    import httpx

    from tests.support.adapters import make_adapter
    from tests.support.server import wait_for

    path = make_adapter(hf_base_model, tmp_path / "late", seed=9101)
    admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

    async def load(timeout):
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await pb_grpc.AdaptersStub(channel).LoadAdapter(
                pb.LoadAdapterRequest(name="late-loader", path=str(path)), metadata=admin, timeout=timeout)

    def listed():
        listing = httpx.get(f"{server.url}/v1/adapters", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        return {a["name"]: a for a in listing["data"]}.get("late-loader")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(load(0.05))  # validation and the engine's loader take longer
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: (listed() or {}).get("status") == "failed"), listed()
    failed = listed()
    assert "cancelled" in failed["error"]
    assert failed["snapshot_path"] is None or wait_for(lambda: not Path(failed["snapshot_path"]).exists())
    assert run(load(120)).status == "ready"
    assert client.completions.create(model="late-loader", prompt="Hi", max_tokens=2).choices[0].text
    httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late-loader"},
               headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
