"""Schemathesis against a live `bitskip serve` (issue 14): the operations of the OpenAPI
document (those of the OpenAI routes join when their schema says their cross-field rules), every
phase that applies, with checks for server errors, status-code, response-schema
and content-type conformance, and acceptance of schema-valid data. Fixed seed, bounded examples
(a couple of minutes on 2 cores); zero failures allowed."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from models.config import preset
from models.random_checkpoint import write_random_checkpoint

from test_server_live import REPO, bitskip_serve

pytestmark = pytest.mark.timeout(600)

CHECKS = ("not_a_server_error,status_code_conformance,response_schema_conformance,"
          "content_type_conformance,positive_data_acceptance")
PHASES = "examples,coverage,fuzzing,stateful"
# The OpenAI-compatible routes (issue 15) have cross-field rules (best_of equal to n, top_logprobs
# needing logprobs, ...) their schema does not say yet; they join once it does.
OPERATIONS = "^/(generate|perplexity|v1/models|health|ready|metrics)$"
CONFIG = """
[checks.positive_data_acceptance]
# A prompt's length in tokens is known only once it is tokenized, so no JSON Schema bound can
# say it: a schema-valid prompt longer than the context gets the documented 413.
expected-statuses = ["2xx", "413"]
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "tiny-test"
    write_random_checkpoint(path, preset("tiny-test"))  # 4 layers, context 128: fast answers
    with bitskip_serve(path, path.parent / "server.log", "--api-key", "fuzz-key") as (proc, port):
        yield f"http://127.0.0.1:{port}", path.parent / "server.log"
        assert proc.poll() is None, "the server died under fuzzing"


def test_document_lists_real_responses(served):
    url, _ = served
    doc = httpx.get(f"{url}/openapi.json", headers={"Authorization": "Bearer fuzz-key"}).json()
    gen = doc["paths"]["/generate"]["post"]["responses"]
    assert set(gen) >= {"200", "400", "401", "413", "422", "429", "499", "500", "503"}
    assert set(gen["200"]["content"]) == {"application/json", "text/event-stream"}
    assert gen["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateResponse")
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    body = doc["components"]["schemas"]["GenerateRequest"]
    assert body["properties"]["token_ids"]["items"] == {"type": "integer", "minimum": 0, "maximum": 319}
    assert body["oneOf"] == [{"required": ["prompt"]}, {"required": ["token_ids"]}]


def test_schemathesis_finds_nothing(served, tmp_path):
    url, log = served
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
           f"{url}/openapi.json", "--checks", CHECKS, "--phases", PHASES, "--max-examples", "25",
           "--seed", "14", "--workers", "1", "--request-timeout", "60", "--no-color",
           "--generation-database", "none", "--include-path-regex", OPERATIONS, "-H", "Authorization: Bearer fuzz-key"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-8000:]
    assert "No issues found" in out or " passed" in out, out[-4000:]
    assert "Traceback" not in log.read_text()
