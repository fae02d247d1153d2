"""The native CPU kernels (ternary.c: the packed projection; decode_block.c: decoder blocks for
cached rows, with attention.c and team.h; head.c: the float32 head; head_screen.c: its argmax from
an 8-bit copy read in two levels, head_codes.c; head_step.c: the head from the blocks' states, norm
and argmax included; draft_loop.c: a speculative round's greedy drafts or whole greedy round,
draft_head.c: a draft's estimated argmax): built with the system C compiler into a cache directory
the first time it is needed (or at install time: `python -m engine.kernels.native`), loaded with
ctypes. It is compiled against raw buffers only (no torch headers), so building it never needs pip
or a build environment.

Without a compiler (or with BITSKIP_NATIVE=0) `library()` returns None and says why in one log
line; the CPU backend then uses its torch path, which computes the same integers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("bitskip.kernels")

HERE = Path(__file__).parent
SOURCES = [HERE / "ternary.c", HERE / "decode_block.c", HERE / "attention.c", HERE / "gate.c", HERE / "head.c",
           HERE / "head_screen.c", HERE / "head_codes.c", HERE / "head_step.c", HERE / "draft_loop.c",
           HERE / "draft_head.c", HERE / "worker.c"]
HEADERS = [HERE / "ternary.h", HERE / "attention.h", HERE / "gate.h", HERE / "simd.h", HERE / "team.h", HERE / "head.h",
           HERE / "head_codes.h", HERE / "worker.h"]
# -ffp-contract=off: no float code today, but no FMA may ever change a rounding here.
FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off"]
OPENMP = ["-fopenmp"]


def cache_dir() -> Path:
    return Path(os.environ.get("BITSKIP_CACHE", Path.home() / ".cache" / "bitskip")) / "native"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def built_path(directory: Path) -> Path:
    """Where the build of this source and these flags lives: a changed source gets a fresh build."""
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)
                         + " ".join(FLAGS).encode()).hexdigest()[:16]
    return directory / f"ternary-{key}.so"


def build(cc: str | None, directory: Path) -> Path:
    """Compile the sources (with OpenMP if the compiler has it) into `directory`, unless built."""
    target = built_path(directory)
    if target.exists():
        return target
    if cc is None:
        raise FileNotFoundError("no C compiler found (set CC or install gcc)")
    directory.mkdir(parents=True, exist_ok=True)
    errors = ""
    for extra in (OPENMP, []):
        # Written under a temporary name, then renamed: concurrent builders never see half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        r = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES), "-lm", "-pthread"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        errors += r.stderr
    raise RuntimeError(f"{cc} could not build the native kernels:\n{errors}")


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.bitskip_ternary_gemm.argtypes = [p, i64, i64, i64, p, p, ctypes.c_int, p, i64, ctypes.c_int]
    lib.bitskip_ternary_gemm.restype = ctypes.c_int
    lib.bitskip_has_avx2.restype = ctypes.c_int
    lib.bitskip_decode_blocks.argtypes = [p, i64, p, i64, p, p, i64, i64, p, p, p, p, ctypes.c_int]
    lib.bitskip_decode_blocks.restype = ctypes.c_int
    lib.bitskip_decode_profile.argtypes = [ctypes.c_int, p]
    lib.bitskip_decode_prefetch.argtypes = [ctypes.c_int]
    lib.bitskip_decode_prefetch.restype = None
    lib.bitskip_head.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    lib.bitskip_head.restype = None
    lib.bitskip_head_force_portable.argtypes = [ctypes.c_int]
    lib.bitskip_head_screen_build.argtypes = [p, i64, i64, i64, i64, p, p, p, p, ctypes.c_int]
    lib.bitskip_head_screen_build.restype = ctypes.c_int
    lib.bitskip_head_screened.argtypes = [p, i64, i64, p, p, p, p, ctypes.c_double, i64, p, ctypes.c_int]
    lib.bitskip_head_screened.restype = i64
    lib.bitskip_head_greedy.argtypes = [p, p, i64, i64, p, p, p, ctypes.c_int]
    lib.bitskip_head_greedy.restype = i64
    lib.bitskip_head_logits.argtypes = [p, p, i64, i64, p, p, ctypes.c_int]
    lib.bitskip_head_logits.restype = None
    lib.bitskip_draft_greedy.argtypes = [p, i64, i64, i64, p, p, p, i64, i64, p, p, p, p, p, i64, p, p, p,
                                         ctypes.c_int]
    lib.bitskip_draft_greedy.restype = ctypes.c_int
    lib.bitskip_gate.argtypes = [p, p, i64, i64, p]
    lib.bitskip_gate.restype = None
    lib.bitskip_round_greedy.argtypes = [p, p, i64, i64, i64, i64, p, p, p, i64, i64, p, p, p, p, p, i64, p, p,
                                         p, p, p, p, p, p, ctypes.c_int, ctypes.c_int]
    lib.bitskip_round_greedy.restype = ctypes.c_int
    lib.bitskip_draft_head_argmax.argtypes = [p, i64, p, p, i64, p, p]
    lib.bitskip_draft_head_argmax.restype = i64
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (logged once) when it cannot be had."""
    if os.environ.get("BITSKIP_NATIVE", "1") == "0":
        log.info("native CPU kernel disabled (BITSKIP_NATIVE=0): using the torch int8 path")
        return None
    cc = compiler()
    try:
        try:
            path = build(cc, cache_dir())
        except PermissionError:  # cache not writable: build where we can
            path = build(cc, Path(tempfile.gettempdir()) / f"bitskip-native-{os.getuid()}")
        return _bind(path)
    except (OSError, RuntimeError) as e:
        log.warning("native CPU kernel unavailable (%s): using the slower torch int8 path",
                    str(e).splitlines()[0])
        return None


class PackedMatmul:
    """Exact int32 products of int8 activations with packed ternary rows (DESIGN section 3 layout),
    the parts of a fused projection side by side. Holds the packed tensors themselves: no copy."""

    def __init__(self, lib: ctypes.CDLL, parts: list[torch.Tensor]):
        widths = {p.shape[1] for p in parts}
        if len(widths) != 1:
            raise ValueError(f"fused parts disagree on in-features: {sorted(4 * w for w in widths)}")
        self.lib = lib
        self.parts = [p.to(torch.uint8).contiguous() for p in parts]
        self.in_features = 4 * widths.pop()
        self.out_features = sum(p.shape[0] for p in self.parts)
        self._ptrs = (ctypes.c_void_p * len(parts))(*[p.data_ptr() for p in self.parts])
        self._rows = (ctypes.c_int64 * len(parts))(*[p.shape[0] for p in self.parts])

    def rebind(self) -> None:
        """Read the parts' addresses again, after their storage moved (hugepages.py)."""
        for i, p in enumerate(self.parts):
            self._ptrs[i] = p.data_ptr()

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """int8 [M, K] -> int32 [M, N]."""
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != self.in_features:
            raise ValueError(f"expected int8 codes [M, {self.in_features}], got {codes.dtype} "
                             f"{list(codes.shape)}")
        if codes.stride(1) != 1:
            codes = codes.contiguous()
        self.rebind()  # the parts may have moved into huge pages since (shared with another model)
        m = codes.shape[0]
        out = torch.empty(m, self.out_features, dtype=torch.int32)
        if self.lib.bitskip_ternary_gemm(codes.data_ptr(), m, self.in_features, codes.stride(0),
                                         self._ptrs, self._rows, len(self.parts), out.data_ptr(),
                                         self.out_features, torch.get_num_threads()) != 0:
            raise MemoryError("native ternary kernel: out of memory for the activations")
        return out


def head_matmul(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] @ weight float32 [V, K].T, each row summed in one fixed order (head.c: its
    logits do not depend on the other rows, the threads or the CPU path), threads over the head's rows."""
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    lib.bitskip_head(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight.shape[0],
                     out.data_ptr(), torch.get_num_threads())
    return out
