"""Hugging Face BitNet b1.58 directories (config.json `model_type: "bitnet"`), read as one more
configuration of the BitSkip model. docs/BITNET.md describes the mapping; in short:

- config.json: the Llama sizes carry over; the block is ours with `hidden_act` (relu2), both
  sub-norms, RoPE theta from `rope_parameters` (or the older top-level `rope_theta`), 8-bit
  activations and no exit points. `quantization_config` says how projections are stored.
- Tensor names are already ours (Llama names plus `self_attn.attn_sub_norm` and
  `mlp.ffn_sub_norm`); only the projections are re-encoded into our `qweight`/`weight_scale`:
    bitlinear              weight uint8 [N/4, K] in their layout, weight_scale = 1 / gamma
    autobitlinear offline  weight as bitlinear's or ternary floats [N, K], weight_scale = gamma
    autobitlinear online   weight float [N, K], ternarized here by the format's own rule
- Weights in one model.safetensors or in shards listed by model.safetensors.index.json;
  BOS/EOS from generation_config.json (else config.json); the chat template from
  tokenizer_config.json or chat_template.jinja.

Every problem found is reported in one CheckpointError, each naming its file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import (CONFIG_FILE, GENERATION_FILE, PROJECTIONS, WEIGHTS_FILE, Checkpoint,
                         CheckpointError, base_specs, generation_problems, projection_prefix,
                         read_json, read_safetensors, read_tokenizer, read_tokenizer_config)
from .config import BitSkipConfig, ConfigError
from .packing import pack_ternary
from .quant import ternarize

INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPE = "bitnet"
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
QUANTIZATION_MODES = ("offline", "online")

# What transformers' BitNetConfig assumes for a field config.json leaves out.
_HF_DEFAULTS = {"hidden_act": "relu2", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "rope_theta": 500000.0}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


class Quantization(NamedTuple):
    """How config.json's quantization_config says the projections are stored."""

    linear_class: str = "bitlinear"
    mode: str = "offline"


def is_bitnet_config(data: dict | None) -> bool:
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


# ---- config.json ---------------------------------------------------------------------------

def _quantization(data: dict, problems: list[str]) -> Quantization | None:
    q = data.get("quantization_config")
    if q is None:  # a plain float BitNet: the format is ternary, so ternarize at load as online does
        return Quantization("autobitlinear", "online")
    where = f"{CONFIG_FILE}: quantization_config"
    if not isinstance(q, dict):
        problems.append(f"{where} must be an object, got {q!r}")
        return None
    before = len(problems)
    if q.get("quant_method", MODEL_TYPE) != MODEL_TYPE:
        problems.append(f"{where}.quant_method must be 'bitnet', got {q.get('quant_method')!r}")
    linear_class, mode = q.get("linear_class", "bitlinear"), q.get("quantization_mode", "offline")
    if linear_class not in LINEAR_CLASSES:
        problems.append(f"{where}.linear_class must be one of {list(LINEAR_CLASSES)}, got {linear_class!r}")
    if mode not in QUANTIZATION_MODES:
        problems.append(f"{where}.quantization_mode must be one of {list(QUANTIZATION_MODES)}, got {mode!r}")
    if q.get("use_rms_norm"):
        problems.append(f"{where}.use_rms_norm=true (an RMSNorm inside every projection) is not supported")
    skipped = [m for m in q.get("modules_to_not_convert") or []
               if isinstance(m, str) and any(p.split(".")[-1] in m for p in PROJECTIONS)]
    if skipped:
        problems.append(f"{where}.modules_to_not_convert keeps block projections in float "
                        f"({skipped[:3]}); every projection must be ternary")
    return Quantization(linear_class, mode) if len(problems) == before else None


def _rope_theta(data: dict, problems: list[str]) -> float | None:
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        problems.append(f"{CONFIG_FILE}: rope_parameters must be an object, got {rope!r}")
        return None
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        problems.append(f"{CONFIG_FILE}: rope_type {kind!r} is not supported (only 'default' RoPE)")
    return rope.get("rope_theta", data.get("rope_theta", _HF_DEFAULTS["rope_theta"]))


def bitnet_config(data: dict, problems: list[str]) -> tuple[BitSkipConfig | None, Quantization | None]:
    """Our config for a BitNet config.json, and how its projections are stored."""
    missing = [k for k in _REQUIRED if k not in data]
    problems += [f"{CONFIG_FILE}: missing field {k!r}" for k in missing]
    if data.get("attention_bias"):
        problems.append(f"{CONFIG_FILE}: attention_bias=true is not supported (BitNet has no biases)")
    heads = data.get("num_attention_heads")
    head_dim = data.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and heads > 0 \
            and head_dim * heads != data.get("hidden_size"):
        problems.append(f"{CONFIG_FILE}: head_dim={head_dim} times num_attention_heads={heads} must "
                        f"equal hidden_size={data.get('hidden_size')}")
    quant = _quantization(data, problems)
    theta = _rope_theta(data, problems)
    if missing:
        return None, quant
    fields = {k: data[k] for k in _REQUIRED}
    fields.update({k: data.get(k, default) for k, default in _HF_DEFAULTS.items() if k != "rope_theta"})
    try:
        config = BitSkipConfig(
            **fields, num_key_value_heads=data.get("num_key_value_heads") or heads,
            rope_theta=theta, attn_sub_norm=True, ffn_sub_norm=True, activation_bits=8,
            hadamard=False, exit_points=())
    except ConfigError as e:
        problems += [f"{CONFIG_FILE}: {p}" for p in e.problems]
        return None, quant
    except TypeError as e:
        problems.append(f"{CONFIG_FILE}: invalid ({e})")
        return None, quant
    return config, quant


# ---- weights: one file or shards -----------------------------------------------------------

def _read_weights(directory: Path, problems: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors, and the file each came from (or, for a tensor the index places in a shard
    that is missing or lacks it, where the problem was already reported)."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        if not (directory / WEIGHTS_FILE).is_file() and (directory / "pytorch_model.bin").is_file():
            problems.append("pytorch_model.bin: pickled weights are never loaded; save the model "
                            "with safetensors (save_pretrained's default)")
            return {}, {}
        tensors = read_safetensors(directory / WEIGHTS_FILE, problems) or {}
        return tensors, dict.fromkeys(tensors, WEIGHTS_FILE)
    index = read_json(index_path, problems) or {}
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        problems.append(f"{INDEX_FILE}: weight_map must be an object of tensor name -> shard file")
        return {}, {}
    tensors, origin = {}, {}
    for shard in sorted(set(weight_map.values())):
        listed = {n for n, s in weight_map.items() if s == shard}
        path = directory / shard
        if Path(shard).name != shard:
            problems.append(f"{INDEX_FILE}: shard {shard!r} is not a file name in the model directory")
            continue
        origin.update(dict.fromkeys(listed, shard))
        if not path.is_file():
            problems.append(f"{shard}: missing ({INDEX_FILE} lists {len(listed)} tensors in it)")
            continue
        held = read_safetensors(path, problems)
        if held is None:
            continue
        problems += [f"{shard}: lacks tensor '{n}' that {INDEX_FILE} places in it"
                     for n in sorted(listed - held.keys())]
        problems += [f"{shard}: holds tensor '{n}' that {INDEX_FILE} places in "
                     f"{weight_map.get(n, 'no shard')}" for n in sorted(held.keys() - listed)]
        for n in listed & held.keys():
            tensors[n] = held[n]
    return tensors, origin


# ---- projections ---------------------------------------------------------------------------

def unpack_bitnet_codes(packed: torch.Tensor) -> torch.Tensor:
    """Their layout -> raw 2-bit codes: uint8 [N/4, K] holds output rows i*N/4 + r (i = 0..3) of
    column k in bits 2i..2i+1 of byte [r, k]. Returns uint8 [N, K] (3 marks a corrupt field)."""
    r, k = packed.shape
    return ((packed.unsqueeze(0) >> _SHIFTS[:, None, None]) & 3).reshape(4 * r, k)


def _projection_problems(name: str, where: str, weight: torch.Tensor, scale: torch.Tensor | None,
                         shape: tuple[int, int], quant: Quantization) -> list[str]:
    n, k = shape
    packed_ok = quant.linear_class == "bitlinear" or quant.mode == "offline"
    float_ok = quant.linear_class == "autobitlinear"
    got = list(weight.shape)
    if weight.dtype == torch.uint8 and packed_ok:
        if got != [n // 4, k]:
            return [f"{where}: tensor '{name}.weight' (packed) has shape {got}, expected [{n // 4}, {k}]"]
        if bool((unpack_bitnet_codes(weight) == 3).any()):
            return [f"{where}: tensor '{name}.weight' contains the 2-bit code 3, which encodes no ternary value"]
    elif weight.is_floating_point() and float_ok:
        if got != [n, k]:
            return [f"{where}: tensor '{name}.weight' has shape {got}, expected [{n}, {k}]"]
        if not bool(torch.isfinite(weight).all()):
            return [f"{where}: tensor '{name}.weight' contains NaN or Inf values"]
        if quant.mode == "offline" and not bool(((weight == 0) | (weight.abs() == 1)).all()):
            return [f"{where}: tensor '{name}.weight' must hold only -1, 0 and 1 "
                    f"(autobitlinear offline stores ternary weights)"]
    else:
        allowed = ("uint8 (packed)" if packed_ok else "") + (" or " if packed_ok and float_ok else "") \
            + ("a float dtype" if float_ok else "")
        return [f"{where}: tensor '{name}.weight' has dtype {str(weight.dtype).removeprefix('torch.')}, "
                f"expected {allowed} for {quant.linear_class} ({quant.mode})"]
    if quant.mode == "online" and quant.linear_class == "autobitlinear":
        return [] if scale is None else [f"{where}: unexpected tensor '{name}.weight_scale' "
                                         f"(online quantization computes the scale)"]
    if scale is None:
        return [f"{where}: missing tensor '{name}.weight_scale'"]
    values = scale.float().reshape(-1).tolist()
    if len(values) != 1 or not (math.isfinite(values[0]) and values[0] > 0):
        return [f"{where}: tensor '{name}.weight_scale' must be one finite value > 0, got {values[:4]}"]
    return []


def _to_native(weight: torch.Tensor, scale: torch.Tensor | None,
               quant: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    """Our qweight (2-bit codes in DESIGN's layout) and float32 0-dim gamma for one projection."""
    if weight.dtype == torch.uint8:
        ternary = unpack_bitnet_codes(weight).to(torch.int8) - 1
    elif quant.mode == "offline":
        ternary = weight.to(torch.int8)
    else:
        ternary, gamma = ternarize(weight, rule="reciprocal")
        return pack_ternary(ternary), gamma.reshape(())
    stored = scale.double().reshape(())
    # bitlinear divides its output by weight_scale; autobitlinear multiplies by it.
    gamma = 1.0 / stored if quant.linear_class == "bitlinear" else stored
    return pack_ternary(ternary), gamma.float()


def _native_tensors(config: BitSkipConfig, quant: Quantization, tensors: dict[str, torch.Tensor],
                    origin: dict[str, str], problems: list[str], missing_in: str) -> dict[str, torch.Tensor]:
    """Checks every tensor against `config` and returns our packed, checkpoint-named tensors."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for name, (shape, dtypes) in base_specs(config).items():
        t = tensors.get(name)
        used.add(name)
        if t is None:
            if name not in origin:  # else its shard's problem is already reported
                problems.append(f"{missing_in}: missing tensor '{name}'")
        elif tuple(t.shape) != shape or t.dtype not in dtypes:
            problems.append(f"{origin[name]}: tensor '{name}' is {str(t.dtype).removeprefix('torch.')} "
                            f"{list(t.shape)}, expected a float tensor of shape {list(shape)}")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{origin[name]}: tensor '{name}' contains NaN or Inf values")
        else:
            out[name] = t.float()
    for i in range(config.num_hidden_layers):
        for proj, shape in config.projection_shapes().items():
            prefix = projection_prefix(i, proj)
            weight, scale = tensors.get(f"{prefix}.weight"), tensors.get(f"{prefix}.weight_scale")
            used |= {f"{prefix}.weight", f"{prefix}.weight_scale"}
            if weight is None:
                if f"{prefix}.weight" not in origin:
                    problems.append(f"{missing_in}: missing tensor '{prefix}.weight'")
                continue
            found = _projection_problems(prefix, origin[f"{prefix}.weight"], weight, scale, shape, quant)
            problems += found
            if not found:
                out[f"{prefix}.qweight"], out[f"{prefix}.weight_scale"] = _to_native(weight, scale, quant)
    # transformers ties a tied head whatever the file holds, and recomputes RoPE frequencies.
    ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
    problems += [f"{origin[n]}: unexpected tensor '{n}'" for n in sorted(tensors)
                 if n not in used | ignored and not n.endswith("rotary_emb.inv_freq")]
    return out


# ---- the directory -------------------------------------------------------------------------

def load_bitnet_checkpoint(path: str | Path) -> Checkpoint:
    """Read, validate and convert a Hugging Face BitNet directory into a packed Checkpoint."""
    directory = Path(path)
    problems: list[str] = []
    data = read_json(directory / CONFIG_FILE, problems) or {}
    config, quant = bitnet_config(data, problems)
    tensors, origin = _read_weights(directory, problems)
    tokenizer = read_tokenizer(directory, problems)
    tokenizer_config = read_tokenizer_config(directory, problems)
    if (directory / GENERATION_FILE).exists():
        generation = read_json(directory / GENERATION_FILE, problems) or {}
        where = GENERATION_FILE
    else:
        generation, where = {k: data[k] for k in ("bos_token_id", "eos_token_id") if data.get(k) is not None}, CONFIG_FILE
    problems += [p.replace(GENERATION_FILE, where, 1)
                 for p in generation_problems(generation, config.vocab_size if config else None)]
    native = {}
    if config is not None and quant is not None and tensors:
        sharded = (directory / INDEX_FILE).is_file()
        native = _native_tensors(config, quant, tensors, origin, problems,
                                 INDEX_FILE if sharded else WEIGHTS_FILE)
    if config is not None and tokenizer is not None and tokenizer.get_vocab_size() > config.vocab_size:
        problems.append(f"tokenizer.json has {tokenizer.get_vocab_size()} tokens but "
                        f"{CONFIG_FILE} vocab_size={config.vocab_size}")
    if problems:
        raise CheckpointError(directory, problems)
    return Checkpoint(directory, config, native, tokenizer, generation, tokenizer_config)
