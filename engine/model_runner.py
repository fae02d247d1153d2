"""Runs one forward over a batch of rows, each with its own depth.

Rows are ordered deepest first, so the rows still live at block l are always a prefix of the
batch and leaving it is a slice. A row never runs, and never writes KV for, a block past its
depth; the shared head is applied only at the layers a row asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from models.functional import apply_rope, attention, causal_mask, rms_norm, rope_tables, swiglu

from .kv_cache import KVCache, SequenceKV
from .weights import LayerWeights, ModelWeights

HeadRequest = Literal["last", "all"]


@dataclass
class Row:
    """One sequence's share of a forward: `tokens` at positions start, start + 1, ...

    `depth`: blocks 1..depth run. `kv`: the sequence's cache (None: attend only within `tokens`
    and cache nothing, as perplexity windows do). `heads`: exit layer -> which positions get
    logits there ("last" for sampling, "all" for scoring).
    """

    tokens: list[int]
    start: int
    depth: int
    kv: SequenceKV | None = None
    heads: dict[int, HeadRequest] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, weights: ModelWeights, kv_cache: KVCache | None = None):
        self.weights = weights
        self.config = c = weights.config
        self.kv_cache = kv_cache
        self.rope_cos, self.rope_sin = rope_tables(c.max_position_embeddings, c.head_dim, c.rope_theta)
        self.q_size = c.num_attention_heads * c.head_dim
        self.kv_size = c.num_key_value_heads * c.head_dim
        self.blocks_run = [0] * (c.num_hidden_layers + 1)  # tokens processed per block, for tests

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> list[dict[int, torch.Tensor]]:
        """Logits per row: {exit layer: [1 or len(tokens), vocab]} for each requested head."""
        c = self.config
        for r in rows:
            if not 1 <= r.depth <= c.num_hidden_layers:
                raise ValueError(f"depth {r.depth} outside 1..{c.num_hidden_layers}")
            if r.start + len(r.tokens) > c.max_position_embeddings:
                raise ValueError(f"positions up to {r.start + len(r.tokens)} exceed the context "
                                 f"{c.max_position_embeddings}")
        order = sorted(range(len(rows)), key=lambda i: -rows[i].depth)
        batch = [rows[i] for i in order]
        ends = torch.tensor([len(r.tokens) for r in batch]).cumsum(0).tolist()
        ids = torch.tensor([t for r in batch for t in r.tokens], dtype=torch.long)
        positions = torch.cat([torch.arange(r.start, r.start + len(r.tokens)) for r in batch])
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.weights.embed_tokens[ids]

        results: list[dict[int, torch.Tensor]] = [{} for _ in batch]
        live = len(batch)
        for layer in range(1, batch[0].depth + 1):
            while batch[live - 1].depth < layer:
                live -= 1
            n_tok = ends[live - 1]
            h = self._block(layer, h[:n_tok], batch[:live], ends[:live], cos[:n_tok], sin[:n_tok])
            self.blocks_run[layer] += n_tok
            self._apply_heads(layer, h, batch[:live], ends[:live], results)

        out: list[dict[int, torch.Tensor]] = [{} for _ in rows]
        for pos, i in enumerate(order):
            out[i] = results[pos]
        return out

    # ---- one block -----------------------------------------------------------------------
    def _block(self, layer: int, h: torch.Tensor, rows: list[Row], ends: list[int],
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c, w = self.config, self.weights.layers[layer - 1]
        t = h.shape[0]
        qkv = w.qkv_proj(rms_norm(h, w.input_norm, c.rms_norm_eps))
        q = apply_rope(qkv[:, :self.q_size].view(t, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rope(qkv[:, self.q_size:self.q_size + self.kv_size]
                       .view(t, c.num_key_value_heads, c.head_dim), cos, sin)
        v = qkv[:, self.q_size + self.kv_size:].reshape(t, c.num_key_value_heads, c.head_dim)
        h = h + w.o_proj(self._attend(layer, q, k, v, rows, ends))
        return h + self._mlp(w, rms_norm(h, w.post_attention_norm, c.rms_norm_eps))

    @staticmethod
    def _mlp(w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate_up = w.gate_up_proj(x)
        f = gate_up.shape[1] // 2
        return w.down_proj(swiglu(gate_up[:, :f], gate_up[:, f:]))

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rows: list[Row], ends: list[int]) -> torch.Tensor:
        """Causal attention of each row's new tokens over its cached and new keys."""
        out = torch.empty(q.shape[0], self.q_size)
        starts = [0] + ends[:-1]
        cached = [i for i, r in enumerate(rows) if r.kv is not None]
        if cached:
            self._write_kv(layer, k, v, [rows[i] for i in cached], [starts[i] for i in cached])
        decode = [i for i in cached if len(rows[i].tokens) == 1]
        if decode:  # single-token rows share one padded attention call
            lengths = torch.tensor([rows[i].start + 1 for i in decode])
            slots = self.kv_cache.slots([rows[i].kv.tables[layer - 1] for i in decode],
                                        int(lengths.max()))
            mask = (torch.arange(slots.shape[1])[None, :] < lengths[:, None])[:, None, :]
            idx = torch.tensor([starts[i] for i in decode])
            out[idx] = attention(q[idx][:, None], self.kv_cache.k[slots], self.kv_cache.v[slots],
                                 mask)[:, 0]
        for i, r in enumerate(rows):
            if r.kv is not None and len(r.tokens) == 1:
                continue
            a, b = starts[i], ends[i]
            if r.kv is None:
                keys, values, n_keys = k[a:b][None], v[a:b][None], b - a
            else:
                n_keys = r.start + (b - a)
                slots = self.kv_cache.slots([r.kv.tables[layer - 1]], n_keys)[0]
                keys, values = self.kv_cache.k[slots][None], self.kv_cache.v[slots][None]
            out[a:b] = attention(q[a:b][None], keys, values, causal_mask(b - a, n_keys))[0]
        return out

    def _write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: list[Row],
                  starts: list[int]) -> None:
        tok_idx, slot_idx = [], []
        for r, a in zip(rows, starts):
            n = len(r.tokens)
            slots = self.kv_cache.slots([r.kv.tables[layer - 1]], r.start + n)[0, r.start:]
            tok_idx.append(torch.arange(a, a + n))
            slot_idx.append(slots)
        tok = torch.cat(tok_idx)
        self.kv_cache.write(torch.cat(slot_idx), k[tok], v[tok])

    # ---- the shared head -----------------------------------------------------------------
    def _apply_heads(self, layer: int, h: torch.Tensor, rows: list[Row], ends: list[int],
                     results: list[dict[int, torch.Tensor]]) -> None:
        wanted = [(i, r.heads[layer]) for i, r in enumerate(rows) if layer in r.heads]
        if not wanted:
            return
        starts = [0] + ends[:-1]
        spans = [(starts[i], ends[i]) if kind == "all" else (ends[i] - 1, ends[i]) for i, kind in wanted]
        idx = torch.cat([torch.arange(a, b) for a, b in spans])
        logits = self.head(h[idx])
        offset = 0
        for (i, _), (a, b) in zip(wanted, spans):
            results[i][layer] = logits[offset:offset + b - a]
            offset += b - a

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(RMSNorm_final(h)): the one head every exit shares."""
        return F.linear(rms_norm(h, self.weights.norm, self.config.rms_norm_eps), self.weights.lm_head)
