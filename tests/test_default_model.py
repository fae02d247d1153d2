"""The bundled default model: ships packed inside models/, is what `bitskip serve` serves, is a
trained model (not noise), and its early exits mean what they mean in the paper."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.perplexity import perplexity
from models.checkpoint import load_checkpoint
from models.default_model import BUNDLED, resolve_model

SAMPLE = BUNDLED / "heldout_sample.txt"  # held-out text (Persuasion), never trained on


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(load_checkpoint(BUNDLED), EngineConfig(max_num_seqs=2))


def test_bundled_model_is_packed_small_and_served_by_default():
    ckpt = load_checkpoint(BUNDLED)
    assert ckpt.form == "packed"
    assert ckpt.config.num_hidden_layers == 24 and ckpt.config.exit_points == (6, 12, 18)
    size = sum(f.stat().st_size for f in Path(BUNDLED).iterdir())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB"
    assert resolve_model(None) == BUNDLED


def test_held_out_perplexity_is_that_of_a_trained_model(engine):
    ids = engine.encode(SAMPLE.read_text())
    result = perplexity(engine.runner, ids, [6, 12, 18, 24])
    ppl = result.perplexity
    vocab = engine.model_config.vocab_size
    # A model that learnt nothing scores about the vocabulary size (4096); ours is far below it,
    # and deeper exits are better than exit 6.
    assert ppl[24] < vocab / 10, ppl
    assert ppl[18] < 1.15 * ppl[24], ppl
    assert ppl[6] > ppl[18], ppl


def test_generates_words_at_exit_18_and_24(engine):
    prompt = engine.encode("It was a truth universally acknowledged that")
    for k in (18, 24):
        seq = engine.generate([prompt], SamplingParams(max_tokens=24), k)[0]
        words = seq.text.split()
        assert len(words) >= 3, seq.text
        letters = sum(ch.isalpha() or ch.isspace() for ch in seq.text)
        assert letters >= 0.8 * len(seq.text), seq.text
