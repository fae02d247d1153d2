"""Runs one forward over a batch of rows, each with its own depth.

A row is one sequence's share of a step. A fixed row runs blocks 1..depth; a confidence row
checks the shared head at exit points and leaves at the first confident one. Either way a row
never runs, and never writes KV for, a block past the layer it leaves at.

Deferred KV fills: a confidence row may carry `pending` tokens, earlier tokens of its sequence
that exited below L and so have no KV above their depth. Token t joins the row at block
depth_t + 1, as an extra row in position order, so that when the new token reaches a block, every
earlier position has its keys and values there: the cache always equals what full-depth
processing of the same tokens would have written. A speculative round uses the same mechanism:
its drafted tokens stop at the draft exit (`keep_states`), and the verifying row carries them as
pending tokens that join at the block after it.
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from typing import Literal

import torch

import torch.nn.functional as F

from models.functional import activation, apply_rope, gated_activation, layer_norm, rope_tables

from .decode_graphs import DecodeGraphs
from .exit_policy import ConfidenceRule
from .kernels.native import library
from .kernels.native.block import decode_blocks
from .kernels.native.draft_loop import GreedyDrafts, GreedyRound
from .kernels.native.head_step import NativeHead
from .kv_cache import KVCache, SequenceKV
from .lean_decode import LeanDecode
from .weights import LayerWeights, ModelWeights, Norm

HeadRequest = Literal["last", "all"]


@dataclass
class Pending:
    """Earlier tokens (positions start - m .. start - 1) whose KV stops at `depths` (< L,
    non-increasing), with their hidden states after their last block."""

    hidden: torch.Tensor  # [m, hidden]
    depths: list[int]


@dataclass
class Row:
    """`tokens` at positions start, start + 1, ... (`kv` None: attend only within `tokens` and
    cache nothing, as perplexity windows do). `heads`: exit layer -> which positions get logits
    ("last" for sampling, "all" for every token that ran the block, pending ones included). With
    `confidence` (and a head wanted at `depth`), the row leaves at the first exit point where the
    rule accepts the last token's logits, else at `depth`. Confidence rows, and rows with
    `keep_states`, say in their result which of their tokens stop below L (`RowResult.pending`).
    `argmax_only`: the caller reads nothing of the row's logits but each position's argmax (greedy
    tokens, nothing adjusted or recorded): they may be -inf wherever that cannot be the argmax."""

    tokens: list[int]
    start: int
    depth: int
    kv: SequenceKV | None = None
    heads: dict[int, HeadRequest] = field(default_factory=dict)
    confidence: ConfidenceRule | None = None
    pending: Pending | None = None
    keep_states: bool = False
    argmax_only: bool = False


@dataclass
class RowResult:
    logits: dict[int, torch.Tensor]   # exit layer -> [1 or n, vocab]
    exit_layer: int                   # the block the row left after
    pending: Pending | None = None    # confidence and keep_states rows: tokens now stopping below L
    token: int | None = None          # argmax_only rows of a decode step: the argmax, and no logits


@dataclass
class _Live:
    """A row inside the forward: its token states and which of them run the current block."""

    row: Row
    index: int
    joins: list[int]                 # block at which each token (pending, then new) starts
    states: torch.Tensor             # hidden state of each token as of the last layout change
    first: int                       # tokens [first:] run the current block ...
    a: int = 0                       # ... as rows h[a:b] of the batch
    b: int = 0

    def current(self, h: torch.Tensor) -> torch.Tensor:
        """Every token's latest hidden state: those waiting to join, then those running."""
        return torch.cat([self.states[:self.first], h[self.a:self.b]]) if self.first else h[self.a:self.b]

    @property
    def num_pending(self) -> int:
        return len(self.joins) - len(self.row.tokens)

    @property
    def positions_start(self) -> int:
        """Position of the first token that runs the current block."""
        return self.row.start - self.num_pending + self.first


@dataclass
class _Span:
    """Where one row's running tokens sit in the batch: h[a:b] at positions start.. in `kv`."""

    a: int
    b: int
    start: int
    kv: SequenceKV | None


@dataclass
class _Layout:
    """What the blocks need to know about the running tokens; rebuilt only when they change."""

    spans: list[_Span]
    cos: torch.Tensor
    sin: torch.Tensor
    decode: list[_Span]       # single-token cached rows: one batched attention call
    decode_idx: torch.Tensor
    decode_len: torch.Tensor
    pending_tokens: int       # running tokens that fill KV for earlier, early-exited tokens
    # The lean step (every row short and cached, nothing pending, native blocks built): each
    # token's position and, per layer, its cache blocks [layers, tokens, width].
    native_positions: torch.Tensor | None = None
    native_tables: torch.Tensor | None = None
    static: DecodeGraphs | None = None  # a decode step in static buffers: they attend


class ModelRunner:
    """One runner for every backend: `weights.backend` decides where tensors live and which
    kernels run; the control flow here is the same on each."""

    # Native blocks take rows of up to this many tokens of one sequence (decode steps, verified
    # drafts, short prompt chunks); longer prompt chunks take the general path, whose attention is
    # batched matmuls (the native block attends row after row on one thread).
    NATIVE_SPAN = 16

    def __init__(self, weights: ModelWeights, kv_cache: KVCache | None = None,
                 max_decode_rows: int = 32, cuda_graphs: bool = True):
        """Backends with `static_decode` run plain decode steps from static buffers of up to
        `max_decode_rows` rows (engine/decode_graphs.py), as CUDA graphs when `cuda_graphs`."""
        self.weights = weights
        self.backend = weights.backend
        self.device = weights.backend.device
        self.config = c = weights.config
        if kv_cache is not None and kv_cache.device != self.device:
            raise ValueError(f"the KV cache is on {kv_cache.device}, the weights on {self.device}")
        self.kv_cache = kv_cache
        # Tabulated on the CPU (float64 cos/sin are not bit-identical across devices), then moved.
        cos, sin = rope_tables(c.max_position_embeddings, c.head_dim, c.rope_theta, device="cpu")
        self.rope_cos, self.rope_sin = cos.to(self.device), sin.to(self.device)
        self.q_size = c.num_attention_heads * c.head_dim
        self.kv_size = c.num_key_value_heads * c.head_dim
        self.blocks_run = [0] * (c.num_hidden_layers + 1)  # token-blocks computed per block
        self.deferred_fills = 0                             # token-blocks computed for pending tokens
        # Native calls over stretches of blocks for cached rows; None (general path) without the native
        # kernel or for architecture options it does not cover.
        self.native_blocks = decode_blocks(c, weights.layers) \
            if kv_cache is not None and kv_cache.k.dtype == torch.float32 else None
        self._tables: dict[tuple[int, int, int], torch.Tensor] = {}  # _sequence_tables
        self._tables_version = -1
        if hasattr(self.backend, "prepare_head") and weights.norm.bias is None:
            self.backend.prepare_head(weights.lm_head)  # for argmax_only rows
        # The head from the hidden states in one native call (final norm, product, argmax) on the
        # CPU backend with the native kernels; None: the backend's head.
        self.native_head = None
        if hasattr(self.backend, "screened_head") and library() is not None and weights.norm.bias is None \
                and weights.lm_head.dtype == torch.float32 and weights.lm_head.is_contiguous():
            self.native_head = NativeHead(library(), weights.norm.weight, weights.norm.eps, weights.lm_head,
                                          self.backend.screened_head(weights.lm_head))
        # A speculative round's greedy drafts in one native call (engine/kernels/native/draft_loop.py).
        self.native_drafts = None
        if self.native_blocks is not None and weights.norm.bias is None and weights.embed_positions is None \
                and all(t.dtype == torch.float32 and t.is_contiguous() for t in (weights.embed_tokens, weights.lm_head)):
            screened = getattr(self.backend, "screened_head", lambda _: None)(weights.lm_head)
            self.native_drafts = GreedyDrafts(self.native_blocks, weights.embed_tokens, weights.norm.weight,
                                              weights.norm.eps, weights.lm_head, screened)
        # Decode steps through the native blocks and head with little Python (engine/lean_decode.py).
        self.lean_decode = LeanDecode(self) if self.native_blocks is not None and self.native_head is not None \
            and weights.embed_positions is None and weights.embed_tokens.dtype == torch.float32 \
            and weights.embed_tokens.is_contiguous() else None
        self.decode_graphs = None
        if getattr(self.backend, "static_decode", False) and kv_cache is not None and c.causal \
                and weights.embed_positions is None:
            self.decode_graphs = DecodeGraphs(self, max_decode_rows, cuda_graphs)

    def forward(self, rows: list[Row]) -> list[RowResult]:
        c = self.config
        for r in rows:
            if not 1 <= r.depth <= c.num_hidden_layers:
                raise ValueError(f"depth {r.depth} outside 1..{c.num_hidden_layers}")
            if r.start + len(r.tokens) > c.max_position_embeddings:
                raise ValueError(f"positions up to {r.start + len(r.tokens)} exceed the context "
                                 f"{c.max_position_embeddings}")
        if self.lean_decode is not None and self.native_blocks is not None and self.lean_decode.accepts(rows):
            return self.lean_decode.run(rows)  # native calls only: no autograd to switch off
        return self._forward(rows)

    @torch.inference_mode()
    def _forward(self, rows: list[Row]) -> list[RowResult]:
        if self.decode_graphs is not None and self.decode_graphs.accepts(rows):
            return self.decode_graphs.run(rows)
        ids = torch.tensor([t for r in rows for t in r.tokens], dtype=torch.long, device=self.device)
        embedded = self.weights.embed_tokens[ids]
        if self.weights.embed_positions is not None:  # learned absolute positions, added
            embedded = embedded + self.weights.embed_positions[torch.cat(
                [torch.arange(r.start, r.start + len(r.tokens), device=self.device) for r in rows])]
        live, offset = [], 0
        for i, r in enumerate(rows):
            states = embedded[offset:offset + len(r.tokens)]
            offset += len(r.tokens)
            joins = [1] * len(r.tokens)
            if r.pending is not None:
                joins = [d + 1 for d in r.pending.depths] + joins
                states = torch.cat([r.pending.hidden, states])
            live.append(_Live(r, i, joins, states, len(joins)))
        results: list[RowResult | None] = [None] * len(rows)

        h = None  # hidden states of the running tokens, row after row; rebuilt only when they change
        layer = 1
        while live:
            joining = any(lv.first > 0 and lv.joins[lv.first - 1] <= layer for lv in live)
            if h is None or joining:
                if h is not None:
                    for lv in live:
                        lv.states = lv.current(h)
                for lv in live:  # pending tokens whose turn has come join, in position order
                    while lv.first > 0 and lv.joins[lv.first - 1] <= layer:
                        lv.first -= 1
                h = torch.cat([lv.states[lv.first:] for lv in live])
                layout = self._layout(live)
            if layout.native_tables is not None:  # native: through to the next exit event at once
                last = self._next_event(layer, live)
                cache = self.kv_cache
                h = self.native_blocks(layer, last, h.contiguous(), layout.native_positions,
                                       layout.native_tables, cache.block_size, cache.k, cache.v,
                                       self.rope_cos, self.rope_sin)
            else:
                last = layer
                h = self._block(layer, h, layout)
            for done in range(layer, last + 1):
                self.blocks_run[done] += h.shape[0]
            self.deferred_fills += layout.pending_tokens
            going_on = self._exits(last, h, live, results)
            if len(going_on) != len(live):
                for lv in going_on:
                    lv.states = lv.current(h)
                h = None
            live, layer = going_on, last + 1
        return results

    def _next_event(self, layer: int, live: list[_Live]) -> int:
        """The first block from `layer` on after which a row leaves, wants logits, checks its
        confidence, or before which pending tokens join: the blocks up to it run without a stop."""
        last = min(lv.row.depth for lv in live)
        for lv in live:
            r = lv.row
            if lv.first:  # pending tokens join at the next block: the layout changes there
                last = min(last, lv.joins[lv.first - 1] - 1)
            last = min([last] + [k for k in r.heads if k >= layer])
            if r.confidence is not None and r.heads:
                last = min([last] + [k for k in r.confidence.exit_points if k >= max(layer, r.confidence.min_exit_layer)])
        return last

    @torch.inference_mode()
    def greedy_drafts(self, kvs: list[SequenceKV], tokens: list[int], starts: list[int], depth: int,
                      m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy drafts (`native_drafts`): each sequence's token at its start runs blocks
        1..depth, the head at depth proposes the next token, which runs next, m times, writing KV
        at positions start..start + m - 1 of layers 1..depth. Returns the drafts long [n, m] and
        the layer-depth states [n, m, hidden] of the tokens they came from (for the verify)."""
        cache = self.kv_cache
        out = self.native_drafts(depth, m, tokens, starts, self._round_tables(kvs, starts, depth, m), cache.block_size,
                                 cache.k, cache.v, self.rope_cos, self.rope_sin)
        for layer in range(1, depth + 1):
            self.blocks_run[layer] += m * len(kvs)
        return out

    @torch.inference_mode()
    def greedy_rounds(self, kvs: list[SequenceKV], tokens: list[int], starts: list[int], depth: int, layers: int,
                      m: int) -> list[GreedyRound]:
        """Whole greedy rounds (`native_drafts.round`): drafts through blocks 1..depth as
        greedy_drafts makes them, verified through blocks depth+1..layers, with room for m drafts:
        KV written at every layer for positions start..start + m. Returns each sequence's round:
        the full model's greedy tokens after x0 (its kept drafts and own next tokens), and each
        verify's (drafts read, drafts kept)."""
        cache = self.kv_cache
        rounds, ran = self.native_drafts.round(
            depth, layers, m, tokens, starts, self._round_tables(kvs, starts, layers, m + 1), cache.block_size,
            cache.k, cache.v, self.rope_cos, self.rope_sin)
        for layer in range(1, layers + 1):
            self.blocks_run[layer] += ran[layer - 1]
        return rounds

    def _round_tables(self, kvs: list[SequenceKV], starts: list[int], depth: int, positions: int) -> torch.Tensor:
        """Each sequence's cache blocks of layers 1..depth, long [depth, n, width], for `positions`
        positions from its start."""
        width = -(-max(s + positions for s in starts) // self.kv_cache.block_size)
        if len(kvs) == 1:  # [depth, width] viewed as [depth, 1, width]: contiguous already
            return self._sequence_tables(kvs[0], depth, width)[:, None]
        return torch.stack([self._sequence_tables(kv, depth, width) for kv in kvs], 1)

    # ---- leaving the batch -----------------------------------------------------------------
    def _exits(self, layer: int, h: torch.Tensor, live: list[_Live],
               results: list[RowResult | None]) -> list[_Live]:
        """Apply the heads wanted at this layer; return the rows that go on to the next block."""
        checks = [lv for lv in live if lv.row.confidence is not None and lv.row.heads
                  and layer < lv.row.depth and lv.row.confidence.checks(layer)]
        leaving = {lv.index for lv in live if layer == lv.row.depth}
        confident = set()
        if checks:
            logits = self.head(h[torch.tensor([lv.b - 1 for lv in checks], device=self.device)])
            for lv, row_logits in zip(checks, logits):
                if lv.row.confidence.accepts(row_logits):
                    confident.add(lv.index)
                    results[lv.index] = RowResult({layer: row_logits[None]}, layer)
        leaving |= confident
        wanted = [lv for lv in live if layer in lv.row.heads and lv.index not in confident]
        for argmax_only in (False, True):
            group = [lv for lv in wanted if lv.row.argmax_only == argmax_only]
            if not group:
                continue
            # The row's own tokens are the last ones and always running: the last is h[b - 1].
            spans = [(lv.a if lv.row.heads[layer] == "all" else lv.b - 1, lv.b) for lv in group]
            logits = self.head(torch.cat([h[a:b] for a, b in spans]), argmax_only)
            offset = 0
            for lv, (a, b) in zip(group, spans):
                res = results[lv.index] = results[lv.index] or RowResult({}, layer)
                res.logits[layer] = logits[offset:offset + b - a]
                offset += b - a
        for lv in live:
            if lv.index in leaving:
                res = results[lv.index] = results[lv.index] or RowResult({}, layer)
                res.exit_layer = layer
                if lv.row.confidence is not None or lv.row.keep_states:
                    res.pending = self._pending_after(lv, lv.current(h), layer)
        return [lv for lv in live if lv.index not in leaving]

    def _pending_after(self, lv: _Live, states: torch.Tensor, layer: int) -> Pending | None:
        """The row's tokens that now stop below L: their depth and last hidden state."""
        depths = [layer if i >= lv.first else j - 1 for i, j in enumerate(lv.joins)]
        keep = [i for i, d in enumerate(depths) if d < self.config.num_hidden_layers]
        if not keep:
            return None
        return Pending(states[keep[0]:].clone(), depths[keep[0]:])

    # ---- one block -----------------------------------------------------------------------
    def _layout(self, live: list[_Live]) -> _Layout:
        spans, offset = [], 0
        for lv in live:
            lv.a, lv.b = offset, offset + len(lv.joins) - lv.first
            spans.append(_Span(lv.a, lv.b, lv.positions_start, lv.row.kv))
            offset = lv.b
        positions = torch.tensor([p for sp in spans for p in range(sp.start, sp.start + sp.b - sp.a)],
                                 dtype=torch.long, device=self.device)
        pending = sum(max(0, lv.num_pending - lv.first) for lv in live if lv.row.confidence)
        # The native blocks compute cached tokens one after another, each writing its KV before it
        # attends: short rows, and a speculative verify's drafted tokens (pending, in position
        # order, joined after the draft exit), qualify.
        if self.native_blocks is not None and not pending and all(
                sp.kv is not None and (sp.b - sp.a <= self.NATIVE_SPAN or (lv.num_pending and not lv.row.confidence))
                for sp, lv in zip(spans, live)):
            return _Layout(spans, None, None, [], None, None, 0, positions,
                           self._all_block_tables(spans, max(lv.row.depth for lv in live)))
        decode = [sp for sp in spans if sp.kv is not None and sp.b - sp.a == 1]
        return _Layout(spans, self.rope_cos[positions], self.rope_sin[positions], decode,
                       torch.tensor([sp.a for sp in decode], dtype=torch.long, device=self.device),
                       torch.tensor([sp.start + 1 for sp in decode], dtype=torch.long, device=self.device),
                       pending)

    def _all_block_tables(self, spans: list[_Span], depth: int) -> torch.Tensor:
        """Every layer's cache blocks of each running token, long [depth, tokens, width] (a
        sequence's tokens share its tables), built once per layout (a row that leaves earlier has
        no blocks past its depth: padded, never read)."""
        width = -(-max(sp.start + sp.b - sp.a for sp in spans) // self.kv_cache.block_size)
        tables = [self._sequence_tables(sp.kv, depth, width) for sp in spans]
        counts = [sp.b - sp.a for sp in spans]
        if len(spans) == 1:
            return tables[0][:, None].expand(depth, counts[0], width).contiguous()
        tables = torch.stack(tables, 1)
        return tables if max(counts) == 1 else tables.repeat_interleave(torch.tensor(counts), 1)

    def _sequence_tables(self, kv: SequenceKV, depth: int, width: int) -> torch.Tensor:
        """One sequence's blocks [depth, width] (zero-padded), kept while the cache's tables stay
        as they are: a decode step, or a speculative round's drafts and verify, reuses them."""
        cache = self.kv_cache
        if self._tables_version != cache.version:
            self._tables.clear()
            self._tables_version = cache.version
        key = (id(kv), depth, width)
        if key not in self._tables:  # filled as a flat int64 array: ~2.5x quicker than torch.tensor of lists
            flat = array.array("q", bytes(8 * depth * width))
            for i, table in enumerate(kv.tables[:depth]):
                n = min(len(table), width)
                flat[i * width:i * width + n] = array.array("q", table[:n])
            self._tables[key] = torch.frombuffer(flat, dtype=torch.long).view(depth, width)
        return self._tables[key]

    def _block(self, layer: int, h: torch.Tensor, layout: _Layout) -> torch.Tensor:
        c, w = self.config, self.weights.layers[layer - 1]
        t = h.shape[0]
        if not c.post_norm:
            qkv = self._project(w.qkv_proj, h, w.input_norm)
        else:  # the public BitSkip code's V1 feeds attention a parameter-free LayerNorm (eps 1e-5)
            qkv = w.qkv_proj(layer_norm(h, None, None, 1e-5) if c.attn_input_norm else h)
        q = qkv[:, :self.q_size].view(t, c.num_attention_heads, c.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, c.num_key_value_heads, c.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].reshape(t, c.num_key_value_heads, c.head_dim)
        if c.rope:
            q, k = apply_rope(q, layout.cos, layout.sin), apply_rope(k, layout.cos, layout.sin)
        attn = self._project(w.o_proj, self._attend(layer, q, k, v, layout), w.attn_sub_norm)
        if c.post_norm:  # normalize after each residual add; the MLP reads the normalized state
            h = w.post_attention_norm(h + attn)
            return w.post_feedforward_norm(h + self._mlp(w, h, None))
        h = h + attn
        return h + self._mlp(w, h, w.post_attention_norm)

    def _project(self, proj, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        """proj(x), or proj(norm(x)) when the architecture puts a norm before it (an RMSNorm is
        the backend's to fuse)."""
        if norm is None:
            return proj(x)
        if norm.bias is None:
            return self.backend.norm_project(proj, x, norm.weight, norm.eps)
        return proj(norm(x))

    def _mlp(self, w: LayerWeights, h: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        gate_up = self._project(w.gate_up_proj, h, norm)
        if not self.config.mlp_gated:
            return self._project(w.down_proj, activation(gate_up, self.config.hidden_act), w.ffn_sub_norm)
        f = gate_up.shape[1] // 2
        y = gated_activation(gate_up[:, :f], gate_up[:, f:], self.config.hidden_act)
        return self._project(w.down_proj, y, w.ffn_sub_norm)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layout: _Layout) -> torch.Tensor:
        """Causal attention of each row's running tokens over its cached and running keys."""
        if layout.static is not None:
            return layout.static.attend(layer, q, k, v)
        out = torch.empty(q.shape[0], self.q_size, device=self.device)
        cache, be = self.kv_cache, self.backend
        if layout.decode:  # single-token rows share one attention call
            lengths, idx = layout.decode_len, layout.decode_idx
            tables = cache.block_tables([sp.kv.tables[layer - 1] for sp in layout.decode],
                                        max(sp.start + 1 for sp in layout.decode))
            cache.write(cache.slots_at(tables, lengths - 1), k[idx], v[idx])
            out[idx] = be.decode_attention(q[idx], cache, tables, lengths)
        for sp in layout.spans:
            a, b = sp.a, sp.b
            if sp.kv is None and not self.config.causal:  # every position sees every other
                out[a:b] = be.full_attention(q[a:b], k[a:b], v[a:b])
            elif sp.kv is None:
                out[a:b] = be.causal_attention(q[a:b], k[a:b], v[a:b])
            elif b - a > 1:
                table = cache.block_tables([sp.kv.tables[layer - 1]], sp.start + b - a)[0]
                cache.write(cache.flat_slots(table[None], sp.start + b - a)[0, sp.start:], k[a:b], v[a:b])
                out[a:b] = be.prefill_attention(q[a:b], cache, table, sp.start)
        return out

    # ---- the shared head -----------------------------------------------------------------
    def head(self, h: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        """lm_head(norm_final(h)): the one head every exit shares. With `argmax_only`, rows may be
        -inf wherever the argmax cannot be (Row.argmax_only); the argmax's logit stays exact."""
        norm = self.weights.norm
        if self.native_head is not None:
            h = h.contiguous()
            if not argmax_only:
                return self.native_head.logits(h)
            out = torch.empty(h.shape[0], self.weights.lm_head.shape[0])
            self.native_head.greedy(h, out)
            return out
        if norm.bias is None:
            return self.backend.head(h, norm.weight, self.weights.lm_head, norm.eps, argmax_only)
        return F.linear(norm(h), self.weights.lm_head)

    def greedy_head(self, h: torch.Tensor) -> list[int]:
        """Each row's argmax of head(h) (first index on ties), from the native head."""
        return self.native_head.greedy(h.contiguous())
