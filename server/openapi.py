"""The OpenAPI document, made to tell the truth about the loaded model.

FastAPI writes the schema from the request models, which cannot know the model's ranges. Here
the generated document gets the constraints the server enforces that JSON Schema can say: exit
layers in 1..L, token ids in 0..V-1, how many ids fit the context (or the perplexity limit),
exactly one of prompt/token_ids (text/token_ids), no fixed exit_layer with the confidence or
speculative policy, and the speculative fields with that policy only. What it cannot say (a prompt's length in tokens, before it is tokenized) is a
documented 413.
"""

from __future__ import annotations

from fastapi import FastAPI


def install(app: FastAPI, num_layers: int, vocab_size: int, context: int, max_perplexity_tokens: int,
            max_draft_tokens: int) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)
            _constrain(doc, num_layers, vocab_size, context, max_perplexity_tokens)
            _speculative(doc, num_layers, max_draft_tokens)
            app.openapi_schema = doc
        return app.openapi_schema
    app.openapi = openapi


# pydantic writes a bound on `Annotated[int, validator] | None` under its Python name
_JSON_SCHEMA_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _standard_bounds(node) -> None:
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            for py, js in _JSON_SCHEMA_BOUNDS.items():
                if py in node:
                    node[js] = node.pop(py)
        for value in node.values():
            _standard_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _standard_bounds(value)


def _errors_everywhere(doc: dict) -> None:
    """Routes that do not list their errors (FastAPI's default 422 says `detail`) get the error
    object for every status a request that runs the model can be answered with."""
    from .responses import REQUEST_ERRORS, documented
    errors = {str(k): v for k, v in documented(None, *REQUEST_ERRORS).items() if k != 200}
    for ops in doc["paths"].values():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            if method == "post":
                for status, spec in errors.items():
                    if status not in responses or "HTTPValidationError" in str(responses[status]):
                        responses[status] = _openapi_response(spec)
    doc["components"]["schemas"].pop("HTTPValidationError", None)
    doc["components"]["schemas"].pop("ValidationError", None)


def _openapi_response(spec: dict) -> dict:
    return {"description": spec["description"],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def _constrain(doc: dict, L: int, V: int, context: int, max_score: int) -> None:
    _standard_bounds(doc)
    _errors_everywhere(doc)
    schemas = doc["components"]["schemas"]
    layer = {"type": "integer", "minimum": 1, "maximum": L}
    token = {"type": "integer", "minimum": 0, "maximum": V - 1}

    def ids(min_items: int, max_items: int) -> dict:
        return {"type": "array", "items": token, "minItems": min_items, "maxItems": max_items}

    for name in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        if name not in schemas:
            continue
        props = schemas[name]["properties"]
        props["exit_layer"] = {"anyOf": [layer, {"type": "null"}], "default": None}
        props["min_exit_layer"] = {**layer, "default": 1}
        if "stop_token_ids" in props:
            props["stop_token_ids"] = {"anyOf": [{"type": "array", "items": token}, {"type": "null"}], "default": None}
        if "exit_points" in props:  # the confidence policy's exits: below the full depth
            props["exit_points"] = {"anyOf": [{"type": "array", "items": {**layer, "maximum": L - 1}},
                                              {"type": "null"}], "default": None}
        # the confidence and speculative policies pick each token's depth: a fixed exit_layer is
        # refused with them
        schemas[name]["if"] = {"properties": {"policy": {"enum": ["confidence", "speculative"]}},
                               "required": ["policy"]}
        schemas[name]["then"] = {"properties": {"exit_layer": {"type": "null"}}}

    gen = schemas["GenerateRequest"]
    gen["properties"]["prompt"] = {"type": "string"}
    gen["properties"]["token_ids"] = ids(1, context - 1)
    gen["oneOf"] = [{"required": ["prompt"]}, {"required": ["token_ids"]}]

    one_prompt = {"anyOf": [
        {"type": "string"},
        ids(1, context - 1),
        {"type": "array", "items": {"anyOf": [{"type": "string"}, ids(1, context - 1)]}, "minItems": 1}],
        "description": "a prompt (text or token ids) or a batch of them"}
    schemas["CompletionRequest"]["properties"]["prompt"] = one_prompt

    ppl = schemas["PerplexityRequest"]
    ppl["properties"]["text"] = {"type": "string", "minLength": 1}
    ppl["properties"]["token_ids"] = ids(2, max_score)
    ppl["properties"]["exit_layers"] = {"anyOf": [{"type": "array", "items": layer}, {"type": "null"}],
                                        "default": None}
    ppl["oneOf"] = [{"required": ["text"]}, {"required": ["token_ids"]}]

    for path in ("/generate",):
        for param in doc["paths"][path]["post"].get("parameters", []):
            if param["name"] == "exit_layer":
                param["schema"] = {"anyOf": [layer, {"type": "null"}], "description": param.get("description")}


SPECULATIVE_FIELDS = ("draft_exit_layer", "num_draft_tokens", "draft_confidence")


def _speculative(doc: dict, L: int, max_draft_tokens: int) -> None:
    """The speculative policy's fields: a draft exit below the full depth, at most as many drafts
    as a verify step fits in the step budget, and refused with the other policies."""
    schemas = doc["components"]["schemas"]
    for name in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        if name not in schemas or "draft_exit_layer" not in schemas[name]["properties"]:
            continue
        props = schemas[name]["properties"]
        props["draft_exit_layer"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": L - 1},
                                               {"type": "null"}], "default": None}
        props["num_draft_tokens"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": max_draft_tokens},
                                               {"type": "null"}], "default": None}
        others = {"not": {"properties": {"policy": {"const": "speculative"}}, "required": ["policy"]}}
        schemas[name]["allOf"] = schemas[name].get("allOf", []) + [
            {"if": others, "then": {"properties": {f: {"type": "null"} for f in SPECULATIVE_FIELDS}}}]
