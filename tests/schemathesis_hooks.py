"""Schemathesis hooks for tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Some rules compare two values, which JSON Schema cannot say; each is a 422 that the field's
description in the document states:
  - `?exit_layer=` (/generate, a fixed depth) with `"policy": "confidence"` or `"speculative"` in the
    body;
  - `min_tokens` above `max_tokens` (on chat without a limit, above the room left in the context,
    known only once the prompt is tokenized);
  - `best_of` other than `n` (/v1/completions);
  - `max_tokens` and `max_completion_tokens` both given and different (/v1/chat/completions).
A schema-valid case that breaks one of them is made to keep it (the smallest change: the query
parameter dropped, or the second value set to agree with the first), so it is still sent and
every check still applies to it, positive-data acceptance included. Negative cases are left as
generated: the server must refuse them, and every check applies to them too.
"""

import schemathesis

CHAT_ROOM = 1  # chat without max_tokens: min_tokens within what any prompt leaves of the context


def number(value) -> bool:
    """A JSON number (integers may come as 7.0)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@schemathesis.hook
def map_case(context, case):
    body = case.body
    if case.meta is None or case.meta.generation.mode.is_negative or not isinstance(body, dict):
        return case
    if (case.query or {}).get("exit_layer") is not None and body.get("policy") in ("confidence", "speculative"):
        case.query = {k: v for k, v in case.query.items() if k != "exit_layer"}
    if number(body.get("best_of")) and body["best_of"] != body.get("n", 1):
        body["best_of"] = body.get("n", 1)
    chat = "messages" in body
    if chat and body.get("max_tokens") and body.get("max_completion_tokens"):
        body["max_completion_tokens"] = body["max_tokens"]
    limit = (body.get("max_tokens") or body.get("max_completion_tokens") or CHAT_ROOM) if chat \
        else body.get("max_tokens", 16)
    if number(body.get("min_tokens")) and number(limit) and body["min_tokens"] > limit:
        body["min_tokens"] = limit
    return case
