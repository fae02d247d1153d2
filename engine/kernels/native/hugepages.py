"""The packed weights of the native blocks in 2 MiB pages (transparent huge pages).

A decode step streams every packed weight once (paper-1b: 213 MB a token). With 4 KiB pages that
is ~52,000 pages a token, each a TLB miss and a page walk; the hardware prefetcher also stops at
every 4 KiB boundary. Copied into one arena whose start is 2 MiB-aligned and advised
MADV_HUGEPAGE, the same bytes sit in ~100 pages. Where the kernel is in `madvise` mode (the
default of many distributions) nothing else would give them huge pages.

Each tensor is rebound in place (`Tensor.set_`) to its copy in the arena, so every holder of it
(the checkpoint's dict, the projection) sees the copy and the old storage is freed as soon as it
is copied: resident memory grows by at most one tensor during the move. When huge pages cannot be
had (no MADV_HUGEPAGE on this platform, madvise refused, BITSKIP_HUGEPAGES=0) the tensors are left
exactly as they are.

Callers that keep raw pointers to the tensors take them after the move (PackedMatmul reads its
parts' addresses at every call; DecodeBlocks moves first, then builds its structs).
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref

import torch

log = logging.getLogger("bitskip.kernels")

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor's start: whole cache lines (and the kernel's 32-byte loads)
# Each arena's mapping (weakly: it goes when its last tensor does) and its [start, end).
_arenas: list[tuple[weakref.ref, int, int]] = []


def _advise(mm: mmap.mmap, offset: int, length: int) -> None:
    """madvise(MADV_HUGEPAGE) on [offset, offset + length) of `mm` (raises OSError or
    AttributeError where it cannot be had)."""
    mm.madvise(mmap.MADV_HUGEPAGE, offset, length)


def _in_arena(t: torch.Tensor) -> bool:
    _arenas[:] = [a for a in _arenas if a[0]() is not None]
    return any(a <= t.data_ptr() < b for _, a, b in _arenas)


def move_to_huge_pages(tensors: list[torch.Tensor]) -> bool:
    """Copy `tensors` (contiguous uint8, CPU) one after another into one huge-page arena and rebind
    each to its copy; True when every one of them now lies in huge pages. A tensor already moved
    (by an earlier call: weights shared by two models) stays where it is, so no pointer taken to
    it since goes stale. When huge pages cannot be had, the tensors are left untouched."""
    if os.environ.get("BITSKIP_HUGEPAGES", "1") == "0" or not tensors:
        return False
    todo, offsets, size, seen = [], [], 0, set()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.uint8 or not t.is_contiguous():
            raise ValueError(f"huge pages hold contiguous uint8 CPU tensors, got {t.dtype} on "
                             f"{t.device}, strides {t.stride()}")
        if _in_arena(t) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        todo.append(t)
        offsets.append(size)
        size += -(-t.numel() // ALIGN) * ALIGN
    if not todo:
        return True
    # Anonymous private memory (shared memory gets no transparent huge pages), page-aligned; 2 MiB
    # of slack on each side finds a 2 MiB-aligned start and a whole last huge page inside the
    # mapping (untouched slack is never resident).
    mm = mmap.mmap(-1, size + 2 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    try:
        _advise(mm, start, -(-size // HUGE_PAGE) * HUGE_PAGE)
    except (OSError, AttributeError, ValueError) as e:
        log.info("packed weights stay in 4 KiB pages (madvise(MADV_HUGEPAGE): %s)", e)
        return False
    storage = whole.untyped_storage()
    with torch.inference_mode():  # tensors made in inference mode or not: both may be set_
        for t, off in zip(todo, offsets):
            whole[start + off:start + off + t.numel()].view(t.shape).copy_(t)
            t.set_(storage, start + off, t.shape, t.stride())
    _arenas.append((weakref.ref(mm), whole.data_ptr() + start, whole.data_ptr() + start + size))
    return True
