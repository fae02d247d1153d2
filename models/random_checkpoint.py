"""Random-weight packed checkpoints for tests and benchmarks (`bitskip init`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint, expected_tensors, load_checkpoint, save_checkpoint
from .config import BitSkipConfig
from .packing import pack_ternary
from .quant import ternarize
from .tokenizer import byte_level_tokenizer, default_generation_config


def random_packed_tensors(config: BitSkipConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Norms 1, embedding and head N(0, 0.02), projections ternarized from N(0, 0.02) latents.

    Built one tensor at a time, so a 1B-parameter model never holds its float latents at once.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, _) in expected_tensors(config, "latent").items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
            continue
        w = torch.randn(shape, generator=gen) * 0.02
        if name.endswith("_proj.weight"):
            codes, gamma = ternarize(w)
            prefix = name[: -len(".weight")]
            out[f"{prefix}.qweight"] = pack_ternary(codes)
            out[f"{prefix}.weight_scale"] = gamma.reshape(())
        else:
            out[name] = w
    return out


def write_random_checkpoint(path: str | Path, config: BitSkipConfig, seed: int = 0) -> Checkpoint:
    """Write a packed random checkpoint with the byte-level tokenizer and load it back."""
    save_checkpoint(path, config, random_packed_tensors(config, seed), byte_level_tokenizer(),
                    default_generation_config())
    return load_checkpoint(path)
