"""Fuzzing the real server for a bounded number of cases: request bodies drawn from the HTTP
API's own OpenAPI schema (valid, near-valid and wrongly typed), and malformed or random gRPC
messages. Zero 5xx, zero crashes, and the server still serves afterwards."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.server.grpc_gen import loraplex_pb2 as pb

pytestmark = pytest.mark.integration

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                | st.text(max_size=20))
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def from_schema(schema: dict, components: dict, depth: int = 0) -> st.SearchStrategy:
    """A small JSON-Schema -> hypothesis translation, covering what FastAPI emits for our models;
    each value is sometimes replaced by arbitrary JSON (the near-valid / wrong-type cases)."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[-1]], components, depth)
    if depth > 4:
        return ANY_JSON
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, components, depth + 1) for s in schema.get("anyOf", schema.get("oneOf"))])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fields = {name: from_schema(sub, components, depth + 1) | ANY_JSON for name, sub in props.items()}
        optional = {name: s for name, s in fields.items() if name not in required}
        return st.fixed_dictionaries({n: s for n, s in fields.items() if n in required}, optional=optional)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), components, depth + 1), max_size=4)
    if kind == "string":
        return st.text(max_size=schema.get("maxLength", 40) if schema.get("maxLength", 40) < 40 else 40)
    if kind == "integer":
        return st.integers(schema.get("minimum", -5), schema.get("maximum", 5000))
    if kind == "number":
        return st.floats(schema.get("minimum", -5.0), schema.get("maximum", 5.0), allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return ANY_JSON


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(f"{server.url}/openapi.json").json()


def body_strategy(openapi: dict, path: str, models: list[str]) -> st.SearchStrategy:
    schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    bodies = from_schema(schema, openapi["components"]["schemas"])

    def bounded(body):
        # keep generation cheap: the fuzz is about parsing and validation, not long outputs
        if isinstance(body, dict):
            body = dict(body)
            if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
                body["max_tokens"] = 4
            if isinstance(body.get("max_completion_tokens"), int) and body["max_completion_tokens"] > 4:
                body["max_completion_tokens"] = 4
            body.setdefault("max_tokens", 4)
        return body

    components = openapi["components"]["schemas"]
    properties = components[schema["$ref"].rsplit("/", 1)[-1]]["properties"]
    valid = {"model": models[0], "max_tokens": 2}
    valid.update({"messages": [{"role": "user", "content": "Hi"}]} if "messages" in properties else {"prompt": "Hi"})
    # a valid body with one field set to a value drawn from that field's schema (or anything)
    one_field = st.sampled_from(sorted(properties)).flatmap(
        lambda name: st.builds(lambda value: {**valid, name: value},
                               from_schema(properties[name], components) | ANY_JSON))
    with_model = st.builds(lambda b, m: {**b, "model": m} if isinstance(b, dict) else b, bodies,
                           st.sampled_from(models) | st.text(max_size=10))
    return (one_field | with_model | bodies | ANY_JSON).map(bounded)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_http_fuzz_from_openapi_schema_never_gets_a_5xx(server, openapi, path, base_model_name, adapter_names):
    seen: list[int] = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=body_strategy(openapi, path, [base_model_name, *adapter_names[:2]]))
    def check(body):
        # allow_nan: Infinity/NaN go out as the non-standard tokens, which the server must refuse
        response = httpx.post(f"{server.url}{path}", content=json.dumps(body, allow_nan=True), timeout=120,
                              headers={"content-type": "application/json"})
        seen.append(response.status_code)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert "message" in response.json()["error"]

    check()
    assert 200 in seen and any(400 <= s < 500 for s in seen), seen  # both paths were exercised
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_http_raw_garbage_bodies_are_4xx(server):
    for payload in (b"", b"{", b"\xff\xfe\x00", b"[]", b'{"model": 1e999}', b"null", b'"x"' * 1000):
        response = httpx.post(f"{server.url}/v1/completions", content=payload,
                              headers={"content-type": "application/json"}, timeout=30)
        assert 400 <= response.status_code < 500, (payload[:20], response.status_code)


def test_grpc_fuzz_malformed_messages_never_crash_the_server(server, base_model_name):
    method = "/loraplex.v1.Generation/Generate"

    async def call(channel, payload: bytes) -> grpc.StatusCode:
        rpc = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            await rpc(payload, timeout=60)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    def parses(payload: bytes) -> bool:
        try:
            pb.GenerateRequest.FromString(payload)
            return True
        except Exception:  # noqa: BLE001 - any decode failure
            return False

    valid = pb.GenerateRequest(model=base_model_name, text="Hi",
                               sampling=pb.SamplingParameters(max_tokens=2, temperature=0)).SerializeToString()

    @settings(max_examples=80, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(payload=st.binary(max_size=64) | st.builds(lambda cut, junk: valid[:cut] + junk,
                                                     st.integers(0, len(valid)), st.binary(max_size=8)))
    def check(payload):
        async def one():
            async with grpc.aio.insecure_channel(server.grpc_target) as channel:
                return await call(channel, payload)

        code = asyncio.run(one())
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (payload, code)
        if not parses(payload):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (payload, code)

    check()

    async def still_serving():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await call(channel, valid)

    assert asyncio.run(still_serving()) == grpc.StatusCode.OK


ANY_CODEPOINTS = st.lists(st.integers(0, 0x10FFFF), max_size=12).map(lambda cps: "".join(map(chr, cps)))
HOSTILE_INTS = st.integers(-2**40, 2**40) | st.sampled_from([-1, 0, 49151, 49152, 2**31, 2**63]) | st.booleans()


def hostile_bodies(path: str, models: list[str]) -> st.SearchStrategy:
    """Valid bodies with hostile values: token ids out of the vocabulary, any code point (lone
    surrogates and control characters included) in prompts, content, roles, stops and the model
    name, prompt lists times n, and long identifiers."""
    model = st.sampled_from(models) | ANY_CODEPOINTS
    sampling = st.fixed_dictionaries({"model": model, "max_tokens": st.integers(1, 3)}, optional={
        "n": st.integers(-2, 40), "stop": st.lists(ANY_CODEPOINTS, max_size=3) | ANY_CODEPOINTS,
        "temperature": st.floats(-1, 3, allow_nan=False), "seed": HOSTILE_INTS})
    valid = {"model": models[0], "max_tokens": 2}
    valid.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    # the valid body with one hostile value, or a body hostile all over
    one_value = st.sampled_from(["model", "n", "stop", "seed"]).flatmap(lambda name: st.builds(
        lambda value: {**valid, name: value}, {"model": st.just(models[-1]) | ANY_CODEPOINTS,
                                               "n": st.integers(-2, 40), "stop": ANY_CODEPOINTS,
                                               "seed": HOSTILE_INTS}[name]))
    if path == "/v1/completions":
        prompt = (ANY_CODEPOINTS | st.lists(HOSTILE_INTS, min_size=1, max_size=6)
                  | st.lists(ANY_CODEPOINTS, min_size=1, max_size=12)
                  | st.lists(st.lists(HOSTILE_INTS, min_size=1, max_size=4), min_size=1, max_size=12))
        return one_value | st.builds(lambda body, p: {**body, "prompt": p}, sampling, prompt)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"])
                                     | ANY_CODEPOINTS, "content": ANY_CODEPOINTS})
    return one_value | st.builds(lambda body, m: {**body, "messages": m}, sampling,
                                 st.lists(message, min_size=1, max_size=4))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_http_hostile_values_get_4xx_never_5xx(server, path, base_model_name, adapter_names):
    seen: list[int] = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=hostile_bodies(path, [base_model_name, adapter_names[1]]),
           request_id=st.none() | st.text(alphabet="ab\x7f", max_size=200) | st.just("r" * 32768))
    def check(body, request_id):
        headers = {"content-type": "application/json"}
        if request_id is not None:
            headers["x-request-id"] = request_id
        response = httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, (body, response.text)
        if response.status_code == 200 and request_id:
            assert response.headers["x-request-id"] == request_id and len(request_id) <= 128

    check()
    assert 200 in seen and 400 in seen, seen
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_grpc_hostile_values_get_invalid_argument_never_internal(server, base_model_name):
    text = ANY_CODEPOINTS.filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))  # protobuf: UTF-8 only
    message = st.builds(lambda role, content: pb.ChatMessage(role=role, content=content),
                        st.sampled_from(["user", "developer", "system"]) | text, text)
    prompt = (st.builds(lambda t: {"text": t}, text)
              | st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)},
                          st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6))
              | st.builds(lambda ms: {"chat": pb.ChatMessages(messages=ms)}, st.lists(message, max_size=4)))

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(prompt=prompt, n=st.integers(0, 40), temperature=st.none() | st.floats(-1, 3, allow_nan=False),
           request_id=st.just("") | text | st.just("r" * 5000), model=st.just(base_model_name) | text)
    def check(prompt, n, temperature, request_id, model):
        sampling = pb.SamplingParameters(max_tokens=2, n=n)
        if temperature is not None:
            sampling.temperature = temperature
        request = pb.GenerateRequest(model=model, sampling=sampling, request_id=request_id, **prompt)

        async def one():
            async with grpc.aio.insecure_channel(server.grpc_target) as channel:
                from loraplex.server.grpc_gen import loraplex_pb2_grpc as pb_grpc

                try:
                    await pb_grpc.GenerationStub(channel).Generate(request, timeout=60)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

        code = asyncio.run(one())
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
            (request, code)

    check()
    assert httpx.get(f"{server.url}/health").status_code == 200
