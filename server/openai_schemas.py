"""Request bodies of the OpenAI-compatible routes (server.openai_api). The BitSkip fields of
`SamplingFields` (exit_layer, policy, threshold, ...) are accepted as extra body fields.

Unknown fields are a 422 that names them, and so are OpenAI fields this server does not
implement when they are set to anything that would change the output (`unsupported`): a client
never gets silently different results."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from .fields import Int, Text, valid_unicode_within
from .schemas import MAX_TOKENS_LIMIT, SamplingFields

LOGPROBS_LIMIT = 20  # top alternatives per token, as OpenAI allows
N_LIMIT = 16         # choices per prompt


def only(*accepted: dict, why: str) -> WithJsonSchema:
    """The documented schema of an OpenAI field this server does not implement: the values it
    accepts (null and `accepted`, which change nothing); any other value is a 422 saying `why`."""
    return WithJsonSchema({"anyOf": [*accepted, {"type": "null"}], "default": None, "description": why})


NO_TOOLS = only({"type": "array", "maxItems": 0}, why="not supported (no tool or function calling): null or []")
NOT_SUPPORTED = only(why="not supported: null only")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with `usage` and no choices


class OpenAIFields(SamplingFields):
    """What /v1/completions and /v1/chat/completions share."""

    model: Text | None = None  # NAME (full depth) or NAME@K (exit layer K); see /v1/models
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default
    n: Int = Field(1, ge=1, le=N_LIMIT)
    stream_options: StreamOptions | None = None
    user: Text | None = None                   # accepted; changes nothing
    metadata: dict[str, str] | None = None    # accepted; changes nothing
    store: bool | None = None                 # accepted; nothing is stored
    service_tier: str | None = None           # accepted; one tier

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to something not implemented."""
        return []


class CompletionRequest(OpenAIFields):
    prompt: Text | list[Int] | list[Text | list[Int]]  # one prompt, or a batch of them
    echo: bool = False
    logprobs: Int | None = Field(None, ge=0, le=LOGPROBS_LIMIT)
    best_of: Int | None = Field(None, ge=1, description="if given, equal to n (every sample is returned); "
                                                       "any other value is a 422")
    suffix: Annotated[str | None, only({"type": "string", "maxLength": 0},
                                       why="not supported (needs a fill-in-the-middle model): null or empty")] = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = []
        if self.best_of is not None and self.best_of != self.n:
            out.append(("best_of", f"best_of={self.best_of} is not supported: only best_of equal to n "
                                   f"({self.n}), i.e. every sample returned"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported: insertion needs a fill-in-the-middle model"))
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: handed to the template

    role: Text
    content: Text | list[TextPart] | None = None

    @model_validator(mode="after")
    def _valid_extra_text(self):
        valid_unicode_within(self.model_extra)  # the template writes them into the prompt
        return self

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description=(
        "null: up to the end of the context; min_tokens must not exceed it"))
    max_completion_tokens: Int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description=(
        "the same as max_tokens: if both are given they must be equal (422 otherwise)"))
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=LOGPROBS_LIMIT, description="needs logprobs: true")
    add_generation_prompt: bool = True  # vLLM's: end the prompt with the assistant's turn opening
    # OpenAI fields not implemented: a value that would change the output is refused.
    tools: Annotated[list[Any] | None, NO_TOOLS] = None
    tool_choice: Annotated[Any, only({"const": "none"}, why="not supported (no tool calling): null or 'none'")] = None
    functions: Annotated[list[Any] | None, NO_TOOLS] = None
    function_call: Annotated[Any, NOT_SUPPORTED] = None
    parallel_tool_calls: bool | None = None
    response_format: Annotated[dict[str, Any] | None, only(
        {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]},
        why="only {'type': 'text'}")] = None
    modalities: Annotated[list[str] | None, only({"type": "array", "items": {"const": "text"}, "maxItems": 1},
                                                 why="only ['text']")] = None
    audio: Annotated[Any, NOT_SUPPORTED] = None
    prediction: Annotated[Any, NOT_SUPPORTED] = None
    reasoning_effort: Annotated[str | None, NOT_SUPPORTED] = None
    web_search_options: Annotated[Any, NOT_SUPPORTED] = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = [(name, f"{name} is not supported: no tool or function calling")
               for name in ("tools", "functions", "function_call") if getattr(self, name)]
        if self.tool_choice not in (None, "none"):
            out.append(("tool_choice", "tool_choice is not supported: no tool calling"))
        if self.response_format and self.response_format.get("type") != "text":
            out.append(("response_format", "response_format is not supported: only {'type': 'text'}"))
        if self.modalities and self.modalities != ["text"]:
            out.append(("modalities", "modalities is not supported: only ['text']"))
        out += [(name, f"{name} is not supported")
                for name in ("audio", "prediction", "reasoning_effort", "web_search_options")
                if getattr(self, name) is not None]
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            out.append(("max_completion_tokens", "max_tokens and max_completion_tokens disagree"))
        return out
