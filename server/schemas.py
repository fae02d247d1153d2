"""Request bodies of the HTTP API (DESIGN section 5). Ranges that depend on the loaded model
(exit layers, vocabulary, context) are checked in `server.app` against its config."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from engine.speculative import MAX_DRAFT_TOKENS

from .fields import Int, StopList, StopString, Text

MAX_TOKENS_LIMIT = 4096
# strict: a JSON `true` or `"7"` is not an integer (see fields.Int), `1` is not a boolean
STRICT = ConfigDict(extra="forbid", strict=True)


class SamplingFields(BaseModel):
    model_config = STRICT

    max_tokens: Int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_k: Int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopList | StopString | None = None
    stop_token_ids: list[Int] | None = None
    min_tokens: Int = Field(0, ge=0, le=MAX_TOKENS_LIMIT, description="at most max_tokens (422 otherwise)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    # JSON object keys are strings: a token id key is read from its digits
    logit_bias: dict[Annotated[int, Strict(False)], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool = False
    ignore_eos: bool = False
    policy: Literal["fixed", "confidence", "speculative"] = "fixed"
    exit_layer: Int | None = None
    threshold: float = Field(0.9, ge=0.0, le=1.0)
    min_exit_layer: Int = 1
    exit_points: list[Int] | None = None  # confidence policy: default the model's exit points
    confidence_measure: Literal["probability", "margin"] = "probability"
    draft_exit_layer: Int | None = None   # speculative: checked against the model's layers
    num_draft_tokens: Int | None = Field(None, ge=1, le=MAX_DRAFT_TOKENS)
    draft_confidence: float | None = Field(None, ge=0.0, le=1.0)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class GenerateRequest(SamplingFields):
    prompt: Text | None = None
    token_ids: list[Int] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        return self


class PerplexityRequest(BaseModel):
    model_config = STRICT

    text: Text | None = None
    token_ids: list[Int] | None = None
    exit_layers: list[Int] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of text and token_ids")
        return self
