"""ctypes binding of decode_block.c: one decoder block for rows that each bring one cached token.

`DecodeBlock` is built once per layer from the layer's norms and native projections and holds the
C struct of pointers into them (the tensors stay referenced here, so the pointers stay valid).
"""

from __future__ import annotations

import ctypes

import torch

from . import PackedMatmul

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class _Proj(ctypes.Structure):
    _fields_ = [("parts", _p), ("part_rows", _p), ("nparts", _i64), ("in_features", _i64),
                ("out_features", _i64), ("gamma", _p)]


class _Block(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("inter", _i64), ("qmax", _i64), ("hadamard", _i64), ("relu2", _i64),
                ("eps", ctypes.c_double), ("input_norm", _p), ("post_norm", _p),
                ("attn_sub_norm", _p), ("ffn_sub_norm", _p),
                ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj)]


def _proj(matmul: PackedMatmul, gamma: torch.Tensor) -> _Proj:
    return _Proj(ctypes.cast(matmul._ptrs, _p), ctypes.cast(matmul._rows, _p), len(matmul.parts),
                 matmul.in_features, matmul.out_features, gamma.data_ptr())


class DecodeBlock:
    """h [n, hidden] -> the block's output, in place, for n single-token rows with a KV cache.

    `projections` are CpuTernaryLinear (native kernel) for qkv, o, gate_up, down; norms float32.
    """

    def __init__(self, lib: ctypes.CDLL, *, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int, qmax: int, hadamard: bool, hidden_act: str, eps: float,
                 input_norm: torch.Tensor, post_norm: torch.Tensor, attn_sub_norm: torch.Tensor | None,
                 ffn_sub_norm: torch.Tensor | None, projections: list):
        self.lib = lib
        norms = [t if t is None else t.float().contiguous()
                 for t in (input_norm, post_norm, attn_sub_norm, ffn_sub_norm)]
        self._keep = (norms, projections)
        ptr = [t.data_ptr() if t is not None else None for t in norms]
        self.struct = _Block(hidden, heads, kv_heads, head_dim, intermediate, qmax, int(hadamard),
                             int(hidden_act == "relu2"), eps, *ptr,
                             *[_proj(p._matmul, p.scale) for p in projections])
        self._ref = ctypes.byref(self.struct)

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                 block_size: int, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """h float32 [n, hidden] contiguous (overwritten and returned); positions long [n];
        tables long [n, width] contiguous: this layer's cache blocks of each row."""
        rc = self.lib.bitskip_decode_block(
            self._ref, h.data_ptr(), h.shape[0], positions.data_ptr(), tables.data_ptr(), tables.shape[1],
            block_size, cache_k.data_ptr(), cache_v.data_ptr(), rope_cos.data_ptr(), rope_sin.data_ptr(),
            torch.get_num_threads())
        if rc != 0:
            raise MemoryError("native decode block: out of memory for its scratch buffers")
        return h


def decode_blocks(config, layers: list) -> list[DecodeBlock] | None:
    """One DecodeBlock per layer of `layers` (engine.weights.LayerWeights), or None when some
    projection does not run the native kernel (no compiler, or another backend)."""
    from . import library

    lib = library()
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    if lib is None or any(getattr(getattr(w, n), "kernel", None) != "native" for w in layers for n in names):
        return None
    from models.quant import activation_qmax

    return [DecodeBlock(lib, hidden=config.hidden_size, heads=config.num_attention_heads,
                        kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                        intermediate=config.intermediate_size, qmax=activation_qmax(config.activation_bits),
                        hadamard=config.hadamard, hidden_act=getattr(config, "hidden_act", "silu"),
                        eps=config.rms_norm_eps, input_norm=w.input_norm, post_norm=w.post_attention_norm,
                        attn_sub_norm=getattr(w, "attn_sub_norm", None),
                        ffn_sub_norm=getattr(w, "ffn_sub_norm", None),
                        projections=[getattr(w, n) for n in names])
            for w in layers]
