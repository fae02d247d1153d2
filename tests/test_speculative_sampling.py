"""Speculative sampling (temperature > 0) draws every token from the full model's distribution:
checked statistically on a 4-token vocabulary against probabilities from the reference model."""

from __future__ import annotations

import itertools

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.speculative import SpeculativeRule, _accept_sampled
from models.checkpoint import latent_state, load_checkpoint, pack_state, save_checkpoint

from conftest import reference_model

VOCAB = 4
PROMPT = [1, 3, 0]
NEW = 4  # the first token comes from the prompt's step, then a round of 2 drafts emits up to 3


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test; cells expected below 5 are pooled."""
    n = float(observed.sum())
    expected = expected_probs.double() * n
    small = expected < 5
    obs = torch.cat([observed[~small].double(), observed[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_rejection_rule_reproduces_the_target_distribution():
    """One draft from q, then the rule: the first emitted token is distributed as p, and after an
    acceptance the second as the bonus distribution."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    bonus = torch.tensor([0.0, 0.0, 1.0, 0.0])
    logits = torch.stack([p.log(), bonus.log()]).float()  # the rule reads logits at temperature 1
    params = SamplingParams(temperature=1.0)
    first = torch.zeros(VOCAB)
    n = 5000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        tokens = _accept_sampled([d], [q], logits.__getitem__, params, gen)
        first[tokens[0]] += 1
        assert len(tokens) == 1 or tokens[1] == 2
    assert chi_square_p_value(first, p) > 1e-4
    # The same samples are far from q (what accepting every draft would give): the test has power.
    assert chi_square_p_value(first, q) < 1e-12


def tiny_vocab_checkpoint(path):
    model = reference_model("v1", seed=8, vocab_size=VOCAB)
    with torch.no_grad():  # a sharper head: exits 2 and 4 then differ by a total variation near 0.2
        model.lm_head.weight.mul_(5.0)
    tok = Tokenizer(WordLevel({str(i): i for i in range(VOCAB)}, unk_token="0"))
    save_checkpoint(path, model.config, pack_state(latent_state(model), model.config), tok)
    return model, load_checkpoint(path)


def exact_joint(model, exit_layer: int) -> torch.Tensor:
    """P(tokens 2..NEW) sampling at `exit_layer`, from the reference model: [VOCAB ** (NEW - 1)]."""
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=NEW)))
    ids = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logits = model(ids, exit_layers=[exit_layer])[exit_layer]
    logp = torch.log_softmax(logits.double(), dim=-1)[:, len(PROMPT) - 1:-1]
    joint = logp.gather(2, seqs[:, :, None])[:, :, 0].sum(1).exp()
    return joint.view(VOCAB, -1).sum(0)  # the first token comes from the prompt's full-depth step


def test_speculative_sampling_matches_the_full_model(tmp_path):
    draft_exit = 2
    model, ckpt = tiny_vocab_checkpoint(tmp_path / "ckpt")
    L = model.config.num_hidden_layers
    target, draft = exact_joint(model, L), exact_joint(model, draft_exit)
    assert abs(float(target.sum()) - 1) < 1e-9
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=256))
    rule = SpeculativeRule(draft_exit, 3)
    params = [SamplingParams(max_tokens=NEW, temperature=1.0, seed=s) for s in range(1200)]
    seqs = [engine.add_request(PROMPT, p, speculative=rule) for p in params]
    while engine.has_unfinished():
        engine.step()
    counts = torch.zeros(VOCAB ** (NEW - 1))
    for s in seqs:
        counts[sum(t * VOCAB ** (NEW - 2 - i) for i, t in enumerate(s.output_ids[1:]))] += 1
    drafted = sum(s.speculation.drafted for s in seqs)
    accepted = sum(s.speculation.accepted for s in seqs)
    assert 0 < accepted < drafted, "the test needs accepted and rejected drafts"
    assert chi_square_p_value(counts, target) > 1e-4
    assert chi_square_p_value(counts, draft) < 1e-8, "draft and target too close for the test to have power"
