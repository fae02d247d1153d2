"""Checkpoints of the public BitSkip training code ("bitskip-ref", CHECKPOINTS.md): find the
files, read them without unpickling anything, apply the config defaults and validate every
tensor. The result keeps that code's own tensor names; `models/ref_import.py` maps it onto our
model family.

Every problem is collected and raised in one RefCheckpointError, each line naming its file.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

FAMILIES = ("bitlinear", "hadamard")
GENERATIONS = (1, 2)
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJ = ("up_proj", "down_proj")
# Training-only state the forward never reads (CHECKPOINTS.md).
IGNORED = (".routing_module.", "layer_skipping.", "early_exit_curriculum", ".weight_scale")


class RefCheckpointError(Exception):
    def __init__(self, path: str | Path, problems: list[str]):
        self.path, self.problems = str(path), list(problems)
        super().__init__(f"cannot import bitskip-ref checkpoint {self.path}:"
                         + "".join(f"\n  - {p}" for p in self.problems))


@dataclass(frozen=True)
class RefConfig:
    """The architecture as that code builds it (defaults applied, KV heads derived)."""

    family: str                 # "bitlinear" (V1) or "hadamard" (HBitLinear)
    generation: int             # 1: no causal mask; 2: causal, orthonormal padded Hadamard
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    ffn_size: int
    max_position_embeddings: int
    activation_bits: int = 8
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def causal(self) -> bool:
        return self.generation >= 2

    def projection_bits(self, name: str) -> int:
        """First-generation Hadamard q/k/v/o quantize to 4 bits whatever the config says."""
        if self.family == "hadamard" and self.generation == 1 and name in ATTN_PROJ:
            return 4
        return self.activation_bits

    def stored_in(self, logical: int) -> int:
        """Weight in-dimension: the second generation zero-pads Hadamard inputs to a power of 2."""
        if self.family == "hadamard" and self.generation == 2:
            return 1 << (logical - 1).bit_length()
        return logical

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each projection, keyed by its name below `layers.{i}.`."""
        h, f, kv = self.hidden_size, self.ffn_size, self.num_key_value_heads * self.head_dim
        return {"self_attn.q_proj": (h, self.stored_in(h)), "self_attn.k_proj": (kv, self.stored_in(h)),
                "self_attn.v_proj": (kv, self.stored_in(h)), "self_attn.o_proj": (h, self.stored_in(h)),
                "feed_forward.up_proj": (f, self.stored_in(h)),
                "feed_forward.down_proj": (h, self.stored_in(f))}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward reads: name -> shape."""
        h = self.hidden_size
        out = {"embed_tokens.weight": (self.vocab_size, h),
               "embed_positions.weight": (self.max_position_embeddings, h),
               "layer_norm.weight": (h,), "layer_norm.bias": (h,),
               "lm_head.weight": (self.vocab_size, h)}
        for i in range(self.num_hidden_layers):
            for norm in ("self_attn_norm", "feed_forward_norm"):
                out[f"layers.{i}.{norm}.norm.weight"] = (h,)
                out[f"layers.{i}.{norm}.norm.bias"] = (h,)
            for name, (n, k) in self.projection_shapes().items():
                out[f"layers.{i}.{name}.weight"] = (n, k)
                if self.family == "hadamard":
                    logical = self.ffn_size if name.endswith("down_proj") else h
                    out[f"layers.{i}.{name}.layer_norm.weight"] = (logical,)
                    out[f"layers.{i}.{name}.layer_norm.bias"] = (logical,)
        return out


@dataclass
class RefCheckpoint:
    path: Path                          # the weights file
    form: str                           # "model_full.pt", "wrapper .pt" or "safetensors"
    config: RefConfig
    tensors: dict[str, torch.Tensor]    # their names; values in the stored dtype
    dtype: torch.dtype                  # of the projection weights (gamma is computed in it)


# ---- finding and reading the files -----------------------------------------------------------

def find_weights(src: Path) -> Path:
    """The weights file of `src` (a file, or a directory holding one)."""
    if src.is_file():
        return src
    if not src.is_dir():
        raise RefCheckpointError(src, [f"{src}: no such file or directory"])
    for name in ("model_full.pt", "model.safetensors"):
        if (src / name).is_file():
            return src / name
    candidates = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.pt"))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise RefCheckpointError(src, [f"{src}: expected one weights file (model_full.pt, model.safetensors, "
                                   f"<name>.safetensors or a .pt state dict), found {found}"])


def _load_pt(path: Path, problems: list[str]) -> tuple[dict | None, dict | None, str]:
    """(state dict, embedded config dict, form) from a torch.save file, never unpickling."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problems.append(f"{path.name}: holds pickled Python objects (for example a config class), "
                        f"which are never unpickled because that would run code from the file; "
                        f"save the config as a plain dict or as config.json ({first})")
        return None, None, "pt"
    except Exception as e:  # truncated or not a torch file at all
        problems.append(f"{path.name}: cannot be read by torch.load ({type(e).__name__}: {e})")
        return None, None, "pt"
    if not isinstance(obj, dict):
        problems.append(f"{path.name}: expected a dict, got {type(obj).__name__}")
        return None, None, "pt"
    for key in ("model_state_dict", "state_dict"):
        if isinstance(obj.get(key), dict):
            config = obj.get("config")
            return obj[key], config if isinstance(config, dict) else None, "model_full.pt"
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, "wrapper .pt"
    problems.append(f"{path.name}: has no 'model_state_dict' and is not a state dict "
                    f"(keys: {sorted(map(str, obj))[:8]})")
    return None, None, "pt"


def _load_safetensors(path: Path, problems: list[str]) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        problems.append(f"{path.name}: cannot be read as safetensors ({type(e).__name__}: {e})")
        return None


def _unwrap(tensors: dict[str, torch.Tensor], path: Path, problems: list[str]) -> dict:
    """Strip the `model.` prefix some wrappers add and drop their duplicate head."""
    if not any(k.startswith("model.") for k in tensors):
        return tensors
    out = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    for k, v in tensors.items():
        if k.startswith("model."):
            continue
        if k in out and not torch.equal(out[k], v):
            problems.append(f"{path.name}: '{k}' and 'model.{k}' differ; cannot tell which to use")
        out.setdefault(k, v)
    return out


def _read_config(directory: Path, embedded: dict | None, problems: list[str]) -> dict | None:
    path = directory / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"config.json: cannot be read ({e})")
            return None
        if isinstance(data, dict):
            return data
        problems.append("config.json: top level must be a JSON object")
        return None
    if embedded is not None:
        return embedded
    problems.append(f"config.json: missing beside the weights (and the weights file embeds no config)")
    return None


# ---- config ------------------------------------------------------------------------------------

def _int_field(cfg: dict, names: tuple[str, ...], problems: list[str], default=None):
    for name in names:
        if name in cfg:
            v = cfg[name]
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
            problems.append(f"config.json: {name} must be a positive integer, got {v!r}")
            return None
    if default is None:
        problems.append(f"config.json: missing field {names[0]!r}")
    return default


def _family(tensors: dict[str, torch.Tensor]) -> str | None:
    if "layers.0.self_attn.q_proj.weight" not in tensors or "embed_positions.weight" not in tensors:
        return None
    return "hadamard" if any(k.endswith(".layer_norm.weight") for k in tensors) else "bitlinear"


def ref_config(cfg: dict, tensors: dict[str, torch.Tensor], generation: int,
               problems: list[str]) -> RefConfig | None:
    """The model's architecture from config.json, with that code's defaults (CHECKPOINTS.md)."""
    family = _family(tensors)
    if family is None:
        sample = ", ".join(sorted(tensors)[:4])
        problems.append("unknown model family: the tensors are neither the BitLinear nor the "
                        "HBitLinear layout of the BitSkip training code (expected "
                        f"'layers.0.self_attn.q_proj.weight' and 'embed_positions.weight'; found {sample}, ...)")
        return None
    if generation not in GENERATIONS:
        problems.append(f"generation must be one of {GENERATIONS}, got {generation!r}")
        return None
    sizes = {name: _int_field(cfg, (name,), problems) for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")}
    bits = _int_field(cfg, ("activation_bits",), problems, 8)
    ratio = cfg.get("mlp_ratio", 2.0)
    eps = cfg.get("layer_norm_eps", cfg.get("rms_norm_eps", 1e-5))
    theta = cfg.get("rope_theta", 10000.0)
    if bits not in (4, 8):
        problems.append(f"config.json: activation_bits must be 4 or 8, got {bits!r}")
    for name, v in (("mlp_ratio", ratio), ("layer_norm_eps", eps), ("rope_theta", theta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            problems.append(f"config.json: {name} must be a positive number, got {v!r}")
    if None in sizes.values() or problems:
        return None
    h, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if h % heads:
        problems.append(f"config.json: hidden_size {h} is not divisible by num_attention_heads {heads}")
        return None
    kv = _int_field(cfg, ("num_key_value_heads", "num_kv_heads"), problems, 0)
    if kv == 0:  # absent: the k_proj rows are kv_heads * head_dim
        k = tensors.get("layers.0.self_attn.k_proj.weight")
        rows = k.shape[0] if k is not None and k.dim() == 2 else 0
        kv = rows * heads // h
        if rows == 0 or rows * heads % h:
            problems.append(f"config.json has no num_key_value_heads and cannot derive it: "
                            f"k_proj has {rows} rows, not a multiple of head_dim {h // heads}")
            return None
    if kv is None:
        return None
    if heads % kv:
        problems.append(f"num_attention_heads {heads} is not a multiple of the KV heads {kv}")
        return None
    return RefConfig(family, generation, sizes["vocab_size"], h, sizes["num_hidden_layers"], heads, kv,
                     int(h * ratio), sizes["max_position_embeddings"], bits, float(eps), float(theta))


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tensor_problems(config: RefConfig, tensors: dict[str, torch.Tensor], file: str) -> list[str]:
    """Missing, unexpected, mis-shaped and non-float tensors; Hadamard sizes that fit neither
    generation."""
    problems = []
    expected = config.expected_shapes()
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            problems.append(f"{file}: missing tensor '{name}'")
        elif tuple(t.shape) != shape:
            problems.append(f"{file}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        elif t.dtype not in (torch.float32, torch.bfloat16):
            problems.append(f"{file}: tensor '{name}' has dtype {t.dtype}, expected float32 or bfloat16")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{file}: tensor '{name}' holds NaN or Inf values")
    problems += [f"{file}: unexpected tensor '{n}'" for n in sorted(tensors)
                 if n not in expected and not any(p in n for p in IGNORED)]
    if config.family == "hadamard" and config.generation == 1:
        sizes = {config.hidden_size, config.ffn_size, config.num_key_value_heads * config.head_dim}
        bad = sorted(n for n in sizes if not _power_of_two(n))
        if bad:
            problems.append(f"first-generation Hadamard projections need power-of-two sizes, but "
                            f"{bad} are not: this file fits neither the first generation nor "
                            f"(if its in-dimensions are padded) pass --generation 2")
    return problems


# ---- public API --------------------------------------------------------------------------------

def load_ref_checkpoint(src: str | Path, generation: int = 1) -> RefCheckpoint:
    """Read and validate a checkpoint of the public training code (a file or its directory)."""
    path = find_weights(Path(src))
    problems: list[str] = []
    embedded = None
    if path.suffix == ".safetensors":
        tensors, form = _load_safetensors(path, problems), "safetensors"
    else:
        tensors, embedded, form = _load_pt(path, problems)
    if tensors is None:
        raise RefCheckpointError(path, problems)
    tensors = _unwrap(tensors, path, problems)
    cfg = _read_config(path.parent, embedded, problems)
    config = ref_config(cfg, tensors, generation, problems) if cfg is not None else None
    if config is not None:
        problems += tensor_problems(config, tensors, path.name)
    dtypes = {t.dtype for n, t in tensors.items() if n.endswith("_proj.weight")}
    if len(dtypes) > 1:
        problems.append(f"{path.name}: projection weights mix dtypes {sorted(map(str, dtypes))}")
    if problems:
        raise RefCheckpointError(path, problems)
    kept = {n: t for n, t in tensors.items() if n in config.expected_shapes()}
    return RefCheckpoint(path, form, config, kept, dtypes.pop())
