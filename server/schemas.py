"""Request bodies of the HTTP API (DESIGN section 5). Ranges that depend on the loaded model
(exit layers, vocabulary, context) are checked in `server.app` against its config."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOKENS_LIMIT = 4096


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool = False
    ignore_eos: bool = False
    policy: Literal["fixed", "confidence"] = "fixed"
    exit_layer: int | None = None
    threshold: float = Field(0.9, ge=0.0, le=1.0)
    min_exit_layer: int = 1
    exit_points: list[int] | None = None  # confidence policy: default the model's exit points
    confidence_measure: Literal["probability", "margin"] = "probability"

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class GenerateRequest(SamplingFields):
    prompt: str | None = None
    token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        return self


class PerplexityRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    token_ids: list[int] | None = None
    exit_layers: list[int] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of text and token_ids")
        return self
