"""Import a checkpoint of the public BitSkip training code as a configuration of our model
("bitskip-ref"): its math becomes architecture options of BitSkipConfig, its tensors get our
names, and its latent weights are ternarized with its own rule and packed. Nothing about the
math is changed to look like the native model (CHECKPOINTS.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .bitskip_ref import RefCheckpoint, RefCheckpointError, RefConfig, load_ref_checkpoint
from .checkpoint import (CONFIG_FILE, GENERATION_FILE, Checkpoint, CheckpointError, load_checkpoint,
                         save_checkpoint)
from .config import BitSkipConfig, ConfigError
from .hf_bitnet import is_bitnet_config
from .packing import pack_ternary

log = logging.getLogger("bitskip.import")

NON_CAUSAL_WARNING = (
    "this model has no causal mask (first generation of the public BitSkip training code): every "
    "position attends to later positions, so generation recomputes the whole sequence for each "
    "token and its perplexity sees the token it predicts (not a language-model perplexity)")
NO_TOKENIZER_NOTE = "no tokenizer: requests must send token_ids and responses carry token ids only"

# Their names below `layers.{i}.` -> ours below `model.layers.{i}.`.
RENAMES = {"self_attn_norm.norm": "post_attention_layernorm",
           "feed_forward_norm.norm": "post_feedforward_layernorm",
           "feed_forward.": "mlp."}


def native_config(ref: RefConfig) -> BitSkipConfig:
    """The architecture options that reproduce `ref` in our one model code path."""
    hadamard = ref.family == "hadamard"
    first_hadamard = hadamard and ref.generation == 1
    return BitSkipConfig(
        vocab_size=ref.vocab_size, hidden_size=ref.hidden_size, num_hidden_layers=ref.num_hidden_layers,
        num_attention_heads=ref.num_attention_heads, num_key_value_heads=ref.num_key_value_heads,
        intermediate_size=ref.ffn_size, max_position_embeddings=ref.max_position_embeddings,
        rope_theta=ref.rope_theta, rms_norm_eps=ref.layer_norm_eps, activation_bits=ref.activation_bits,
        hadamard=hadamard, norm_type="layer", post_norm=True, attn_input_norm=not hadamard,
        projection_norm=hadamard,
        # V1 squares the ReLU of every projection; the Hadamard projections of the first
        # generation have no activation, those of the second end in one.
        projection_act="none" if first_hadamard else "relu2",
        hadamard_transform="sandwich" if first_hadamard else "rotate",
        attention_activation_bits=4 if first_hadamard else None,
        mlp_gated=False, hidden_act="relu2", rope=not hadamard, learned_positions=True,
        causal=ref.causal, exit_points=tuple(range(1, ref.num_hidden_layers)))


def ternarize_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Their rule: gamma = max(mean|W|, 1e-6) in the stored dtype; T = +1 above gamma / 2,
    -1 below -gamma / 2, else 0. Returns (codes float32, gamma float32 0-dim)."""
    gamma = w.abs().mean().clamp_min(1e-6)
    codes = (w > 0.5 * gamma).float() - (w < -0.5 * gamma).float()
    return codes, gamma.float().reshape(())


def native_tensors(ckpt: RefCheckpoint, pack: bool = True) -> dict[str, torch.Tensor]:
    """Our names; projections packed (2-bit codes and gamma; `pack` False: latent as stored),
    every other tensor float32."""
    out = {}
    for name, t in ckpt.tensors.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            for theirs, ours in RENAMES.items():
                rest = rest.replace(theirs, ours)
            name = f"model.layers.{i}.{rest}"
        elif name == "layer_norm.weight" or name == "layer_norm.bias":
            name = f"model.norm.{name.rsplit('.', 1)[1]}"
        elif name != "lm_head.weight":
            name = f"model.{name}"
        if name.endswith("_proj.weight") and pack:
            codes, gamma = ternarize_ref(t)
            prefix = name.removesuffix(".weight")
            out[f"{prefix}.qweight"] = pack_ternary(codes)
            out[f"{prefix}.weight_scale"] = gamma
        else:
            out[name] = t.float()
    return out


def _tokenizer(path: str | Path | None, vocab_size: int, source: Path) -> Tokenizer | None:
    if path is None:
        return None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        raise RefCheckpointError(source, [f"{path}: cannot be read as a tokenizer.json ({e})"]) from None
    if tokenizer.get_vocab_size() > vocab_size:
        raise RefCheckpointError(source, [f"{path} has {tokenizer.get_vocab_size()} tokens but the "
                                          f"model's vocab_size is {vocab_size}"])
    return tokenizer


def import_ref_checkpoint(src: str | Path, tokenizer: str | Path | None = None,
                          generation: int = 1) -> Checkpoint:
    """A checkpoint of the public training code as a validated in-memory Checkpoint of ours."""
    ref = load_ref_checkpoint(src, generation)
    try:
        config = native_config(ref.config)
    except ConfigError as e:  # sizes our packing cannot hold (e.g. not a multiple of 4)
        raise RefCheckpointError(ref.path, [f"config.json: {p}" for p in e.problems]) from None
    tok = _tokenizer(tokenizer, config.vocab_size, ref.path)
    ckpt = Checkpoint(ref.path.parent, config, native_tensors(ref), tok,
                      {} if tok is not None else {"token_ids_only": True})
    log.info("imported %s (%s, %s, generation %d, %s weights)", ref.path, ref.form, ref.config.family,
             ref.config.generation, str(ref.dtype).removeprefix("torch."))
    return ckpt


def convert_ref_checkpoint(src: str | Path, dst: str | Path, tokenizer: str | Path | None = None,
                           generation: int = 1) -> Checkpoint:
    """Write `src` as a checkpoint directory of ours and return it read back (validated)."""
    ckpt = import_ref_checkpoint(src, tokenizer, generation)
    save_checkpoint(dst, ckpt.config, ckpt.tensors, ckpt.tokenizer, ckpt.generation_config or None)
    return load_checkpoint(dst)


def is_ref_checkpoint(path: str | Path) -> bool:
    """True for a file or directory of the public training code (not one of ours)."""
    path = Path(path)
    if path.is_file():
        return path.suffix in (".pt", ".safetensors") and not (path.parent / GENERATION_FILE).exists() \
            and not _is_native_config(path.parent / CONFIG_FILE)
    return path.is_dir() and not _is_native_config(path / CONFIG_FILE) and (
        (path / "model_full.pt").is_file() or any(path.glob("*.safetensors")) or any(path.glob("*.pt")))


def _is_native_config(path: Path) -> bool:
    """A config.json that load_checkpoint reads: ours, or a Hugging Face BitNet one."""
    try:
        text = path.read_text(encoding="utf-8")
        return '"format_version"' in text or is_bitnet_config(json.loads(text))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def load_model(path: str | Path, tokenizer: str | Path | None = None, generation: int = 1) -> Checkpoint:
    """Our checkpoint directory, or a checkpoint of the public training code imported on the fly;
    `tokenizer` (a tokenizer.json) replaces the checkpoint's own."""
    if is_ref_checkpoint(path):
        return import_ref_checkpoint(path, tokenizer, generation)
    ckpt = load_checkpoint(path)
    if tokenizer is not None:
        ckpt.tokenizer = _tokenizer(tokenizer, ckpt.config.vocab_size, Path(path))
    return ckpt


__all__ = ["NON_CAUSAL_WARNING", "NO_TOKENIZER_NOTE", "CheckpointError", "RefCheckpointError",
           "convert_ref_checkpoint", "import_ref_checkpoint", "is_ref_checkpoint", "load_model",
           "native_config", "native_tensors"]
