"""Bounds of a structured-output constraint (a JSON schema, any JSON object, a regex or a fixed
choice), checked once for both doors before the engine sees it; pure, no vLLM.

The engine compiles what passes (vLLM's structured-output backend, xgrammar first); what it
still refuses is a 400 from :meth:`~server.engine.Engine.check_options`, run off the event loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .config import LimitsConfig
from .errors import InvalidRequest
from .prompts import check_text


@dataclass(frozen=True)
class StructuredInput:
    """One constraint as the client sent it (each door fills at most one field)."""

    json_schema: object = None  # a JSON schema: a dict, or its JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: Sequence[str] | None = None

    @property
    def num_given(self) -> int:
        return sum((self.json_schema is not None, bool(self.json_object), self.regex is not None,
                    self.choice is not None))


@dataclass(frozen=True)
class StructuredSpec:
    """A checked constraint: ``kind`` is json | json_object | regex | choice; ``value`` is the
    schema's canonical JSON text, the regex, or the choices as a JSON list ("" for json_object)."""

    kind: str
    value: str = ""

    def choices(self) -> list[str]:
        return json.loads(self.value)


PARAM = "response_format"


def check_structured(given: StructuredInput, limits: LimitsConfig) -> StructuredSpec:
    if given.num_given > 1:
        raise InvalidRequest("give one structured-output constraint (a JSON schema, json_object, a regex "
                             "or a choice), not several", param=PARAM)
    if given.json_object:
        return StructuredSpec("json_object")
    if given.regex is not None:
        return StructuredSpec("regex", _regex(given.regex, limits))
    if given.choice is not None:
        return StructuredSpec("choice", _choices(given.choice, limits))
    return StructuredSpec("json", _schema(given.json_schema, limits))


def _regex(regex, limits: LimitsConfig) -> str:
    if not isinstance(regex, str) or not 0 < len(regex) <= limits.max_regex_chars:
        raise InvalidRequest(f"the regex must be a string of 1-{limits.max_regex_chars} characters", param="regex")
    if "\x00" in regex:
        raise InvalidRequest("the regex must not contain a NUL character", param="regex")
    return check_text(regex, "regex")


def _choices(choices, limits: LimitsConfig) -> str:
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not 0 < len(choices) <= limits.max_choices:
        raise InvalidRequest(f"choice must be a list of 1-{limits.max_choices} strings", param="choice")
    for choice in choices:
        if not isinstance(choice, str) or not 0 < len(choice) <= limits.max_choice_chars:
            raise InvalidRequest(f"each choice must be a string of 1-{limits.max_choice_chars} characters",
                                 param="choice")
        if "\x00" in choice:
            raise InvalidRequest("a choice must not contain a NUL character", param="choice")
        check_text(choice, "choice")
    return json.dumps(list(choices), ensure_ascii=False)


def _schema(schema, limits: LimitsConfig) -> str:
    if isinstance(schema, str):
        if len(schema) > limits.max_schema_bytes:
            raise _too_large(limits)
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError):
            raise InvalidRequest("the JSON schema is not valid JSON", param=PARAM) from None
    if not isinstance(schema, dict):
        raise InvalidRequest("the JSON schema must be a JSON object", param=PARAM)
    _check_tree(schema, limits.max_schema_depth)
    # key order kept: the engine emits properties in the order the schema gives them
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if len(text.encode("utf-8")) > limits.max_schema_bytes:
        raise _too_large(limits)
    return text


def _too_large(limits: LimitsConfig) -> InvalidRequest:
    return InvalidRequest(f"the JSON schema exceeds {limits.max_schema_bytes} bytes", param=PARAM)


def _check_tree(schema: dict, max_depth: int) -> None:
    """Nesting at most ``max_depth``; every string (keys too) encodable text; numbers finite.
    Iterative: a hostile depth never reaches Python's recursion limit."""
    stack: list[tuple[object, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise InvalidRequest(f"the JSON schema nests deeper than {max_depth} levels", param=PARAM)
        if isinstance(node, dict):
            for key, value in node.items():
                check_text(key, PARAM)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
        elif isinstance(node, str):
            check_text(node, PARAM)
        elif isinstance(node, float) and not math.isfinite(node):
            raise InvalidRequest("the JSON schema holds a number that is not finite", param=PARAM)
