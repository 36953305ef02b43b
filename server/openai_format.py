"""The OpenAI response shapes, for completions and chat: choices, SSE chunks (with the opening
role events of chat, the optional usage event and ``[DONE]``), and the error body."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from .engine import TokenLogprob
from .errors import RequestError
from .openai_protocol import ChatCompletionRequest, CompletionRequest
from .service import Prepared


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def sse_events(fmt, prepared: Prepared, first, events: AsyncIterator) -> AsyncIterator[str]:
    """One event per chunk (after the API's opening events), an optional usage event, [DONE]."""
    include_usage = fmt.body.include_usage
    num_generated = 0

    def with_usage(event: dict) -> dict:
        if include_usage:
            event["usage"] = None
        return event

    for event in fmt.opening_events(prepared):
        yield sse(with_usage(event))
    try:
        async for index, chunk in _chain([] if first is None else [first], events):
            num_generated += len(chunk.token_ids)
            event = fmt.chunk(prepared, index, chunk)
            if event is not None:
                yield sse(with_usage(event))
    except RequestError as exc:
        yield sse(error_body(exc.message, exc.kind, exc.status, exc.param))
    finally:
        await events.aclose()  # a client cut off mid-stream: the engine request is aborted now
    if include_usage:
        yield sse({"id": prepared.request_id, "object": fmt.chunk_object_name, "created": fmt.created,
                    "model": fmt.body.model, "choices": [], "usage": prepared.usage(num_generated)})
    yield sse("[DONE]")


async def _chain(items: list, rest: AsyncIterator) -> AsyncIterator:
    for item in items:
        yield item
    async for item in rest:
        yield item


class _Format:
    object_name = chunk_object_name = ""

    def __init__(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        self.body = body
        self.created = int(time.time())


class CompletionFormat(_Format):
    """``/v1/completions`` shapes (logprobs in the legacy form: tokens, token_logprobs,
    top_logprobs as {token: logprob}, and each token's character offset in the choice's text)."""

    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, body: CompletionRequest) -> None:
        super().__init__(body)
        self._text_offsets: dict[int, int] = {}  # per choice: characters streamed so far

    def choice(self, index: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(index, logprobs), "finish_reason": finish}

    def _logprobs(self, index: int, items: list[TokenLogprob] | None) -> dict | None:
        if items is None:
            return None
        offset = self._text_offsets.get(index, 0)
        offsets = []
        for item in items:
            offsets.append(offset)
            offset += len(item.token)
        self._text_offsets[index] = offset
        return {"tokens": [item.token for item in items], "token_logprobs": [item.logprob for item in items],
                "top_logprobs": [dict(item.top) for item in items], "text_offset": offsets}

    @staticmethod
    def opening_events(prepared: Prepared) -> list[dict]:
        return []

    def chunk(self, prepared: Prepared, index: int, chunk) -> dict:
        return {"id": prepared.request_id, "object": self.chunk_object_name, "created": self.created,
                "model": self.body.model,
                "choices": [self.choice(index, chunk.text, chunk.finish_reason, chunk.logprobs)]}


class ChatFormat(_Format):
    """``/v1/chat/completions`` shapes: the assistant role opens each choice's stream."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    @staticmethod
    def choice(index: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None = None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(logprobs), "finish_reason": finish}

    def _envelope(self, prepared: Prepared, choice: dict) -> dict:
        return {"id": prepared.request_id, "object": self.chunk_object_name, "created": self.created,
                "model": self.body.model, "choices": [choice]}

    def opening_events(self, prepared: Prepared) -> list[dict]:
        return [self._envelope(prepared, {"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None})
                for i in range(prepared.num_choices)]

    def chunk(self, prepared: Prepared, index: int, chunk) -> dict | None:
        if not chunk.text and chunk.finish_reason is None and not chunk.logprobs:
            return None
        delta = {"content": chunk.text} if chunk.text else {}
        return self._envelope(prepared, {"index": index, "delta": delta, "logprobs": _chat_logprobs(chunk.logprobs),
                                         "finish_reason": chunk.finish_reason})


def _chat_logprobs(items: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's chat form: per token its text, logprob and UTF-8 bytes, and the top alternatives."""
    if items is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(item.token, item.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in item.top]}
                        for item in items], "refusal": None}
