"""Decode steps from static buffers, replayed as CUDA graphs per batch bucket and depth segment.

A decode step whose rows are all plain single-token rows (fixed exit at an exit point or L, KV
cached, nothing pending; a speculative draft also gets its state at its exit back) runs here
instead of through the runner's general layout. The rows are ordered deepest first, so the rows
that go on past an exit point are always a prefix of the batch; the step runs segment by segment,
a segment being the blocks between consecutive exit points: the shared segment for every row,
each deeper one for the prefix that continues. Rows that left are masked (length 0: no
attention, their KV writes go to the cache's scratch slot).

Each (bucket, segment) computes on the first `bucket` rows of fixed buffers (hidden states, RoPE
rows, per-layer block tables, lengths, write slots), through the runner's own `_block` with the
backend's kernels. Without CUDA graphs (CPU, the interpreter, --enforce-eager) that code runs
eagerly, which is how the tests check it; on a GPU its first run per key is eager (compiling
and autotuning the Triton kernels for that shape) and is then captured, and later steps replay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model_runner import ModelRunner, Row, RowResult


def buckets(max_rows: int) -> list[int]:
    """Batch sizes graphs are captured for: powers of two, then multiples of 32, up to max_rows."""
    out, b = [], 1
    while b < min(max_rows, 32):
        out.append(b)
        b *= 2
    b = 32
    while b < max_rows:
        out.append(b)
        b += 32
    return out + [max_rows]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_rows: int, cuda_graphs: bool):
        c, cache, dev = runner.config, runner.kv_cache, runner.device
        self.runner, self.cache = runner, cache
        self.stops = sorted(set(c.exit_points) | {c.num_hidden_layers})
        self.buckets = buckets(max_rows)
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        rows, width = self.buckets[-1], -(-c.max_position_embeddings // cache.block_size)
        self.h = torch.zeros(rows, c.hidden_size, device=dev)
        self.cos = torch.zeros(rows, c.head_dim, device=dev)
        self.sin = torch.zeros(rows, c.head_dim, device=dev)
        self.tables = torch.zeros(c.num_hidden_layers, rows, width, dtype=torch.long, device=dev)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=dev)
        self.slots = torch.full((c.num_hidden_layers, rows), cache.scratch_slot, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.steps = 0  # decode steps served from the buffers

    def accepts(self, rows: list[Row]) -> bool:
        return (len(rows) <= self.buckets[-1]
                and all(len(r.tokens) == 1 and r.kv is not None and r.pending is None
                        and r.confidence is None and r.heads == {r.depth: "last"} and r.depth in self.stops
                        for r in rows))

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # ---- one step --------------------------------------------------------------------------
    def run(self, rows: list[Row]) -> list[RowResult]:
        from .model_runner import Pending, RowResult

        runner, cache = self.runner, self.cache
        self.steps += 1
        order = sorted(range(len(rows)), key=lambda i: -rows[i].depth)
        depths = [rows[i].depth for i in order]
        self._fill([rows[i] for i in order], depths[0])
        results: list[RowResult | None] = [None] * len(rows)
        lo, live = 0, len(rows)
        for hi in self.stops:
            if lo >= depths[0]:
                break
            going_on = sum(d > lo for d in depths)
            if going_on < live:  # rows that left at `lo`: no attention, KV writes to scratch
                self.lengths[going_on:live] = 0
                self.slots[:, going_on:live] = cache.scratch_slot
                live = going_on
            self._segment(lo, hi, self.bucket(live))
            for layer in range(lo + 1, hi + 1):
                runner.blocks_run[layer] += live
            leaving = [j for j in range(live) if depths[j] == hi]   # a suffix of the live prefix
            if leaving:
                logits = runner.head(self.h[leaving[0]:live])
                for j, row_logits in zip(leaving, logits):
                    # a speculative draft keeps its state after block hi for the round's verify
                    kept = Pending(self.h[j:j + 1].clone(), [hi]) if rows[order[j]].keep_states else None
                    results[order[j]] = RowResult({hi: row_logits[None]}, hi, kept)
            lo = hi
        return results

    def _fill(self, rows: list[Row], depth: int) -> None:
        """This step's inputs into the buffers (one host-to-device copy each)."""
        runner, cache, dev = self.runner, self.cache, self.runner.device
        n, bs = len(rows), cache.block_size
        pad = self.bucket(n)
        positions = torch.tensor([r.start for r in rows], dtype=torch.long, device=dev)
        ids = torch.tensor([r.tokens[0] for r in rows], dtype=torch.long, device=dev)
        width = max(r.start for r in rows) // bs + 1
        tables = torch.tensor([[r.kv.tables[layer][:width] + [0] * (width - len(r.kv.tables[layer][:width]))
                                if layer < r.depth else [0] * width for r in rows] for layer in range(depth)],
                              dtype=torch.long, device=dev)
        self.tables[:depth, :n, :width] = tables
        self.h[:n] = runner.weights.embed_tokens[ids]
        self.h[n:pad] = 0
        self.cos[:n], self.sin[:n] = runner.rope_cos[positions], runner.rope_sin[positions]
        self.lengths[:n] = positions + 1
        self.lengths[n:pad] = 0
        blocks = tables.gather(2, (positions // bs)[None, :, None].expand(depth, n, 1))[:, :, 0]
        self.slots[:depth, :n] = blocks * bs + positions % bs
        self.slots[:, n:pad] = cache.scratch_slot

    def _segment(self, lo: int, hi: int, b: int) -> None:
        """Blocks lo+1..hi on the first b rows of the buffers: a graph replay when captured."""
        graph = self.graphs.get((b, lo, hi))
        if graph is not None:
            graph.replay()
            return
        self._compute(lo, hi, b)
        if self.cuda_graphs:  # the eager run above compiled and autotuned for this shape
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):  # records; runs nothing
                self._compute(lo, hi, b)
            self._pool = graph.pool()
            self.graphs[(b, lo, hi)] = graph

    def _compute(self, lo: int, hi: int, b: int) -> None:
        from .model_runner import _Layout

        layout = _Layout([], self.cos[:b], self.sin[:b], [], None, None, 0, static=self)
        h = self.h[:b]
        for layer in range(lo + 1, hi + 1):
            h = self.runner._block(layer, h, layout)
        self.h[:b] = h

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the first q.shape[0] buffer rows at `layer` (called from `_block`)."""
        b = q.shape[0]
        self.cache.write(self.slots[layer - 1, :b], k, v)
        return self.runner.backend.decode_attention(q, self.cache, self.tables[layer - 1, :b], self.lengths[:b])
