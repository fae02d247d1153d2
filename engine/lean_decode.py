"""The lean decode step on the CPU: every row one cached token at a fixed depth, its logits wanted
there (no pending tokens, no confidence rule, no states kept), through the native blocks and the
native head with as little Python and as few torch calls as a step allows.

Rows run deepest first, so those still running are always a prefix of the batch: one native call
per distinct depth (a segment), then the head on the rows that leave after it. Greedy rows
(Row.argmax_only) get their token from the native head (RowResult.token) and no logits: no
[1, vocab] tensor, no torch argmax, no sampler. The segments and each one's cache tables are kept
while the rows, their depths and the cache's tables stay the same (a decode step after another);
the hidden states and positions live in buffers kept from step to step, filled with ctypes (a
torch call costs several microseconds, as much as a small model's block).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model_runner import ModelRunner, Row, RowResult


class LeanDecode:
    def __init__(self, runner: ModelRunner):
        self.runner, self.cache = runner, runner.kv_cache
        self.embed = runner.weights.embed_tokens
        self.row_bytes = self.embed.shape[1] * self.embed.element_size()
        self._key, self._plan = None, []  # the last step's rows and its segments (_segments)
        self._rows = 0                    # the buffers below hold this many rows
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, ctypes.Array]] = {}

    @staticmethod
    def accepts(rows: list[Row]) -> bool:
        return all(len(r.tokens) == 1 and r.kv is not None and r.pending is None and r.confidence is None
                   and not r.keep_states and len(r.heads) == 1 and r.heads.get(r.depth) == "last" for r in rows)

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor, ctypes.Array]:
        """Hidden states [n, hidden] and positions [n] (a tensor and its ctypes view) of n rows."""
        if n > self._rows:
            self._rows, self._views = n, {}
            self._h = torch.empty(n, self.embed.shape[1], dtype=self.embed.dtype)
            self._positions = torch.empty(n, dtype=torch.long)
        if n not in self._views:
            self._views[n] = (self._h[:n], self._positions[:n],
                              (ctypes.c_int64 * n).from_address(self._positions.data_ptr()))
        return self._views[n]

    def run(self, rows: list[Row]) -> list[RowResult]:
        from .model_runner import RowResult

        r0, n = self.runner, len(rows)
        order = sorted(range(n), key=lambda i: -rows[i].depth)
        ranked = [rows[i] for i in order]
        cache = self.cache
        width = -(-(max(r.start for r in ranked) + 1) // cache.block_size)
        key = (cache.version, width, *[(id(r.kv), r.depth) for r in ranked])
        if key != self._key:
            self._key, self._plan = key, self._segments(ranked, width)
        h, positions, fill = self._buffers(n)
        fill[:] = [r.start for r in ranked]
        base, vocab = self.embed.data_ptr(), self.embed.shape[0]
        for j, r in enumerate(ranked):  # each row's embedding, copied into its row of h
            token = r.tokens[0]
            if not 0 <= token < vocab:
                raise ValueError(f"token id {token} outside 0..{vocab - 1}")
            ctypes.memmove(h.data_ptr() + j * self.row_bytes, base + token * self.row_bytes, self.row_bytes)
        results: list[RowResult | None] = [None] * n
        for first, last, running, leaving, tables in self._plan:
            states = h if running == n else h[:running]
            r0.native_blocks(first, last, states, positions, tables, cache.block_size, cache.k, cache.v,
                             r0.rope_cos, r0.rope_sin)
            for layer in range(first, last + 1):
                r0.blocks_run[layer] += running
            group = range(leaving, running)
            greedy = [j for j in group if ranked[j].argmax_only]
            if greedy:
                x = states if len(greedy) == running else h[leaving:running] if len(greedy) == running - leaving \
                    else h[torch.tensor(greedy)]
                for j, token in zip(greedy, r0.greedy_head(x)):
                    results[order[j]] = RowResult({}, last, token=token)
            if len(greedy) < running - leaving:
                full = [j for j in group if not ranked[j].argmax_only]
                logits = r0.head(h[leaving:running] if not greedy else h[torch.tensor(full)])
                for j, row_logits in zip(full, logits):
                    results[order[j]] = RowResult({last: row_logits[None]}, last)
        return results

    def _segments(self, ranked: list[Row], width: int) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """Per distinct depth d (ascending) of rows sorted deepest first: (first block, d, rows
        running them, first row leaving after d, the running rows' cache blocks long [d, rows,
        width])."""
        plan, first = [], 1
        depths = sorted({r.depth for r in ranked})
        for d, deeper in zip(depths, depths[1:] + [None]):
            running = sum(r.depth >= d for r in ranked)
            leaving = sum(r.depth > d for r in ranked) if deeper else 0
            tables = torch.stack([self.runner._sequence_tables(r.kv, d, width) for r in ranked[:running]], 1)
            plan.append((first, d, running, leaving, tables))
            first = d + 1
        return plan
