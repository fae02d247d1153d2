"""Request bodies of the OpenAI-compatible routes (server.openai_api). The BitSkip fields of
`SamplingFields` (exit_layer, policy, threshold, ...) are accepted as extra body fields."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from .schemas import SamplingFields


class CompletionRequest(SamplingFields):
    """OpenAI /v1/completions."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default
    n: int = Field(1, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=0)
    user: str | None = None
