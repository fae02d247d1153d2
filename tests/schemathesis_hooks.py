"""Schemathesis hooks for tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

One rule the server enforces spans two locations, which JSON Schema cannot say: `?exit_layer=`
(fixed depth) with `"policy": "confidence"` in the body is a 422 (documented in the parameter's
description). Those cases are left out of generation, so positive-data acceptance still checks
every other schema-valid request."""

import schemathesis


@schemathesis.hook
def filter_case(context, case) -> bool:
    query, body = case.query or {}, case.body
    return not (query.get("exit_layer") is not None and isinstance(body, dict)
                and body.get("policy") == "confidence")
