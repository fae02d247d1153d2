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
                ("out_features", _i64), ("gamma", _p), ("qmax", _i64), ("hadamard", _i64)]


class _Block(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("inter", _i64), ("relu2", _i64),
                ("eps", ctypes.c_double), ("input_norm", _p), ("post_norm", _p),
                ("attn_sub_norm", _p), ("ffn_sub_norm", _p),
                ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj)]


def _proj(proj) -> _Proj:
    """From a CpuTernaryLinear on the native kernel."""
    m: PackedMatmul = proj._matmul
    return _Proj(ctypes.cast(m._ptrs, _p), ctypes.cast(m._rows, _p), len(m.parts), m.in_features,
                 m.out_features, proj.scale.data_ptr(), proj.qmax, int(proj.hadamard))


class DecodeBlock:
    """h [n, hidden] -> the block's output, in place, for n single-token rows with a KV cache.

    `projections` are CpuTernaryLinear (native kernel) for qkv, o, gate_up, down; norms float32
    RMSNorm weights (the sub-norms None when absent).
    """

    def __init__(self, lib: ctypes.CDLL, *, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int, hidden_act: str, eps: float, input_norm: torch.Tensor,
                 post_norm: torch.Tensor, attn_sub_norm: torch.Tensor | None,
                 ffn_sub_norm: torch.Tensor | None, projections: list):
        self.lib = lib
        norms = [t if t is None else t.float().contiguous()
                 for t in (input_norm, post_norm, attn_sub_norm, ffn_sub_norm)]
        self._keep = (norms, projections)
        ptr = [t.data_ptr() if t is not None else None for t in norms]
        self.struct = _Block(hidden, heads, kv_heads, head_dim, intermediate, int(hidden_act == "relu2"),
                             eps, *ptr, *[_proj(p) for p in projections])
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


# What the native block computes; any other architecture option takes the general path.
_COVERED = dict(norm_type="rms", post_norm=False, projection_norm=False, projection_act="none",
                mlp_gated=True, rope=True, causal=True)
_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def decode_blocks(config, layers: list) -> list[DecodeBlock] | None:
    """One DecodeBlock per layer of `layers` (engine.weights.LayerWeights), or None when the model
    is not one the native block computes: a projection not on the native kernel (no compiler,
    another backend, a wrapped projection) or an architecture option it does not cover."""
    from . import library

    lib = library()
    if lib is None or config.hidden_act not in ("silu", "relu2") \
            or any(getattr(config, k, v) != v for k, v in _COVERED.items()):
        return None
    for w in layers:
        norms = [w.input_norm, w.post_attention_norm, w.attn_sub_norm, w.ffn_sub_norm]
        if w.input_norm is None or getattr(w, "post_feedforward_norm", None) is not None \
                or any(n is not None and n.bias is not None for n in norms) \
                or any(getattr(getattr(w, n), "kernel", None) != "native" for n in _PROJECTIONS):
            return None
    return [DecodeBlock(lib, hidden=config.hidden_size, heads=config.num_attention_heads,
                        kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                        intermediate=config.intermediate_size, hidden_act=config.hidden_act,
                        eps=w.input_norm.eps, input_norm=w.input_norm.weight,
                        post_norm=w.post_attention_norm.weight,
                        attn_sub_norm=w.attn_sub_norm.weight if w.attn_sub_norm else None,
                        ffn_sub_norm=w.ffn_sub_norm.weight if w.ffn_sub_norm else None,
                        projections=[getattr(w, n) for n in _PROJECTIONS])
            for w in layers]
