"""Structured outputs and logprobs without an engine: the bounds (server/structured.py), the
OpenAI translation (response_format, structured_outputs, logprobs) and the response shapes."""

from __future__ import annotations

import json

import pytest

from loraplex.server.config import LimitsConfig
from loraplex.server.engine import GenerationChunk, TokenLogprob
from loraplex.server.errors import InvalidRequest
from loraplex.server.openai_format import ChatFormat, CompletionFormat
from loraplex.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from loraplex.server.structured import StructuredInput, check_structured

LIMITS = LimitsConfig()
SCHEMA = {"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}


def refused(given: StructuredInput, limits: LimitsConfig = LIMITS) -> str:
    with pytest.raises(InvalidRequest) as caught:
        check_structured(given, limits)
    return caught.value.message


def test_each_kind_checked_into_its_canonical_form():
    spec = check_structured(StructuredInput(json_schema=SCHEMA), LIMITS)
    assert spec.kind == "json" and json.loads(spec.value) == SCHEMA
    assert check_structured(StructuredInput(json_schema=json.dumps(SCHEMA)), LIMITS) == spec  # text or dict
    assert check_structured(StructuredInput(json_object=True), LIMITS).kind == "json_object"
    assert check_structured(StructuredInput(regex=r"\d{3}"), LIMITS).value == r"\d{3}"
    spec = check_structured(StructuredInput(choice=["urgent", "später"]), LIMITS)
    assert spec.kind == "choice" and spec.choices() == ["urgent", "später"]


@pytest.mark.parametrize("given, words", [
    (StructuredInput(regex="a", choice=["a"]), "not several"),
    (StructuredInput(json_schema="{not json"), "not valid JSON"),
    (StructuredInput(json_schema="[1, 2]"), "must be a JSON object"),
    (StructuredInput(json_schema={"enum": [float("nan")]}), "not finite"),
    (StructuredInput(json_schema={"title": "\ud800"}), "lone surrogate"),
    (StructuredInput(json_schema={"\udfff": {}}), "lone surrogate"),
    (StructuredInput(regex=""), "1-2048"),
    (StructuredInput(regex="a" * 2049), "1-2048"),
    (StructuredInput(regex="a\x00b"), "NUL"),
    (StructuredInput(regex="\ud800"), "lone surrogate"),
    (StructuredInput(choice=[]), "1-256 strings"),
    (StructuredInput(choice="yes"), "1-256 strings"),
    (StructuredInput(choice=["x"] * 257), "1-256 strings"),
    (StructuredInput(choice=["ok", 3]), "each choice"),
    (StructuredInput(choice=["", "a"]), "each choice"),
    (StructuredInput(choice=["a\x00"]), "NUL"),
])
def test_hostile_constraints_are_refused_by_name(given, words):
    assert words in refused(given)


def test_schema_size_and_depth_are_bounded_without_recursion():
    deep = current = {}
    for _ in range(100_000):  # far past Python's recursion limit: checked iteratively
        current["items"] = current = {}
    assert "deeper than 24" in refused(StructuredInput(json_schema=deep))
    assert "exceeds" in refused(StructuredInput(json_schema={"enum": ["x" * 40_000]}))
    assert "exceeds" in refused(StructuredInput(json_schema=" " * 40_000))
    nested_ok = current = {}
    for _ in range(20):
        current["items"] = current = {}
    assert check_structured(StructuredInput(json_schema=nested_ok), LIMITS).kind == "json"
    tight = LimitsConfig(max_schema_bytes=64)
    assert "exceeds 64 bytes" in refused(StructuredInput(json_schema=SCHEMA), tight)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def test_openai_response_format_and_the_structured_outputs_extension():
    assert chat().structured_input() is None
    assert chat(response_format={"type": "text"}).structured_input() is None
    assert chat(response_format={"type": "json_object"}).structured_input() == StructuredInput(json_object=True)
    given = chat(response_format={"type": "json_schema",
                                  "json_schema": {"name": "Bill", "schema": SCHEMA, "strict": True}})
    assert given.structured_input() == StructuredInput(json_schema=SCHEMA)
    completion = CompletionRequest(model="m", prompt="x", structured_outputs={"choice": ["a", "b"]})
    assert completion.structured_input() == StructuredInput(choice=["a", "b"])
    assert CompletionRequest(model="m", prompt="x", structured_outputs={"regex": "[0-9]+"}).structured_input().regex
    with pytest.raises(InvalidRequest, match="needs json_schema.schema"):
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}).structured_input()
    with pytest.raises(InvalidRequest, match="not both"):
        chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}).structured_input()
    with pytest.raises(ValueError):  # a vLLM constraint this server does not take: refused by name
        chat(structured_outputs={"grammar": "root ::= 'a'"})
    with pytest.raises(ValueError):
        chat(response_format={"type": "xml"})


def test_logprobs_fields_of_both_apis():
    assert chat().num_logprobs is None and chat(logprobs=False).num_logprobs is None
    assert chat(logprobs=True).num_logprobs == 0 and chat(logprobs=True, top_logprobs=5).num_logprobs == 5
    with pytest.raises(InvalidRequest, match="needs logprobs: true"):
        _ = chat(top_logprobs=3).num_logprobs
    assert CompletionRequest(model="m", prompt="x", logprobs=2).num_logprobs == 2
    assert CompletionRequest(model="m", prompt="x").num_logprobs is None


ITEMS = [TokenLogprob("Hé", -0.5, (("Hé", -0.5), ("Ho", -1.5))), TokenLogprob("llo", -0.25, (("llo", -0.25),))]


def test_chat_logprobs_shape():
    choice = ChatFormat(chat(logprobs=True, top_logprobs=2)).choice(0, "Héllo", "stop", ITEMS)
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == ["Hé", "llo"]
    assert content[0]["bytes"] == list("Hé".encode()) and content[0]["logprob"] == -0.5
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["Hé", "Ho"]
    assert ChatFormat(chat()).choice(0, "x", "stop")["logprobs"] is None


def test_completion_logprobs_offsets_continue_across_stream_chunks():
    fmt = CompletionFormat(CompletionRequest(model="m", prompt="x", logprobs=2, stream=True))
    from loraplex.server.service import Prepared

    prepared = Prepared("cmpl-1", [], 1)
    first = fmt.chunk(prepared, 0, GenerationChunk(0, "Héllo", [1, 2], None, ITEMS))["choices"][0]["logprobs"]
    assert first == {"tokens": ["Hé", "llo"], "token_logprobs": [-0.5, -0.25],
                     "top_logprobs": [{"Hé": -0.5, "Ho": -1.5}, {"llo": -0.25}], "text_offset": [0, 2]}
    second = fmt.chunk(prepared, 0, GenerationChunk(0, "!", [3], "stop", [TokenLogprob("!", -1.0)]))
    assert second["choices"][0]["logprobs"]["text_offset"] == [5]
