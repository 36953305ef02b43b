"""Sends one streamed completion and measures it from the client's side."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from .workload import RequestSpec


@dataclass
class RequestResult:
    index: int
    model: str
    sent_at: float
    ok: bool = False
    error: str | None = None       # "http_429", "http_5xx", "timeout", "connection" ...
    ttft_s: float | None = None
    e2e_s: float | None = None
    error_after_s: float | None = None  # time to an error response (a 429's, say)
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    def output_arrived(self, now: float, start: float, last: float) -> float:
        """Record a chunk that carried tokens at ``now``; returns the new "last output" time."""
        if self.ttft_s is None:
            self.ttft_s = now - start
        else:
            self.itl_s.append(now - last)
        return now

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _chunk_text(choice: dict) -> str:
    """Completions stream ``text``; chat streams ``delta.content``."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _error_kind(status: int) -> str:
    return f"http_{status}" if status < 500 else "http_5xx"


async def send(client: httpx.AsyncClient, url: str, spec: RequestSpec, sent_at: float,
               headers: dict[str, str]) -> RequestResult:
    result = RequestResult(spec.index, spec.model, sent_at)
    body = {"model": spec.model, "max_tokens": spec.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if spec.api == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = spec.prompt
        path = "/v1/completions"
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", f"{url}{path}", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = _error_kind(response.status_code)
                result.error_after_s = time.perf_counter() - start
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = "stream_error"
                    return result
                if event.get("choices") and _chunk_text(event["choices"][0]):
                    last = result.output_arrived(time.perf_counter(), start, last)
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
        result.e2e_s = time.perf_counter() - start
        result.ok = True
    except httpx.TimeoutException:
        result.error = "timeout"
    except httpx.HTTPError:
        result.error = "connection"
    return result
