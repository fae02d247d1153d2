"""Checkpoints of the public BitSkip training code through the product: the HTTP API (warnings on
every response of a model without a causal mask, token-ids-only serving without a tokenizer),
`bitskip convert` and `bitskip perplexity` on every file form of both families, and a real
`bitskip serve --model SRC --tokenizer FILE` process."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from models.ref_import import NO_TOKENIZER_NOTE, NON_CAUSAL_WARNING, import_ref_checkpoint, load_model
from models.tokenizer import byte_level_tokenizer
from server.app import create_app
from server.cli import main
from tests.ref_fixtures import BASE_CONFIG, FORMS, KV_HEADS, random_state, stored, write_form
from tests.ref_math import RefModel

from test_server_live import bitskip_serve

pytestmark = pytest.mark.timeout(120)

# A vocabulary that holds the byte-level tokenizer (258 tokens), so text requests work.
CONFIG = dict(BASE_CONFIG, vocab_size=320)
LAYERS = CONFIG["num_hidden_layers"]
TEXT = "the cat sat on a mat."


def ref_model(sd, family: str, form: str = "model_full.pt") -> RefModel:
    return RefModel(stored(sd, form), dict(family=family, generation=1, heads=4, kv_heads=KV_HEADS, bits=8,
                                           eps=1e-5, theta=10000.0))


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    sd = random_state(CONFIG, "bitlinear")
    return write_form(tmp_path_factory.mktemp("ref-v1"), "model_full.pt", sd, CONFIG), ref_model(sd, "bitlinear")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    byte_level_tokenizer().save(str(path))
    return path


async def _api(app, calls):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=60) as client:
            return [await client.request(method, url, json=body) for method, url, body in calls]


def test_http_api_says_the_model_sees_the_future_and_serves_token_ids_only(v1):
    path, ref = v1
    app = create_app(LLMEngine(import_ref_checkpoint(path), EngineConfig()))
    prompt = [5, 17, 42, 99, 3]
    models, gen, text, score, stream = asyncio.run(_api(app, [
        ("GET", "/v1/models", None),
        ("POST", "/generate?exit_layer=2", {"token_ids": prompt, "max_tokens": 6}),
        ("POST", "/generate", {"prompt": "hello", "max_tokens": 2}),
        ("POST", "/perplexity", {"token_ids": prompt + [7, 8, 9], "exit_layers": [1, LAYERS]}),
        ("POST", "/generate", {"token_ids": prompt, "max_tokens": 3, "stream": True}),
    ]))
    warnings = [NON_CAUSAL_WARNING, NO_TOKENIZER_NOTE]
    assert models.json()["data"][0]["warnings"] == warnings
    assert gen.status_code == 200, gen.text
    assert gen.json()["token_ids"] == ref.greedy(prompt, 6, 2) and gen.json()["warnings"] == warnings
    assert gen.json()["text"] == ""
    assert text.status_code == 422 and "no tokenizer" in text.json()["error"]["message"]
    assert text.json()["error"]["param"] == "prompt"
    assert score.json()["warnings"] == warnings
    for k in (1, LAYERS):
        assert score.json()["perplexity"][str(k)] == pytest.approx(ref.perplexity(prompt + [7, 8, 9], k), rel=1e-4)
    final = json.loads(stream.text.split("\n\n")[-3].removeprefix("data: "))
    assert final["token_ids"] == ref.greedy(prompt, 3, LAYERS) and final["warnings"] == warnings
    # Every response carries the warning as a header too, errors included.
    for r in (models, gen, text, score, stream):
        assert "no causal mask" in r.headers["warning"]


@pytest.mark.parametrize("family", ["bitlinear", "hadamard"])
def test_every_form_serves_text_with_a_user_tokenizer(tmp_path, family, tokenizer_file):
    sd = random_state(CONFIG, family, seed=5)
    ids = byte_level_tokenizer().encode(TEXT, add_special_tokens=False).ids
    for form in FORMS:
        src = write_form(tmp_path / form, form, sd, CONFIG)
        app = create_app(LLMEngine(load_model(src, tokenizer_file), EngineConfig()))
        (r,) = asyncio.run(_api(app, [("POST", "/generate?exit_layer=2", {"prompt": TEXT, "max_tokens": 4})]))
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == ref_model(sd, family, form).greedy(ids, 4, 2), form
        assert r.json()["warnings"] == [NON_CAUSAL_WARNING]


@pytest.mark.parametrize("family", ["bitlinear", "hadamard"])
def test_cli_perplexity_and_convert_on_every_form(tmp_path, family, tokenizer_file, capsys):
    sd = random_state(CONFIG, family, seed=4)
    ids = byte_level_tokenizer().encode(TEXT, add_special_tokens=False).ids
    (tmp_path / "text.txt").write_text(TEXT)
    for form in FORMS:
        src = write_form(tmp_path / form, form, sd, CONFIG)
        want = ref_model(sd, family, form)
        assert main(["convert", "--from", "bitskip-ref", str(src), str(tmp_path / f"{form}-ours"),
                     "--tokenizer", str(tokenizer_file)]) == 0
        assert "NO causal mask" in capsys.readouterr().out
        for model, tok in ((src, ["--tokenizer", str(tokenizer_file)]), (tmp_path / f"{form}-ours", [])):
            assert main(["perplexity", "--model", str(model), *tok, "--exit-layers", "1,2,3", "--json",
                         str(tmp_path / "text.txt")]) == 0
            out = capsys.readouterr()
            assert NON_CAUSAL_WARNING in out.err
            got = json.loads(out.out)["perplexity"]
            for k in range(1, LAYERS + 1):
                rel = 1e-3 if form.endswith("bf16") else 1e-4
                assert got[str(k)] == pytest.approx(want.perplexity(ids, k), rel=rel), (form, model, k)


def test_cli_errors_are_one_clear_message(tmp_path, capsys):
    write_form(tmp_path, "model_full.pt", random_state(CONFIG, "bitlinear"), dict(CONFIG, hidden_size=65))
    assert main(["convert", "--from", "bitskip-ref", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot import bitskip-ref checkpoint") and "hidden_size 65" in err
    assert main(["perplexity", "--model", str(tmp_path / "nope"), str(tmp_path / "x.txt")]) == 2


def test_bitskip_serve_takes_the_training_code_checkpoint_directly(v1, tokenizer_file, tmp_path):
    path, ref = v1
    log = tmp_path / "server.log"
    with bitskip_serve(path, log, "--tokenizer", str(tokenizer_file)) as (_, port):
        url = f"http://127.0.0.1:{port}"
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert models["data"][0]["warnings"] == [NON_CAUSAL_WARNING]
        r = httpx.post(f"{url}/generate", json={"prompt": TEXT, "max_tokens": 4}, timeout=30)
        assert r.status_code == 200, r.text
        ids = byte_level_tokenizer().encode(TEXT, add_special_tokens=False).ids
        assert r.json()["token_ids"] == ref.greedy(ids, 4, LAYERS)
        assert "no causal mask" in r.headers["warning"]
    assert NON_CAUSAL_WARNING in log.read_text()
