"""Response bodies of the OpenAI-compatible routes (server.openai_api), for the OpenAPI document.
The routes return plain dicts; these models describe them (`responses.documented`) without
filtering them. Streams (`"stream": true`) send the same choices as server-sent events: a chunk
per output (a choice's `delta` for chat), then the usage chunk when asked for, then `[DONE]`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .responses import Usage

class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (echo)")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Choice(BaseModel):
    """What every choice has besides its content."""

    index: int
    finish_reason: str | None = Field(description="stop or length; null until the choice ends")
    exit_layers: list[int] | None = Field(None, description="the exit layer of each generated token, once the choice ends")


class CompletionChoice(Choice):
    text: str
    logprobs: CompletionLogprobs | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatContentLogprob(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatContentLogprob]


class AssistantMessage(BaseModel):
    role: str
    content: str


class ChatChoice(Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None


class Envelope(BaseModel):
    id: str
    object: str
    created: int
    model: str
    usage: Usage | None = None
    exit_layers: list[int] | None = Field(None, description="with one choice: its exit layers")
    warnings: list[str] | None = Field(None, description="said when the model has caveats (no causal mask, no tokenizer)")


class CompletionResponse(Envelope):
    choices: list[CompletionChoice]


class ChatCompletionResponse(Envelope):
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str = Field(description="NAME (full depth) or NAME@K (exit layer K)")
    object: str
    created: int
    owned_by: str
    root: str
    max_model_len: int
    num_layers: int
    exit_layer: int
    exit_points: list[int]
    device: str | None = None
    backend: str | None = None
    kernels: Any = None
    warnings: list[str] | None = None


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    model_max_length: int
    vocab_size: int
    chat_template: str | None
