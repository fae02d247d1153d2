"""ctypes binding of decode_block.c: the decoder blocks for rows whose tokens have a KV cache,
several blocks in one native call."""

from __future__ import annotations

import ctypes

import torch

from . import PackedMatmul
from .hugepages import move_to_huge_pages

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


class DecodeBlocks:
    """The model's blocks as one native call: rows that each bring a cached token (or consecutive
    tokens of one sequence, in position order) through blocks first..last, h updated in place.

    Built once from every layer's norms and native projections; holds the C structs of pointers
    into them (the tensors stay referenced here, so the pointers stay valid). The projections'
    packed weights move into huge pages first, in the order a step reads them (hugepages.py).
    """

    def __init__(self, lib: ctypes.CDLL, config, layers: list):
        self.lib = lib
        matmuls = [getattr(w, n)._matmul for w in layers for n in _PROJECTIONS]
        self.huge_pages = move_to_huge_pages([p for m in matmuls for p in m.parts])
        for m in matmuls:
            m.rebind()
        keep, structs = [], []
        for w in layers:
            norms = [n if n is None else n.weight.float().contiguous()
                     for n in (w.input_norm, w.post_attention_norm, w.attn_sub_norm, w.ffn_sub_norm)]
            projections = [getattr(w, n) for n in _PROJECTIONS]
            keep.append((norms, projections))
            structs.append(_Block(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                  config.head_dim, config.intermediate_size, int(config.hidden_act == "relu2"),
                                  w.input_norm.eps, *[n.data_ptr() if n is not None else None for n in norms],
                                  *[_proj(p) for p in projections]))
        self._keep = keep
        self._structs = (_Block * len(structs))(*structs)
        self._base, self._size = ctypes.addressof(self._structs), ctypes.sizeof(_Block)

    def __len__(self) -> int:
        return len(self._structs)

    def __call__(self, first: int, last: int, h: torch.Tensor, positions: torch.Tensor,
                 tables: torch.Tensor, block_size: int, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """Blocks first..last (1-based, inclusive). h float32 [n, hidden] contiguous (overwritten
        and returned); positions long [n]; tables long [>= last, n, width] contiguous: each
        layer's cache blocks of each row."""
        rows, width = tables.shape[1], tables.shape[2]
        rc = self.lib.bitskip_decode_blocks(
            self._base + (first - 1) * self._size, last - first + 1, h.data_ptr(), h.shape[0],
            positions.data_ptr(), tables.data_ptr() + (first - 1) * rows * width * 8, width, block_size,
            cache_k.data_ptr(), cache_v.data_ptr(), rope_cos.data_ptr(), rope_sin.data_ptr(),
            torch.get_num_threads())
        if rc != 0:
            raise MemoryError("native decode blocks: out of memory for their scratch buffers")
        return h


# What the native block computes; any other architecture option takes the general path.
_COVERED = dict(norm_type="rms", post_norm=False, projection_norm=False, projection_act="none",
                mlp_gated=True, rope=True, causal=True)
_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def decode_blocks(config, layers: list) -> DecodeBlocks | None:
    """The native blocks of `layers` (engine.weights.LayerWeights), or None when the model
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
    return DecodeBlocks(lib, config, layers)
