"""Response bodies of the HTTP API, for the OpenAPI document (DESIGN section 5). The endpoints
return plain dicts; these models describe them (`openapi.responses`) without filtering them."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .errors import error_responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timing(BaseModel):
    queue: float | None = Field(description="seconds from arrival to the first step")
    first_token: float | None
    total: float | None


class GenerateResponse(BaseModel):
    id: str
    text: str
    token_ids: list[int]
    exit_layers: list[int] = Field(description="the exit layer of each generated token")
    finish_reason: str | None = Field(description="stop, length or abort")
    usage: Usage
    timing: Timing
    warnings: list[str] | None = Field(None, description="said when the model has caveats (no causal mask, no tokenizer)")


class PerplexityResponse(BaseModel):
    tokens: int = Field(description="predictions scored")
    perplexity: dict[str, float] = Field(description="exit layer -> perplexity")
    nll: dict[str, float] = Field(description="exit layer -> mean negative log-likelihood (nats)")
    warnings: list[str] | None = Field(None, description="said when the model has caveats (no causal mask, no tokenizer)")


class Status(BaseModel):
    status: str
    model: str | None = None


# One server-sent event: `data` is JSON (a token, the final body, or the error object if the
# request fails after the 200 was sent), and the last event's data is `[DONE]`.
# what a request that runs the model can be answered besides 200 (server/errors.py)
REQUEST_ERRORS = (400, 413, 422, 429, 499, 500, 503)


def auth_errors(api_key: str | None) -> tuple[int, ...]:
    """The statuses an API key adds to a protected route."""
    return (401,) if api_key else ()


SSE = {"text/event-stream": {
    "schema": {"type": "object", "required": ["data"],
               "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
               "description": "each event's data is JSON (a token, the final body, or the error object "
                              "when the request fails mid-stream); the last is [DONE]"},
    "example": 'data: {"token_id": 42, "text": "a", "exit_layer": 18}\n\ndata: [DONE]\n\n'}}


def documented(model: type[BaseModel] | None, *errors: int, stream: bool = False, text: bool = False) -> dict:
    """`responses=` for a route: its 200 body (JSON `model`; with `stream`, server-sent events
    too; with `text`, plain text) and the error object for each status in `errors`."""
    ok: dict = {"description": "Success"}
    if model is not None:
        ok["model"] = model
    if stream:
        ok["content"] = SSE
    if text:
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    return {200: ok, **error_responses(*errors)}
