"""The training recipe: schedule and weights as specified, loss goes down, and what `train`
writes is served by the engine with the training module's logits."""

from __future__ import annotations

import torch

from engine.model_runner import ModelRunner, Row
from engine.weights import ModelWeights
from models.checkpoint import load_checkpoint, load_reference_model
from models.config import preset
from models.model import BitSkipForCausalLM
from models.tokenizer import byte_level_tokenizer, default_generation_config
from models.train import (TokenStream, TrainConfig, early_exit_weights, layer_dropout_probs,
                          sample_layer_keep, train, training_loss)


def test_layer_dropout_is_quadratic_in_depth():
    p = layer_dropout_probs(24, 0.5)
    assert p.shape == (24,)
    for l in (1, 6, 12, 18, 24):
        assert abs(float(p[l - 1]) - 0.5 * (l / 24) ** 2) < 1e-7
    assert float(p[-1]) == 0.5 and torch.all(p[1:] > p[:-1])


def test_layer_dropout_skips_blocks_at_the_scheduled_rate():
    """Over many samples, block l is skipped with probability p_max * (l / L)^2."""
    keep = sample_layer_keep(20000, 24, 0.5, torch.Generator().manual_seed(1))
    skipped = 1 - keep.float().mean(0)
    assert torch.allclose(skipped, layer_dropout_probs(24, 0.5), atol=0.015), skipped


def test_a_skipped_block_is_the_identity_for_that_sample_only():
    torch.manual_seed(0)
    model = BitSkipForCausalLM(preset("tiny-test")).eval()
    ids = torch.randint(0, 320, (2, 7))
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 2] = False  # sample 0 skips block 3
    with torch.no_grad():
        states = model.hidden_states(ids, 4, keep)
        plain = model.hidden_states(ids, 4)
    assert torch.equal(states[3][0], states[2][0])
    assert torch.equal(states[3][1], plain[3][1])


def test_early_exit_weights_grow_with_depth_and_sum_to_one():
    w = early_exit_weights([6, 12, 18])
    assert abs(sum(w.values()) - 1) < 1e-12
    assert w[6] < w[12] < w[18]
    assert abs(w[12] - 12 / 36) < 1e-12


def test_early_exit_loss_is_main_plus_weighted_exit_terms():
    torch.manual_seed(0)
    model = BitSkipForCausalLM(preset("tiny-test")).train()
    cfg = TrainConfig(steps=10, early_exit_start=0.0, p_max=0.0, extra_exits=0, early_exit_lambda=0.3)
    batch = torch.randint(0, 320, (2, 9))
    loss, terms = training_loss(model, batch, cfg, 5, torch.Generator().manual_seed(0))
    exits = list(preset("tiny-test").exit_points)
    w = early_exit_weights(exits)
    expected = terms[4] + 0.3 * sum(w[l] * terms[l] for l in exits)
    assert abs(float(loss.detach()) - expected) < 1e-5
    # Each term is the shifted next-token cross-entropy at that exit, computed directly.
    with torch.no_grad():
        logits = model(batch[:, :-1], [2])[2]
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    assert abs(float(direct) - terms[2]) < 1e-4


def _tiny_corpus(n: int, seed: int) -> torch.Tensor:
    """A learnable stream: a repeating phrase with a little noise."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.tensor(list(b"the cat sat on the mat. "))
    ids = phrase.repeat(n // len(phrase) + 1)[:n].clone()
    flip = torch.rand(n, generator=g) < 0.02
    ids[flip] = torch.randint(0, 256, (int(flip.sum()),), generator=g)
    return ids


def test_training_lowers_the_loss_and_the_checkpoint_serves_the_same_logits(tmp_path):
    torch.manual_seed(0)
    config = preset("tiny-test")
    cfg = TrainConfig(steps=60, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, eval_every=30,
                      eval_batches=2, checkpoint_every=30, early_exit_start=0.5)
    logs = []
    packed = train(config, cfg, _tiny_corpus(4000, 0), _tiny_corpus(1000, 1), byte_level_tokenizer(),
                   default_generation_config(), tmp_path / "run", log=logs.append)
    records = [eval(line, {"null": None}) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first, last = records[0]["train_ce"]["4"], records[-1]["heldout_ce"]["4"]
    assert last < 0.6 * first, (first, last)
    # Phase 2 adds the exit terms; phase 1 has only the full-depth loss.
    assert set(records[0]["train_ce"]) == {"4"}
    assert {"1", "2", "3", "4"} <= set(records[-1]["train_ce"])

    latent = load_reference_model(load_checkpoint(tmp_path / "run" / "latent")).eval()
    runner = ModelRunner(ModelWeights.from_checkpoint(load_checkpoint(packed)))
    ids = _tiny_corpus(40, 5).tolist()
    with torch.no_grad():
        ref = latent(torch.tensor([ids]), [1, 2, 3, 4])
    out = runner.forward([Row(ids, 0, 4, None, {k: "all" for k in (1, 2, 3, 4)})])[0].logits
    for k in (1, 2, 3, 4):
        assert float((out[k] - ref[k][0]).abs().max() / ref[k][0].abs().max()) < 1e-4


def test_resume_continues_from_the_saved_step(tmp_path):
    config = preset("tiny-test")
    cfg = TrainConfig(steps=10, batch_size=4, seq_len=16, eval_every=100, checkpoint_every=5)
    args = (config, cfg, _tiny_corpus(2000, 0), _tiny_corpus(500, 1), byte_level_tokenizer(),
            default_generation_config(), tmp_path / "run")
    train(*args, log=lambda m: None)
    logs = []
    cfg2 = TrainConfig(steps=15, batch_size=4, seq_len=16, eval_every=100, checkpoint_every=5)
    train(config, cfg2, *args[2:], resume=True, log=logs.append)
    assert any("resumed" in m and "step 10" in m for m in logs)
    steps = [eval(l)["step"] for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11)) + list(range(11, 16))


def test_stream_windows_start_with_bos():
    s = TokenStream(torch.arange(100), 10, 999, 0)
    b = s.batch(3)
    assert b.shape == (3, 11) and torch.all(b[:, 0] == 999)
    assert torch.all(b[:, 2:] - b[:, 1:-1] == 1)  # contiguous windows of the stream
