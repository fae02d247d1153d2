"""ctypes binding of draft_loop.c: a speculative round's greedy drafts, every draft of every row
in one native call (blocks 1..E, the final norm, the head's argmax, the next token's embedding)."""

from __future__ import annotations

import ctypes

import torch

from .block import DecodeBlocks
from .screened_head import ScreenedHead


class _Head(ctypes.Structure):
    _fields_ = [("norm", ctypes.c_void_p), ("eps", ctypes.c_double), ("weight", ctypes.c_void_p),
                ("vocab", ctypes.c_int64), ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("bounds", ctypes.c_void_p), ("norm_max", ctypes.c_double)]


# A float32 head this small stays in the caches and its full product is quicker than screening
# (default model, 4096 x 128: 50 us vs 74 us a row); larger ones screen with the 8-bit copy.
SCREEN_ABOVE = 16 << 20


class GreedyDrafts:
    """The draft loop of a model whose blocks run natively: its embedding, final RMSNorm weight
    and float32 head, and the screened head's 8-bit copy when there is one and the head is large
    (the argmax is the float32 head's either way)."""

    def __init__(self, blocks: DecodeBlocks, embed: torch.Tensor, norm: torch.Tensor, eps: float,
                 lm_head: torch.Tensor, screened: ScreenedHead | None):
        self.blocks, self.embed = blocks, embed
        self._norm = norm.float().contiguous()  # kept: the struct points into these tensors
        big = lm_head.numel() * lm_head.element_size() > SCREEN_ABOVE
        self._screened = screened if big and screened is not None and screened.usable else None
        s = self._screened
        self._head = _Head(self._norm.data_ptr(), eps, lm_head.data_ptr(), lm_head.shape[0],
                           *((s.codes.data_ptr(), s.scale.data_ptr(), s.bounds.data_ptr(), s.norm_max)
                             if s is not None else (None, None, None, 0.0)))
        self._lm_head = lm_head

    def __call__(self, depth: int, m: int, tokens: list[int], starts: list[int], tables: torch.Tensor,
                 block_size: int, cache_k: torch.Tensor, cache_v: torch.Tensor, rope_cos: torch.Tensor,
                 rope_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one cached token each (tokens[r] at starts[r]) draft m tokens through blocks
        1..depth; tables long [depth, rows, width] contiguous. Returns the drafts long [rows, m]
        and the layer-`depth` states float32 [rows, m, hidden] of the tokens they came from."""
        n, hidden = len(tokens), self.embed.shape[1]
        token = torch.tensor(tokens, dtype=torch.long)
        position = torch.tensor(starts, dtype=torch.long)
        drafts = torch.empty(n, m, dtype=torch.long)
        states = torch.empty(n, m, hidden, dtype=torch.float32)
        b = self.blocks
        if b.lib.bitskip_draft_greedy(
                b._base, depth, n, m, token.data_ptr(), position.data_ptr(), tables.data_ptr(),
                tables.shape[2], block_size, cache_k.data_ptr(), cache_v.data_ptr(), rope_cos.data_ptr(),
                rope_sin.data_ptr(), self.embed.data_ptr(), hidden, ctypes.byref(self._head),
                drafts.data_ptr(), states.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError("native draft loop: out of memory for its buffers")
        return drafts, states
