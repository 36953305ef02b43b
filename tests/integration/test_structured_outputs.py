"""Structured outputs and logprobs against the real server: the official client's ``parse()``,
JSON schemas, regex and choice constraints, logprobs in both APIs (streamed and not), gRPC parity."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Literal

import grpc
import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from loraplex.server.grpc_gen import loraplex_pb2 as pb
from loraplex.server.grpc_gen import loraplex_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

TICKET = [{"role": "user", "content": "Ticket: the invoice total of 120 EUR was charged twice. Is it urgent?"}]


class Triage(BaseModel):
    team: Literal["billing", "support", "sales"]
    urgent: bool


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["team", "priority"],
          "properties": {"team": {"type": "string", "enum": ["billing", "support", "sales"]},
                         "priority": {"type": "integer", "enum": [1, 2, 3]}}}


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_parse_with_a_pydantic_model(client, base_model_name, adapter_names, which):
    model = base_model_name if which == "base" else adapter_names[1]
    completion = client.chat.completions.parse(model=model, messages=TICKET, response_format=Triage,
                                               max_tokens=64, temperature=0)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Triage), completion.choices[0].message.content
    assert completion.model == model


def test_json_schema_on_both_routes_validates(client, base_model_name, adapter_names):
    response_format = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(model=adapter_names[2], messages=TICKET, max_tokens=64, temperature=0,
                                          response_format=response_format)
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    text = client.completions.create(model=base_model_name, prompt="Ticket JSON:", max_tokens=64, temperature=0,
                                     extra_body={"response_format": response_format}).choices[0].text
    jsonschema.validate(json.loads(text), SCHEMA)
    anything = client.chat.completions.create(model=base_model_name, messages=TICKET, max_tokens=48, temperature=0,
                                              response_format={"type": "json_object"}).choices[0]
    if anything.finish_reason == "stop":  # a tiny model may run out of tokens inside the object
        assert isinstance(json.loads(anything.message.content), dict)
    else:
        assert anything.message.content.lstrip().startswith("{")


def test_choice_and_regex_for_classifiers(client, base_model_name, adapter_names):
    labels = ["billing", "support", "sales"]
    for model in (base_model_name, adapter_names[3]):
        label = client.chat.completions.create(model=model, messages=TICKET, max_tokens=8, temperature=0,
                                               extra_body={"structured_outputs": {"choice": labels}})
        assert label.choices[0].message.content in labels
    date = client.completions.create(model=base_model_name, prompt="Due date:", max_tokens=16, temperature=0,
                                     extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", date.choices[0].text)


@pytest.mark.parametrize("body, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "enum": ["x" * 40_000]}}}}, "exceeds"),
    ({"structured_outputs": {"regex": "(unclosed"}}, None),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "grammar"),
    ({"structured_outputs": {"choice": []}}, "choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "not both"),
    ({"logprobs": True, "top_logprobs": 21}, "logprobs"),
    ({"top_logprobs": 2}, "needs logprobs"),
])
def test_constraints_the_engine_cannot_take_are_a_400_naming_the_problem(server, base_model_name, body, words):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": base_model_name, "messages": TICKET, "max_tokens": 8, **body})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message and (words is None or words in message), message


def test_a_bad_schema_leaves_the_next_request_alone(client, server, base_model_name):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(Exception):
        client.chat.completions.create(model=base_model_name, messages=TICKET, max_tokens=8, response_format=bad)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert client.chat.completions.create(model=base_model_name, messages=TICKET, max_tokens=4).choices[0].message


def test_a_constraint_too_costly_to_compile_is_a_400_and_holds_up_nobody(server, base_model_name, adapter_names):
    from loraplex.loadtest.costly_grammar import costly_schema, light_schema
    from tests.integration.conftest import GRAMMAR_COMPILE_BUDGET_S

    costly = costly_schema(600, "field")  # valid, small, slow: each bounded string ~ a CPU-second
    assert len(json.dumps(costly)) < 32 << 10  # inside the schema size bound
    costly_format = {"type": "json_schema", "json_schema": {"name": "costly", "schema": costly}}
    light = light_schema(f"note_{uuid.uuid4().hex[:8]}")  # a schema no earlier run compiled
    light_format = {"type": "json_schema", "json_schema": {"name": "light", "schema": light}}
    over_budget = f"over the {GRAMMAR_COMPILE_BUDGET_S:.1f} s compile budget"
    before = server.log_path.read_text(errors="replace").count(over_budget)

    async def post(http, model, response_format):
        started = time.monotonic()
        response = await http.post("/v1/chat/completions", json={
            "model": model, "messages": TICKET, "max_tokens": 24, "temperature": 0,
            "response_format": response_format})
        return response, time.monotonic() - started

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
            costly_call = asyncio.ensure_future(post(http, adapter_names[3], costly_format))
            await asyncio.sleep(0.5)  # its compile has started; another tenant's new schema now
            light_result = await post(http, adapter_names[4], light_format)
            return await costly_call, light_result

    (refused, refused_s), (served, served_s) = asyncio.run(main())
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "response_format" and "CPU-seconds" in error["message"], error
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"].startswith('{"note_')
    # Unbounded, a third of this schema took the engine ~2 min on a 2-core CPU, and the other
    # tenant's request waited for all of it; bounded, both wait for one budget (wall clock <= 10x).
    assert refused_s < 10 * GRAMMAR_COMPILE_BUDGET_S + 60 and served_s < 10 * GRAMMAR_COMPILE_BUDGET_S + 60

    # The verdict is kept: the same schema again, through the other door too, is refused without a compile.
    again = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": base_model_name, "prompt": "x", "max_tokens": 4, "response_format": costly_format})
    assert again.status_code == 400 and "CPU-seconds" in again.json()["error"]["message"]

    async def grpc_call():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
                model=adapter_names[5], text="x", sampling=pb.SamplingParameters(
                    max_tokens=4, json_schema=json.dumps(costly, separators=(",", ":")))))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(grpc_call())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CPU-seconds" in caught.value.details()
    assert server.log_path.read_text(errors="replace").count(over_budget) == before + 1
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_client_that_leaves_mid_check_does_not_stop_it_and_its_verdict_is_kept(server, base_model_name):
    from loraplex.loadtest.costly_grammar import costly_schema
    from tests.integration.conftest import GRAMMAR_COMPILE_BUDGET_S

    over_budget = f"over the {GRAMMAR_COMPILE_BUDGET_S:.1f} s compile budget"
    costly_format = {"type": "json_schema", "json_schema": {
        "name": "costly", "schema": costly_schema(600, f"gone_{uuid.uuid4().hex[:6]}")}}
    body = {"model": base_model_name, "messages": TICKET, "max_tokens": 4, "response_format": costly_format}
    before = server.log_path.read_text(errors="replace").count(over_budget)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up, mid-check, and closes its connection
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10 * GRAMMAR_COMPILE_BUDGET_S + 60
    while server.log_path.read_text(errors="replace").count(over_budget) == before:  # the check went on
        assert time.monotonic() < deadline, "the check of a schema whose client left never ended"
        time.sleep(0.2)
    started = time.monotonic()
    again = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert again.status_code == 400 and "CPU-seconds" in again.json()["error"]["message"]
    assert time.monotonic() - started < GRAMMAR_COMPILE_BUDGET_S  # the kept verdict, not a second compile
    assert server.log_path.read_text(errors="replace").count(over_budget) == before + 1
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_constraint_too_costly_to_enforce_is_a_400_and_holds_up_nobody(server, base_model_name, adapter_names):
    # Compiles in a moment, but each token's mask costs xgrammar ~0.25 CPU-second (nested repetitions),
    # and the engine fills it at every step while the whole batch waits. Unchecked, 16 tokens of
    # (([^x]*){20}){6} held another tenant's one-second request for 69 s.
    nested = f"{uuid.uuid4().hex[:6]}(([^x]*){{8}}){{4}}"  # (never seen by this server: no kept verdict)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
            hostile = asyncio.ensure_future(http.post("/v1/chat/completions", json={
                "model": adapter_names[6], "messages": TICKET, "max_tokens": 16,
                "structured_outputs": {"regex": nested}}))
            await asyncio.sleep(0.2)
            other = await http.post("/v1/chat/completions", json={
                "model": adapter_names[7], "messages": TICKET, "max_tokens": 8, "temperature": 0})
            return await hostile, other

    refused, other = asyncio.run(main())
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "response_format" and "ms of CPU per generated token" in error["message"], error
    assert other.status_code == 200 and other.json()["choices"][0]["message"]["content"]

    async def grpc_call():  # the kept verdict, through the other door
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
                model=base_model_name, text="x", sampling=pb.SamplingParameters(max_tokens=4, regex=nested)))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(grpc_call())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "per generated token" in caught.value.details()


def test_a_costly_mask_the_sample_steps_missed_ends_its_request_in_the_engine(server, adapter_names):
    # 60 forced "ab"s, then nested repetitions: the sample steps (16 tokens a walk) never get past
    # the prefix, so the check passes it; in the engine, the first mask after the prefix costs
    # ~1.3 CPU-seconds, over the engine's limit (4x --max-grammar-mask-ms): the request ends there
    # (a 400), instead of ~1.3 s more for every request in the batch at each of its later tokens.
    evasive = f"{uuid.uuid4().hex[:6]}(ab){{60}}(([^x]*){{10}}){{4}}"

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
            hostile = asyncio.ensure_future(http.post("/v1/completions", json={
                "model": adapter_names[6], "prompt": "abababab", "max_tokens": 120, "temperature": 0,
                "structured_outputs": {"regex": evasive}}))
            others = [await http.post("/v1/completions", json={
                "model": adapter_names[7], "prompt": "Hello", "max_tokens": 8, "temperature": 0}) for _ in range(3)]
            return await hostile, others

    refused, others = asyncio.run(main())
    assert refused.status_code == 400, refused.text
    assert "enforce" in refused.json()["error"]["message"]
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] for r in others)
    # streamed, the text so far has gone out; the stream ends with the error event
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=600, json={
            "model": adapter_names[6], "prompt": "abababab", "max_tokens": 120, "temperature": 0, "stream": True,
            "structured_outputs": {"regex": evasive}}) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]).count("ab") >= 50
    assert "enforce" in events[-1]["error"]["message"] and events[-1]["error"]["code"] == 400
    assert httpx.get(f"{server.url}/health").status_code == 200


def check_top(entries: list, k: int) -> None:
    assert len(entries) == k
    logprobs = [e.logprob for e in entries]
    assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(client, adapter_names, stream):
    kwargs = dict(model=adapter_names[4], messages=TICKET, max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=3)
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
        content = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, text = choice.logprobs.content, choice.message.content
    assert len(content) == 6
    assert "".join(t.token for t in content) == text
    for token in content:
        check_top(token.top_logprobs, 3)
        assert token.logprob == token.top_logprobs[0].logprob  # greedy: the chosen token is the likeliest
        assert bytes(token.bytes).decode("utf-8", errors="replace") == token.token


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs(client, base_model_name, stream):
    kwargs = dict(model=base_model_name, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
        tops = [t for c in chunks if c.logprobs for t in c.logprobs.top_logprobs]
        text = "".join(c.text for c in chunks)
    else:
        choice = client.completions.create(**kwargs).choices[0]
        tokens, offsets, tops, text = (choice.logprobs.tokens, choice.logprobs.text_offset,
                                       choice.logprobs.top_logprobs, choice.text)
    assert len(tokens) == len(tops) == 5 and "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(5)]
    assert all(len(top) <= 2 for top in tops) and all(v <= 0 for top in tops for v in top.values())


def test_grpc_parity(server, base_model_name, adapter_names):
    async def call(request):
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await stub.Generate(request), [m async for m in stub.GenerateStream(request)]

    sampling = pb.SamplingParameters(max_tokens=8, temperature=0, logprobs=2,
                                     choice=pb.ChoiceList(values=["billing", "support", "sales"]))
    request = pb.GenerateRequest(model=adapter_names[5], sampling=sampling,
                                 chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in TICKET]))
    unary, messages = asyncio.run(call(request))
    choice = unary.choices[0]
    assert choice.text in ("billing", "support", "sales")
    assert len(choice.logprobs) == len(choice.token_ids)
    assert "".join(t.token for t in choice.logprobs).startswith(choice.text)  # then the end-of-turn token
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs)
    streamed = [t for m in messages for t in m.logprobs]
    assert [t.token for t in streamed] == [t.token for t in choice.logprobs]
    schema_request = pb.GenerateRequest(model=base_model_name, text="Ticket JSON:", sampling=pb.SamplingParameters(
        max_tokens=64, temperature=0, json_schema=json.dumps(SCHEMA)))
    jsonschema.validate(json.loads(asyncio.run(call(schema_request))[0].choices[0].text), SCHEMA)
    deep = "[" * 5000 + "]" * 5000
    for hostile in (pb.SamplingParameters(regex="(unclosed"), pb.SamplingParameters(logprobs=21),
                    pb.SamplingParameters(json_schema="{"), pb.SamplingParameters(json_schema=deep),
                    pb.SamplingParameters(json_schema="x" * 40_000),
                    pb.SamplingParameters(choice=pb.ChoiceList(values=["ok", "a\x00b"]))):
        bad = pb.GenerateRequest(model=base_model_name, text="x", sampling=hostile)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            asyncio.run(call(bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, hostile
    assert asyncio.run(call(request))[0].choices[0].text == choice.text  # and the same request still works
