"""Schemathesis hooks for tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Rules that compare two values, which JSON Schema cannot say, each a 422 documented in words:
`?exit_layer=` (fixed depth) with `"policy": "confidence"` or `"speculative"` in the body, and `min_tokens` above
`max_tokens`. Those cases are left out of generation, so positive-data acceptance still checks
every other schema-valid request."""

import schemathesis


@schemathesis.hook
def filter_case(context, case) -> bool:
    query, body = case.query or {}, case.body
    if not isinstance(body, dict):
        return True
    if query.get("exit_layer") is not None and body.get("policy") in ("confidence", "speculative"):
        return False
    if body.get("logit_bias"):  # its keys are token ids written as strings: no range in JSON Schema
        return False
    min_tokens, max_tokens = body.get("min_tokens"), body.get("max_tokens", 16)
    return not (isinstance(min_tokens, (int, float)) and isinstance(max_tokens, (int, float))
                and min_tokens > max_tokens)
