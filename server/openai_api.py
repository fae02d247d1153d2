"""The OpenAI-compatible routes: /v1/completions and /v1/models."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from engine.sequence import Sequence

from .app import Server, usage
from .errors import APIError
from .openai_schemas import CompletionRequest


def openai_router(server: Server) -> APIRouter:
    router = APIRouter()
    settings = server.settings

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt, token_ids = _single_prompt(body.prompt)
        params, k, confidence = server.sampling_params(body)
        ids = server.prompt_ids(prompt, token_ids, "prompt")  # OpenAI's field, text or ids
        stream = server.submit(ids, params, k, confidence)
        created = int(time.time())
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"

        def chunk(text: str, finish_reason: str | None, seq: Sequence | None = None) -> dict:
            d = {"id": cid, "object": "text_completion", "created": created, "model": settings.model_name,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
            if seq is not None:
                d["usage"] = usage(seq)
                d["exit_layers"] = seq.exit_layers
                d = server.with_warnings(d)
            return d

        if not body.stream:
            seq = await server.run_to_completion(request, stream)
            return chunk(seq.text, _openai_finish(seq.finish_reason), seq)

        return server.event_stream(
            stream, lambda out: chunk(out.text_delta, None) if out.text_delta else None,
            lambda seq: chunk("", _openai_finish(seq.finish_reason), seq))

    @router.get("/v1/models")
    async def models():
        c = server.config
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": 0, "owned_by": "bitskip",
            "max_model_len": c.max_position_embeddings, "num_layers": c.num_hidden_layers,
            "exit_points": list(c.exit_points), "device": str(server.engine.backend.device),
            "backend": server.engine.backend.name, "kernels": server.engine.backend.describe(),
            **server.with_warnings({})}]}

    return router


def _single_prompt(prompt) -> tuple[str | None, list[int] | None]:
    """OpenAI prompts may be batches; one prompt per request is served."""
    if isinstance(prompt, str):
        return prompt, None
    if prompt and all(isinstance(t, int) for t in prompt):
        return None, prompt
    if len(prompt) == 1:
        return _single_prompt(prompt[0])
    raise APIError(422, f"prompt holds {len(prompt)} prompts: allowed is 1 per request", param="prompt")


def _openai_finish(reason: str | None) -> str | None:
    return "length" if reason == "length" else "stop" if reason in ("stop", "abort") else reason
