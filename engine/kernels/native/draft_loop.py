"""ctypes binding of draft_loop.c: a speculative round's greedy drafts, every draft of every row
in one native call (blocks 1..E, the final norm, the draft head's argmax, the next token's
embedding), or the whole greedy round, verified (blocks E+1..L over the drafted positions and the
exact head's argmax at each: the full model's tokens), sequential or pipelined on two cores."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from .block import DecodeBlocks
from .head_step import HeadStruct as _Head
from .screened_head import ScreenedHead

# Heads larger than this (bytes) take a round's exact argmaxes through the screened copy: all of
# them, as a decode step's greedy rows do (head_step.py).
# Alone and hot a small head's float32 product is quicker (default model, 4096 x 128: 50 us vs 74
# us a row), but inside a round the blocks have pushed its 2 MiB out of the caches, and the copy's
# 0.4 MiB read wins (in-process A/B, default model, E=18 k=3 / E=23 k=5: 1.20x -> 1.28x and
# 1.60x -> 1.67x of full depth, load 3.5).
SCREEN_ABOVE = 0


class GreedyDrafts:
    """The draft loop of a model whose blocks run natively: its embedding, final RMSNorm weight
    and float32 head, and the screened head's 8-bit copy when there is one.

    Exact argmaxes (a round's verify; drafts with `estimate` False) are the float32 head's, read
    through the screened copy (over SCREEN_ABOVE bytes: the same argmax). With `estimate` (and a
    copy), drafts take the argmax of the copy's level-1 estimate instead (draft_head.c): a greedy
    draft is kept only where the full model's exact argmax equals it, so the output stays the full
    model's, and the draft head reads 3/16 of the float32 head's bytes."""

    def __init__(self, blocks: DecodeBlocks, embed: torch.Tensor, norm: torch.Tensor, eps: float,
                 lm_head: torch.Tensor, screened: ScreenedHead | None, estimate: bool = True):
        self.blocks, self.embed = blocks, embed
        self._norm, self._eps = norm.float().contiguous(), eps  # kept: the structs point into these
        self._lm_head = lm_head
        copy = screened if screened is not None and screened.usable else None
        big = lm_head.numel() * lm_head.element_size() > SCREEN_ABOVE
        self._screened = copy if big else None
        self.estimated = estimate and copy is not None
        self._copy = copy  # kept too: the draft head reads its codes
        self._head = self._struct(self._screened, False)
        self._draft_head = self._struct(copy, True) if self.estimated else self._head
        # Each sequence's round drafts on one core while another verifies (draft_loop.c), each
        # verify ending at its first rejected draft. A block of one row is too small to share
        # between threads, so this is how a second core speeds up a stream; off, the rounds of a
        # step run together on the engine's threads, one verify each, every draft read.
        self.pipeline = len(os.sched_getaffinity(0)) >= 2

    def _struct(self, copy: ScreenedHead | None, approx: bool) -> _Head:
        codes = (copy.codes.data_ptr(), copy.scale.data_ptr(), copy.bounds.data_ptr(), copy.norm_max) \
            if copy is not None else (None, None, None, 0.0)
        return _Head(self._norm.data_ptr(), self._eps, self._lm_head.data_ptr(),
                     self._lm_head.shape[0], *codes, int(approx))

    def draft_argmax(self, x: torch.Tensor) -> torch.Tensor:
        """The estimated draft head's argmax of each normed row of x float32 [n, hidden] (-1
        where the estimate cannot be had: the loop then takes the exact head). Needs `estimated`."""
        x = x.float().contiguous()
        kp = -(-x.shape[1] // 64) * 64
        xq, xs = torch.empty(kp, dtype=torch.int16), torch.empty(2 * kp, dtype=torch.int8)
        c = self._copy
        return torch.tensor([self.blocks.lib.bitskip_draft_head_argmax(
            row.data_ptr(), x.shape[1], c.codes.data_ptr(), c.scale.data_ptr(), self._lm_head.shape[0],
            xq.data_ptr(), xs.data_ptr()) for row in x])

    def __call__(self, depth: int, m: int, tokens: list[int], starts: list[int], tables: torch.Tensor,
                 block_size: int, cache_k: torch.Tensor, cache_v: torch.Tensor, rope_cos: torch.Tensor,
                 rope_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one cached token each (tokens[r] at starts[r]) draft m tokens through blocks
        1..depth; tables long [depth, rows, width] contiguous. Returns the drafts long [rows, m]
        and the layer-`depth` states float32 [rows, m, hidden] of the tokens they came from."""
        n, hidden = len(tokens), self.embed.shape[1]
        token, position = torch.tensor(tokens, dtype=torch.long), torch.tensor(starts, dtype=torch.long)
        drafts = torch.empty(n, m, dtype=torch.long)
        states = torch.empty(n, m, hidden, dtype=torch.float32)
        b = self.blocks
        if b.lib.bitskip_draft_greedy(
                b._base, depth, n, m, token.data_ptr(), position.data_ptr(), tables.data_ptr(),
                tables.shape[2], block_size, cache_k.data_ptr(), cache_v.data_ptr(), rope_cos.data_ptr(),
                rope_sin.data_ptr(), self.embed.data_ptr(), hidden, ctypes.byref(self._draft_head),
                drafts.data_ptr(), states.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError("native draft loop: out of memory for its buffers")
        return drafts, states

    def round(self, depth: int, layers: int, m: int, tokens: list[int], starts: list[int], tables: torch.Tensor,
              block_size: int, cache_k: torch.Tensor, cache_v: torch.Tensor, rope_cos: torch.Tensor,
              rope_sin: torch.Tensor) -> tuple[list[GreedyRound], list[int]]:
        """A greedy round of each row (x0 = tokens[r] at starts[r]) with room for m drafts: drafts
        through blocks 1..depth, verified through blocks depth+1..layers, KV written at every layer
        for positions starts[r]..starts[r] + m; tables long [layers, rows, width] contiguous.
        Without `pipeline` each row drafts m tokens and one verify reads them all; with it, a
        row's verifies follow one another, each ending at its first rejected draft, until the
        round's positions are used. Returns each row's GreedyRound and the token-blocks run at each
        layer. Plain ctypes arrays in and out: no tensor is made per round."""
        n, i64 = len(tokens), ctypes.c_int64
        token, position = (i64 * n)(*tokens), (i64 * n)(*starts)
        out, drafted, accepted = (i64 * (n * (m + 1)))(), (i64 * (n * (m + 1)))(), (i64 * (n * (m + 1)))()
        emitted, verifies, ran = (i64 * n)(), (i64 * n)(), (i64 * layers)()
        b = self.blocks
        if b.lib.bitskip_round_greedy(
                b._base, b._base + depth * b._size, depth, layers - depth, n, m, token, position,
                tables.data_ptr(), tables.shape[2], block_size, cache_k.data_ptr(), cache_v.data_ptr(),
                rope_cos.data_ptr(), rope_sin.data_ptr(), self.embed.data_ptr(), self.embed.shape[1],
                ctypes.byref(self._draft_head), ctypes.byref(self._head), out, emitted, drafted, accepted,
                verifies, ran, int(self.pipeline), torch.get_num_threads()) != 0:
            raise MemoryError("native greedy round: out of memory for its buffers")
        w = m + 1
        return [GreedyRound(out[r * w:r * w + emitted[r]],
                            list(zip(drafted[r * w:r * w + verifies[r]], accepted[r * w:r * w + verifies[r]])))
                for r in range(n)], list(ran)


@dataclass
class GreedyRound:
    """A sequence's greedy round, verified: the full model's tokens it emits (those after x0), and
    (drafts read, drafts kept) of each of its verifies, in order: verify j emits its kept drafts
    and the full model's own next token."""

    tokens: list[int]
    verifies: list[tuple[int, int]]
