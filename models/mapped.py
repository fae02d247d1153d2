"""Tensors that stay in their file: a private memory map whose pages are resident only while used.

The engine reads a few rows of a large embedding per step; keeping the whole table in memory would
cost as much as the head it never replaces (0.4 GB for a 1B model's). A mapped tensor behaves like
any other (writes go to private copies of the pages, never to the file); `release` drops the pages
a pass over the whole tensor (the NaN/Inf check at load) made resident, so loading never holds
the table at once.

The file must not be rewritten in place while it is mapped (reading a page past a truncated end
is a bus error): tools that write checkpoints write a new file and rename it over the old one,
as models.checkpoint.save_checkpoint does.
"""

from __future__ import annotations

import mmap
import weakref
from typing import BinaryIO

import torch

# Mappings made here: base address -> (end address, the mmap while it lives).
_regions: dict[int, tuple[int, weakref.ref]] = {}


def map_tensor(f: BinaryIO, offset: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `shape` and `dtype` stored at byte `offset` of the open file `f`."""
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    start = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(f.fileno(), offset - start + nbytes, access=mmap.ACCESS_COPY, offset=start)
    t = torch.frombuffer(memoryview(m)[offset - start:], dtype=dtype).view(shape)
    base = t.data_ptr() - (offset - start)
    _regions[base] = (base + len(m), weakref.ref(m))
    return t


def release(t: torch.Tensor) -> None:
    """Drop the resident pages that lie wholly inside `t`, if `t` is part of a mapped tensor
    (read again, they fault back in from the file); for any other tensor, nothing."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    for base, (stop, ref) in list(_regions.items()):
        m = ref()
        if m is None:
            del _regions[base]
        elif base <= start and end <= stop:
            page = mmap.PAGESIZE
            first, last = -(-(start - base) // page) * page, (end - base) // page * page
            if last > first:
                m.madvise(mmap.MADV_DONTNEED, first, last - first)
            return
