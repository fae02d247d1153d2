"""ctypes binding of head_step.c: the shared head from the blocks' hidden states in one native call
(the final RMSNorm, the float32 head or the screened head, each greedy row's argmax), with its
scratch kept from call to call."""

from __future__ import annotations

import ctypes

import torch

from .screened_head import ScreenedHead

class HeadStruct(ctypes.Structure):  # head.h's Head
    _fields_ = [("norm", ctypes.c_void_p), ("eps", ctypes.c_double), ("weight", ctypes.c_void_p),
                ("vocab", ctypes.c_int64), ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("bounds", ctypes.c_void_p), ("norm_max", ctypes.c_double), ("approx", ctypes.c_int64)]


class NativeHead:
    """lm_head(rms_norm(h)) for float32 hidden states: every logit (`logits`), or each row's
    argmax alone (`greedy`: from the screened head's 8-bit copy when there is one, the float32
    head's argmax either way). Even the default model's small head (4096 x 128) is quicker
    screened inside a decode step, where the blocks have pushed it out of the caches: 0.13 vs
    0.23-0.49 ms of CPU a step at batch 1 (it reads 0.4 MB of codes, not 2 MB of floats)."""

    def __init__(self, lib: ctypes.CDLL, norm: torch.Tensor, eps: float, lm_head: torch.Tensor,
                 screened: ScreenedHead | None):
        self.lib, self.weight = lib, lm_head
        self._norm = norm.float().contiguous()  # kept: the struct points into these tensors
        self.screened = screened if screened is not None and screened.usable else None
        s = self.screened
        self.struct = HeadStruct(self._norm.data_ptr(), eps, lm_head.data_ptr(), lm_head.shape[0],
                                 *((s.codes.data_ptr(), s.scale.data_ptr(), s.bounds.data_ptr(), s.norm_max)
                                   if s is not None else (None, None, None, 0.0)), 0)
        self._ref = ctypes.byref(self.struct)
        self._rows = 0  # the scratch below holds this many rows
        self._x = self._out = self._tokens = torch.empty(0)

    def _scratch(self, rows: int) -> None:
        if rows > self._rows:
            v, k = self.weight.shape
            self._rows = rows
            self._x, self._out = torch.empty(rows, k), torch.empty(rows, v)
            self._tokens = torch.empty(rows, dtype=torch.long)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h float32 [M, hidden] contiguous -> float32 [M, vocab]."""
        m = h.shape[0]
        self._scratch(m)
        out = torch.empty(m, self.weight.shape[0])
        self.lib.bitskip_head_logits(self._ref, h.data_ptr(), m, h.shape[1], self._x.data_ptr(), out.data_ptr(),
                                     torch.get_num_threads())
        return out

    def greedy(self, h: torch.Tensor, out: torch.Tensor | None = None) -> list[int]:
        """h float32 [M, hidden] contiguous -> each row's argmax (first index on ties, as
        torch.argmax). `out` float32 [M, vocab], if given, gets logits that are exact at the rows
        that could be the argmax (the screened head's: -inf elsewhere)."""
        m = h.shape[0]
        self._scratch(m)
        n = self.lib.bitskip_head_greedy(self._ref, h.data_ptr(), m, h.shape[1], self._x.data_ptr(),
                                         (self._out if out is None else out).data_ptr(), self._tokens.data_ptr(),
                                         torch.get_num_threads())
        if n < 0:
            raise MemoryError("native head: out of memory")
        if self.screened is not None:
            self.screened.computed += n
        return self._tokens[:m].tolist()
