"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, and the
tokenizer routes lm-evaluation-harness and vLLM clients use (/tokenize, /detokenize,
/tokenizer_info).

Depth by model name: `NAME` is the full model, `NAME@K` exit layer K, so any OpenAI client
chooses a depth with `model` alone; `/v1/models` lists NAME and NAME@K for every exit point.
Each of a request's prompts and `n` choices is one engine request; with a `seed`, choice j of a
prompt uses seed + j, so every choice is reproducible on its own.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Callable

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from engine.async_engine import RequestStream
from engine.llm_engine import StepOutput
from engine.detokenizer import TokenPieces
from engine.sequence import Sequence

from .app import Server
from .chat_template import ChatTemplate, ChatTemplateError
from .errors import APIError
from .fields import Text
from .openai_format import CompletionLogprobs, chat_logprobs, merge
from .openai_responses import (ChatCompletionResponse, CompletionResponse, DetokenizeResponse, ModelList,
                               TokenizeResponse, TokenizerInfo)
from .responses import REQUEST_ERRORS, auth_errors, documented
from .openai_schemas import ChatCompletionRequest, CompletionRequest, OpenAIFields

FINISH = {"length": "length", "stop": "stop", "abort": "stop"}
TOKENIZER_ERRORS = (400, 404, 413, 422, 500)  # the tokenizer routes never queue


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text
    add_special_tokens: bool = True  # the BOS id the server adds to text prompts
    model: Text | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int]
    model: Text | None = None


@dataclasses.dataclass
class Choice:
    """One engine request of an OpenAI request and what its response shows."""

    index: int
    stream: RequestStream
    prompt_ids: list[int]
    prompt_text: str
    log: CompletionLogprobs | None = None
    tokens_sent: int = 0  # output tokens already shown (streaming)
    opened: bool = False  # its first part is sent (streaming)


ChoiceBody = Callable[[Choice, int, list[int], str, bool], dict]
"""(choice, first token, its new tokens, their text, finished) -> the choice's part of a response."""


def finish(seq: Sequence, finished: bool) -> dict:
    """finish_reason (null until the end) and, at the end, the depth of every token."""
    if not finished:
        return {"finish_reason": None}
    return {"finish_reason": FINISH.get(seq.finish_reason, seq.finish_reason), "exit_layers": seq.exit_layers}


def openai_router(server: Server, chat_template: ChatTemplate | None) -> APIRouter:
    router = APIRouter()
    engine, settings, config = server.engine, server.settings, server.config
    name, L = settings.model_name, server.config.num_hidden_layers
    pieces = TokenPieces(engine.tokenizer)
    auth = auth_errors(settings.api_key)
    generating = (*REQUEST_ERRORS, 404, *auth)  # 404: an unknown model name

    def decode(ids: list[int], skip_special: bool = True) -> str:
        return engine.tokenizer.decode(ids, skip_special_tokens=skip_special) if engine.tokenizer else ""

    def depth_of(model: str | None) -> int | None:
        """The exit layer a model name chooses (None: whatever the body says)."""
        if model is None or model == name:
            return None
        base, _, k = model.rpartition("@")
        if base == name and k.isdigit() and 1 <= int(k) <= L:
            return int(k)
        raise server.reject("validation", APIError(
            404, f"The model '{model[:60]}' does not exist: served are '{name}' and '{name}@K' for K in 1..{L} "
                 "(GET /v1/models)", param="model", code="model_not_found"))

    def checked(body: OpenAIFields) -> OpenAIFields:
        """The body with the model name's depth applied; 422 names an unsupported field."""
        for field, why in body.unsupported():
            raise server.reject("validation", APIError(422, why, param=field))
        k = depth_of(body.model)
        if k is None:
            return body
        if body.policy != "fixed" or body.exit_layer not in (None, k):
            raise server.reject("validation", APIError(
                422, f"model '{body.model}' fixes the exit layer at {k}: leave exit_layer and policy out "
                     f"or use model '{name}'", param="exit_layer" if body.exit_layer is not None else "policy"))
        return body.model_copy(update={"exit_layer": k})

    def submit_all(body: OpenAIFields, prompts: list[tuple[list[int], str]], logprobs: int | None,
                   prompt_logprobs: int | None) -> list[Choice]:
        """One engine request per prompt and choice; all or none are queued."""
        params, k, confidence = server.sampling_params(body, logprobs=logprobs)
        choices: list[Choice] = []
        try:
            for i, (ids, text) in enumerate(prompts):
                for j in range(body.n):
                    p = dataclasses.replace(
                        params, seed=None if params.seed is None else (params.seed + j) % 2**63,
                        prompt_logprobs=prompt_logprobs if j == 0 else None)  # choices share the prompt's
                    log = CompletionLogprobs(pieces) if logprobs is not None else None
                    choices.append(Choice(i * body.n + j, server.submit(ids, p, k, confidence), ids, text, log))
        except APIError:
            for c in choices:
                server.loop.abort(c.stream)
            raise
        return choices

    def usage(choices: list[Choice], n: int) -> dict:
        prompt = sum(len(c.prompt_ids) for c in choices[::n])  # once per prompt, not per choice
        completion = sum(len(c.stream.seq.output_ids) for c in choices)
        counts = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        drafts = [c.stream.seq.speculation for c in choices if c.stream.seq.speculation is not None]
        if drafts:  # the speculative policy (as /generate reports it)
            counts |= {"draft_tokens": sum(s.drafted for s in drafts),
                       "accepted_draft_tokens": sum(s.accepted for s in drafts)}
        return counts

    async def respond(request: Request, body: OpenAIFields, choices: list[Choice], obj: str,
                      choice_body: ChoiceBody, opening: Callable[[Choice, Callable[[], dict]], dict]):
        """The whole response, or (stream) a chunk per output and the usage chunk when
        stream_options.include_usage asks for it. `opening(choice, rest)` is a choice's first part:
        what comes before its tokens (an echoed prompt, the assistant role), then `rest()`."""
        created = int(time.time())
        rid = f"{'chatcmpl' if obj.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"

        def envelope(parts: list[dict], **extra) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": body.model or name,
                    "choices": parts, **extra}

        def part(c: Choice, start: int, new: list[int], text: str, finished: bool) -> dict:
            if c.opened:
                return choice_body(c, start, new, text, finished)
            c.opened = True
            return opening(c, lambda: choice_body(c, start, new, text, finished))

        streams = [c.stream for c in choices]
        if not body.stream:
            seqs = await server.run_all(request, streams)
            out = envelope([part(c, 0, s.output_ids, s.text, True) for c, s in zip(choices, seqs)],
                           usage=usage(choices, body.n))
            if len(seqs) == 1:  # kept at the top level too, as before choices could be several
                out["exit_layers"] = seqs[0].exit_layers
            return server.with_warnings(out)

        def event(i: int, output: StepOutput) -> dict | None:
            c = choices[i]
            start = c.tokens_sent
            new = c.stream.seq.output_ids[start:start + (output.token_id is not None)]
            c.tokens_sent += len(new)
            if not (new or output.text_delta or output.finished or not c.opened):
                return None
            chunk = envelope([part(c, start, new, output.text_delta, output.finished)])
            return server.with_warnings(chunk) if output.finished else chunk

        def final(seqs: list[Sequence]) -> list[dict]:
            include = body.stream_options is not None and body.stream_options.include_usage
            return [envelope([], usage=usage(choices, body.n))] if include else []

        return server.event_stream(streams, event, final)

    # ---- /v1/completions -------------------------------------------------------------------
    @router.post("/v1/completions", responses=documented(CompletionResponse, *generating, stream=True))
    async def completions(body: CompletionRequest, request: Request):
        body = checked(body)
        prompts = [(await server.prompt_ids(text, ids, "prompt"), text if text is not None else decode(ids))
                   for text, ids in _prompts(body.prompt)]
        wants = body.logprobs is not None
        choices = submit_all(body, prompts, body.logprobs, body.logprobs if body.echo and wants else None)

        def echoed(c: Choice, rest: Callable[[], dict]) -> dict:
            """With echo, the prompt before the completion: its text and, with logprobs, its
            tokens (the first has none); a prompt is scored once, by its first choice."""
            if not body.echo:
                return rest()
            head = None
            if c.log is not None:
                head = c.log.part(c.prompt_ids, choices[c.index - c.index % body.n].stream.seq.prompt_logprobs)
            part = rest()
            return {**part, "text": c.prompt_text + part["text"],
                    "logprobs": merge(head, part["logprobs"]) if head else None}

        def choice_body(c: Choice, start: int, new: list[int], text: str, finished: bool) -> dict:
            seq = c.stream.seq
            logprobs = c.log.part(new, seq.logprobs[start:start + len(new)]) if c.log is not None else None
            return {"index": c.index, "text": text, "logprobs": logprobs, **finish(seq, finished)}

        return await respond(request, body, choices, "text_completion", choice_body, echoed)

    # ---- /v1/chat/completions --------------------------------------------------------------
    # Without a chat template every request is a 400, so the document leaves the route out.
    @router.post("/v1/chat/completions", include_in_schema=chat_template is not None,
                 responses=documented(ChatCompletionResponse, *generating, stream=True))
    async def chat(body: ChatCompletionRequest, request: Request):
        if chat_template is None:
            raise server.reject("validation", APIError(
                400, f"the checkpoint of '{name}' has no chat template (tokenizer_config.json 'chat_template' "
                     "or chat_template.jinja): use /v1/completions with a prompt", param="messages",
                code="no_chat_template"))
        body = checked(body)
        try:
            text = chat_template.render([{**m.model_dump(exclude_none=True), "content": m.text() or ""}
                                         for m in body.messages], body.add_generation_prompt)
        except ChatTemplateError as e:
            raise server.reject("validation", APIError(400, str(e), param="messages")) from None
        ids = await server.encode(text, "messages", add_bos=False)  # the template writes BOS if it wants one
        ids = await server.prompt_ids(None, ids, "messages")
        room = config.max_position_embeddings - len(ids)
        limit = body.max_completion_tokens or body.max_tokens
        body = body.model_copy(update={"max_tokens": limit or room})
        choices = submit_all(body, [(ids, text)], (body.top_logprobs or 0) if body.logprobs else None, None)

        def choice_body(c: Choice, start: int, new: list[int], text: str, finished: bool) -> dict:
            seq = c.stream.seq
            logprobs = chat_logprobs(pieces, seq.logprobs[start:start + len(new)]) if body.logprobs else None
            message = {"delta": {"content": text}} if body.stream else \
                {"message": {"role": "assistant", "content": text}}
            return {"index": c.index, **message, "logprobs": logprobs, **finish(seq, finished)}

        def opening(c: Choice, rest: Callable[[], dict]) -> dict:
            part = rest()
            if body.stream:
                part["delta"] = {"role": "assistant", **part["delta"]}
            return part

        obj = "chat.completion.chunk" if body.stream else "chat.completion"
        return await respond(request, body, choices, obj, choice_body, opening)

    # ---- models and tokenizer --------------------------------------------------------------
    @router.get("/v1/models", responses=documented(ModelList, *auth))
    async def models():
        def card(model_id: str, depth: int) -> dict:
            return {"id": model_id, "object": "model", "created": 0, "owned_by": "bitskip", "root": name,
                    "max_model_len": config.max_position_embeddings, "num_layers": L, "exit_layer": depth,
                    "exit_points": list(config.exit_points), "device": str(engine.backend.device),
                    "backend": engine.backend.name, "kernels": engine.backend.describe(),
                    **server.with_warnings({})}
        depths = sorted(set(config.exit_points) | {L})
        return {"object": "list", "data": [card(name, L)] + [card(f"{name}@{k}", k) for k in depths]}

    @router.post("/tokenize", responses=documented(TokenizeResponse, *TOKENIZER_ERRORS, *auth))
    async def tokenize(body: TokenizeRequest):
        depth_of(body.model)
        ids = await server.encode(body.prompt, "prompt", add_bos=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": config.max_position_embeddings}

    @router.post("/detokenize", responses=documented(DetokenizeResponse, *TOKENIZER_ERRORS, *auth))
    async def detokenize(body: DetokenizeRequest):
        depth_of(body.model)
        server.check_token_ids(body.tokens, "tokens") if body.tokens else None
        if engine.tokenizer is None:
            raise server.reject("validation", APIError(422, "tokens: this model has no tokenizer", param="tokens"))
        return {"prompt": decode(body.tokens, skip_special=False)}

    @router.get("/tokenizer_info", responses=documented(TokenizerInfo, *auth))
    async def tokenizer_info():
        special = engine.special_tokens()
        return {"tokenizer_class": "tokenizers.Tokenizer", "bos_token": special.get("bos_token"),
                "eos_token": special.get("eos_token"), "pad_token": None,
                "model_max_length": config.max_position_embeddings, "vocab_size": config.vocab_size,
                "chat_template": chat_template.source if chat_template else None}

    return router


def _prompts(prompt) -> list[tuple[str | None, list[int] | None]]:
    """OpenAI's prompt forms as (text, None) or (None, ids) pairs: a string, a list of token ids,
    a list of strings or a list of token-id lists."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise APIError(422, "prompt is empty: give a string, token ids, or a list of them", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [(None, prompt)]
    return [(p, None) if isinstance(p, str) else (None, p) for p in prompt]
