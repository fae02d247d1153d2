"""The packed engine computes the reference model's numbers: identical integer accumulations in
every projection, logits within 1e-4 at every exit layer, with or without a KV cache."""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache, SequenceKV
from engine.model_runner import ModelRunner, Row
from engine.weights import ModelWeights


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Recorder:
    """Wraps a projection and keeps every output it returns."""

    def __init__(self, proj):
        self.proj, self.outputs = proj, []

    def __call__(self, x):
        y = self.proj(x)
        self.outputs.append(y)
        return y

    def __getattr__(self, name):
        return getattr(self.proj, name)


def record_engine(runner: ModelRunner) -> list[dict[str, Recorder]]:
    recs = []
    for w in runner.weights.layers:
        r = {n: Recorder(getattr(w, n)) for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
        for n, rec in r.items():
            setattr(w, n, rec)
        recs.append(r)
    return recs


def record_reference(model) -> dict[str, list[torch.Tensor]]:
    outputs: dict[str, list[torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if name.endswith("_proj") and name.startswith("model.layers"):
            mod.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, []).append(o))
    return outputs


def test_engine_projections_and_logits_equal_reference_at_every_exit(tiny):
    model, ckpt = tiny
    c = model.config
    L = c.num_hidden_layers
    runner = ModelRunner(ModelWeights.from_checkpoint(ckpt))
    eng = record_engine(runner)
    ref = record_reference(model)
    ids = torch.randint(0, c.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = model(ids, range(1, L + 1))
    out = runner.forward([Row(ids[0].tolist(), 0, L, None, {k: "all" for k in range(1, L + 1)})])[0].logits
    for k in range(1, L + 1):
        assert rel_err(out[k], ref_logits[k][0]) < 1e-4, k
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    f = c.intermediate_size
    for i in range(L):
        p = f"model.layers.{i}"
        qkv = eng[i]["qkv_proj"].outputs[0]
        gate_up = eng[i]["gate_up_proj"].outputs[0]
        # Same integer dot products and the same scales give bit-identical outputs.
        pairs = [(qkv[:, :q], "self_attn.q_proj"), (qkv[:, q:q + kv], "self_attn.k_proj"),
                 (qkv[:, q + kv:], "self_attn.v_proj"), (eng[i]["o_proj"].outputs[0], "self_attn.o_proj"),
                 (gate_up[:, :f], "mlp.gate_proj"), (gate_up[:, f:], "mlp.up_proj"),
                 (eng[i]["down_proj"].outputs[0], "mlp.down_proj")]
        for got, name in pairs:
            assert torch.equal(got, ref[f"{p}.{name}"][0][0]), f"{p}.{name}"


def test_integer_accumulation_is_exact_int32(tiny):
    _, ckpt = tiny
    proj = ModelWeights.from_checkpoint(ckpt).layers[0].gate_up_proj
    codes = torch.randint(-127, 128, (5, proj.in_features), dtype=torch.int8)
    expected = codes.long() @ proj.weight.long().t()
    assert torch.equal(proj.accumulate(codes).long(), expected)


def cached_decode_logits(runner, ids, exit_layer, chunks):
    """Feed `ids` through the cache in the given chunk sizes; logits after each chunk."""
    kv = SequenceKV()
    runner.kv_cache.reserve(kv, exit_layer, len(ids))
    out, pos = [], 0
    for n in chunks:
        res = runner.forward([Row(ids[pos:pos + n], pos, exit_layer, kv, {exit_layer: "last"})])[0].logits
        out.append(res[exit_layer][-1])
        pos += n
    return out


def test_kv_cached_decoding_equals_full_recomputation(tiny):
    model, ckpt = tiny
    c = model.config
    weights = ModelWeights.from_checkpoint(ckpt)
    runner = ModelRunner(weights, KVCache(64, 4, c.num_key_value_heads, c.head_dim))
    fresh = ModelRunner(weights)
    ids = torch.randint(0, c.vocab_size, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    for exit_layer in (2, c.num_hidden_layers):
        chunks = [7, 5] + [1] * 18  # chunked prefill, then one token at a time
        got = cached_decode_logits(runner, ids, exit_layer, chunks)
        ends = torch.tensor(chunks).cumsum(0).tolist()
        for logits, end in zip(got, ends):
            full = fresh.forward([Row(ids[:end], 0, exit_layer, None, {exit_layer: "last"})])[0].logits
            assert rel_err(logits, full[exit_layer][-1]) < 1e-5
            assert torch.equal(logits.argmax(), full[exit_layer][-1].argmax())


def test_batched_rows_equal_rows_alone(tiny_v1):
    model, ckpt = tiny_v1
    c = model.config
    runner = ModelRunner(ModelWeights.from_checkpoint(ckpt))
    gen = torch.Generator().manual_seed(3)
    rows = [Row(torch.randint(0, c.vocab_size, (n,), generator=gen).tolist(), 0, k, None, {k: "last"})
            for n, k in [(5, 4), (9, 1), (3, 3), (12, 2), (1, 4)]]
    together = runner.forward(rows)
    for row, out in zip(rows, together):
        alone = runner.forward([row])[0].logits
        assert rel_err(out.logits[row.depth], alone[row.depth]) < 1e-5
