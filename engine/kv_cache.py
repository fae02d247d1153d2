"""Paged key/value cache. One pool of blocks serves every layer: a block holds `block_size`
positions of one layer, so a request that exits at layer k holds blocks for layers 1..k only."""

from __future__ import annotations

import math
import mmap
import os
from collections import deque

import torch


class SequenceKV:
    """The block table of one sequence: `tables[l - 1]` lists the blocks of layer l."""

    def __init__(self):
        self.tables: list[list[int]] = []
        self.capacity = 0  # positions every allocated layer can hold

    @property
    def num_layers(self) -> int:
        return len(self.tables)

    @property
    def num_blocks(self) -> int:
        return sum(len(t) for t in self.tables)


def _check_fits(nbytes: int, num_blocks: int, device: torch.device) -> None:
    """Refuse, in one sentence, a cache larger than the device's memory (a config with a huge
    max_position_embeddings), rather than fail inside the allocator."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > total:
        raise ValueError(f"the KV cache would need {nbytes / 2**30:,.1f} GiB ({num_blocks:,} blocks) and the "
                         f"{device.type} has {total / 2**30:,.1f} GiB: lower max_position_embeddings in the "
                         "model's config.json, or the number of sequences (--max-batch)")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU in fresh anonymous pages, which the kernel hands out zeroed as
    they are first written: a pool sized for every sequence at full context costs the memory its
    sequences use (torch.zeros would write, and so commit, all of it up front)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, math.prod(shape) * dtype.itemsize), dtype=dtype).view(shape)


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        _check_fits(2 * (num_blocks + 1) * block_size * num_kv_heads * head_dim * dtype.itemsize, num_blocks,
                    self.device)
        # Zero-filled so padded reads are finite (their attention weight is exactly 0). One block
        # past the pool is never handed out: padding rows of static decode steps write there.
        shape = ((num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k, self.v = _zeros(shape, dtype, self.device), _zeros(shape, dtype, self.device)
        self.scratch_slot = num_blocks * block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.version = 0  # changes whenever a block table does: tensors built from them stay valid until then
        self._arange = torch.arange(block_size, device=self.device)

    # ---- allocation ----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: SequenceKV, num_layers: int, num_positions: int) -> int:
        per_layer = -(-num_positions // self.block_size)
        return sum(max(0, per_layer - (len(seq.tables[l]) if l < seq.num_layers else 0))
                   for l in range(num_layers))

    def reserve(self, seq: SequenceKV, num_layers: int, num_positions: int) -> bool:
        """Grow `seq` to hold `num_positions` in layers 1..num_layers; False (and no change) when
        the pool is short."""
        if self.blocks_needed(seq, num_layers, num_positions) > len(self._free):
            return False
        per_layer = -(-num_positions // self.block_size)
        while seq.num_layers < num_layers:
            seq.tables.append([])
        for table in seq.tables[:num_layers]:
            if len(table) < per_layer:
                self.version += 1
            while len(table) < per_layer:
                table.append(self._free.popleft())
        seq.capacity = min(len(t) for t in seq.tables) * self.block_size
        return True

    def release(self, seq: SequenceKV) -> None:
        for table in seq.tables:
            self._free.extend(table)
        seq.tables, seq.capacity = [], 0
        self.version += 1

    # ---- addressing ----------------------------------------------------------------------
    def block_tables(self, tables: list[list[int]], num_positions: int) -> torch.Tensor:
        """The blocks holding positions 0..num_positions-1, long [len(tables), width] on the
        cache's device (tables shorter than that are padded with block 0; callers mask those)."""
        width = -(-num_positions // self.block_size)
        return torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables],
                            dtype=torch.long, device=self.device).view(len(tables), width)

    def flat_slots(self, block_tables: torch.Tensor, num_positions: int) -> torch.Tensor:
        """Slot indices [n, num_positions] of positions 0..num_positions-1 of block tables [n, W]."""
        flat = (block_tables[:, :, None] * self.block_size + self._arange).view(block_tables.shape[0], -1)
        return flat[:, :num_positions]

    def slots_at(self, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Slot of positions[i] in block table i: [n] from [n, W] and [n]."""
        blocks = block_tables.gather(1, (positions // self.block_size)[:, None])[:, 0]
        return blocks * self.block_size + positions % self.block_size

    def slots(self, tables: list[list[int]], num_positions: int) -> torch.Tensor:
        """Flat slot indices [len(tables), num_positions] of positions 0..num_positions-1."""
        return self.flat_slots(self.block_tables(tables, num_positions), num_positions)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(0, slots, k)
        self.v.index_copy_(0, slots, v)
