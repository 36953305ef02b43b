"""Request models of the OpenAI-compatible API (the subset loraplex serves): types only.

Unknown fields are ignored, as OpenAI-compatible servers do; fields we do not implement are
rejected with a 400 that names them rather than silently ignored. Value bounds (n, max_tokens,
temperature ...) are checked once, for both front doors, by the service.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidRequest
from .structured import StructuredInput


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(default="response", max_length=256)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's ``response_format``: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extension (what its clients send in ``extra_body``): one of a
    JSON schema, any JSON object, a regex, or a fixed choice. Other vLLM constraints (grammar,
    structural tags) are refused by name."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None


class _SamplingFields(_Request):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (its digits) -> bias in [-100, 100]
    # vLLM's extensions (its clients send them in extra_body)
    ignore_eos: bool = False  # keep generating past end-of-sequence (load tests)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension: regex / choice / json

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> str | None:
        return None

    def structured_input(self) -> StructuredInput | None:
        """The request's structured-output constraint (None: free text)."""
        response_format, extension = self.response_format, self.structured_outputs
        constrained = response_format is not None and response_format.type != "text"
        if constrained and extension is not None:
            raise InvalidRequest("give either response_format or structured_outputs, not both",
                                 param="structured_outputs")
        if extension is not None:
            return StructuredInput(json_schema=extension.json_, json_object=bool(extension.json_object),
                                   regex=extension.regex, choice=extension.choice)
        if not constrained:
            return None
        if response_format.type == "json_object":
            return StructuredInput(json_object=True)
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise InvalidRequest("response_format of type json_schema needs json_schema.schema",
                                 param="response_format")
        return StructuredInput(json_schema=response_format.json_schema.schema_)

    def reject_unsupported(self) -> None:
        field = self.unsupported()
        if field is not None:
            raise InvalidRequest(f"'{field}' is not supported by this server", param=field)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of > 1:
            return "best_of"
        return None


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str  # checked by the service (system, developer, user, assistant)
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    functions: list[dict] | None = None  # (tools' deprecated form)
    function_call: str | dict | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.functions:
            return "functions"
        if self.function_call not in (None, "none", "auto"):
            return "function_call"
        return None

    @property
    def num_logprobs(self) -> int | None:
        """OpenAI's chat form: ``logprobs: true`` turns them on, ``top_logprobs`` adds alternatives."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0

    @property
    def output_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict]:
        return [{"role": message.role, "content": message.text()} for message in self.messages]
