"""The OpenAPI document, made to tell the truth about the loaded model.

FastAPI writes the schema from the request models, which cannot know the model's ranges. Here
the generated document gets the constraints the server enforces that JSON Schema can say: exit
layers in 1..L, token ids in 0..V-1, how many ids fit the context (or the perplexity limit),
exactly one of prompt/token_ids (text/token_ids), no fixed exit_layer with the confidence or
speculative policy, the speculative fields with that policy only, the served model names (and
the depth a NAME@K name fixes), logit_bias keys as token ids, top_logprobs only with logprobs.
What it cannot say is a documented 413 (a prompt's length in tokens, known once it is
tokenized) or, where two values must be compared (min_tokens and max_tokens, best_of and n),
said in the field's description.
"""

from __future__ import annotations

from fastapi import FastAPI


def install(app: FastAPI, num_layers: int, vocab_size: int, context: int, max_perplexity_tokens: int,
            max_draft_tokens: int, model_name: str) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)
            _constrain(doc, num_layers, vocab_size, context, max_perplexity_tokens)
            _speculative(doc, num_layers, max_draft_tokens)
            _constrain_openai(doc["components"]["schemas"], model_name, num_layers, vocab_size)
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
            if method == "post" and "HTTPValidationError" in str(responses.get("422")):  # none listed
                responses.update({status: _openapi_response(spec) for status, spec in errors.items()})
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
        _require(schemas[name], {"policy": {"enum": ["confidence", "speculative"]}},
                 {"exit_layer": {"type": "null"}})
        props["logit_bias"] = {"anyOf": [{"type": "object", "propertyNames": {"pattern": _uint_pattern(V - 1)},
                                          "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                                         {"type": "null"}], "default": None,
                               "description": "token id (digits, 0..V-1) -> bias added to its logit"}

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
    as a round (k + 1 tokens in one step) fits in the step budget, and refused with the other policies."""
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


def _require(schema: dict, when: dict, then: dict, present: bool = False) -> None:
    """A rule "if the body's `when` properties hold, its `then` properties must (and, with
    `present`, be there)": one of the schema's allOf, so that several rules stand side by side."""
    must = {"properties": then, **({"required": list(then)} if present else {})}
    schema.setdefault("allOf", []).append({"if": {"properties": when, "required": list(when)}, "then": must})


def _uint_pattern(hi: int) -> str:
    """A regex for the decimal integers 0..hi written without leading zeros."""
    s = str(hi)
    alts = ["[0-9]"] if len(s) > 1 else []
    alts += [f"[1-9][0-9]{{{k - 1}}}" for k in range(2, len(s))]
    for i, digit in enumerate(s):  # numbers as long as hi: equal to it up to i, then smaller
        low = 1 if i == 0 and len(s) > 1 else 0
        if int(digit) > low:
            alts.append(f"{s[:i]}[{low}-{int(digit) - 1}]" + "[0-9]" * (len(s) - i - 1))
    return "^(" + "|".join(alts + [s]) + ")$"


def _constrain_openai(schemas: dict, name: str, L: int, V: int) -> None:
    """The OpenAI routes' bodies: the served model names (NAME, NAME@K) and the depth a NAME@K
    fixes, token ids in range, top_logprobs only with logprobs."""
    names = [name] + [f"{name}@{k}" for k in range(1, L + 1)]
    model = {"anyOf": [{"enum": names}, {"type": "null"}], "default": None,
             "description": f"{name} (full depth) or {name}@K (exit layer K); others are a 404"}
    for schema in ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest"):
        if schema in schemas:
            schemas[schema]["properties"]["model"] = model
    for schema in ("CompletionRequest", "ChatCompletionRequest"):
        for k in range(1, L + 1) if schema in schemas else ():  # NAME@K fixes the depth: exit_layer absent or K, policy fixed
            _require(schemas[schema], {"model": {"const": f"{name}@{k}"}},
                     {"exit_layer": {"enum": [None, k]}, "policy": {"const": "fixed"}})
    if "DetokenizeRequest" in schemas:
        schemas["DetokenizeRequest"]["properties"]["tokens"] = {
            "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": V - 1}}
    if "ChatCompletionRequest" in schemas:
        _require(schemas["ChatCompletionRequest"], {"top_logprobs": {"type": "integer"}},
                 {"logprobs": {"const": True}}, present=True)
