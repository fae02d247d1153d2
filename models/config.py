"""BitSkipConfig: the architecture of a BitSkip model, validated once at the edge."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1

# variant name -> (activation_bits, hadamard), DESIGN section 2.
VARIANTS = {"v1": (8, False), "v2": (4, True), "v3": (8, True)}

# Architecture options: the ways one decoder block may differ between model families. Each is a
# config field with a default that keeps the BitSkip block; models.model, the engine's runner and
# every backend read them from the config, so a family is a configuration, never a second model.
HIDDEN_ACTS = ("silu", "relu2")  # gated MLP: act(gate) * up; relu2 = ReLU squared (BitNet b1.58)
NORM_TYPES = ("rms", "layer")
PROJECTION_ACTS = ("none", "relu2")
HADAMARD_TRANSFORMS = ("rotate", "sandwich")


class ConfigError(ValueError):
    """A config that cannot describe a model; `problems` lists every reason."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class BitSkipConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attn_sub_norm: bool = False   # RMSNorm on the attention output, before o_proj
    ffn_sub_norm: bool = False    # RMSNorm on act(gate) * up, before down_proj
    activation_bits: int = 8
    hadamard: bool = False
    # Architecture options of the "bitskip-ref" family (checkpoints of the public training code,
    # CHECKPOINTS.md); the defaults keep the BitSkip block.
    norm_type: str = "rms"                  # "layer": LayerNorm with weight and bias, everywhere
    post_norm: bool = False                 # h = norm(h + attn(.)); h = norm(h + mlp(h))
    attn_input_norm: bool = False           # post-norm: parameter-free LayerNorm on the attention input
    projection_norm: bool = False           # affine LayerNorm on each projection's own input
    projection_act: str = "none"            # applied to every projection's output
    hadamard_transform: str = "rotate"      # "sandwich": unnormalized FWHT of codes and of output
    attention_activation_bits: int | None = None  # q/k/v/o bits when they differ from activation_bits
    mlp_gated: bool = True                  # False: down(act(up(x))), no gate_proj
    rope: bool = True
    learned_positions: bool = False         # embed_positions added to the token embedding
    causal: bool = True
    exit_points: tuple[int, ...] = field(default=())
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        # JSON gives lists; a frozen config holds tuples so it can be hashed and shared.
        object.__setattr__(self, "exit_points", tuple(self.exit_points))
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def activation_qmax(self) -> int:
        return 2 ** (self.activation_bits - 1) - 1

    @property
    def variant(self) -> str | None:
        for name, fields in VARIANTS.items():
            if fields == (self.activation_bits, self.hadamard):
                return name
        return None

    def in_features(self, logical: int) -> int:
        """Stored in-dimension of a projection whose input has `logical` features.

        Hadamard models zero-pad the input to the next power of two (DESIGN section 2).
        """
        return next_power_of_two(logical) if self.hadamard else logical

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Stored [out, in] of each projection of one block, keyed by its name in the checkpoint."""
        h, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        kv = self.num_key_value_heads * hd
        return {
            "self_attn.q_proj": (self.num_attention_heads * hd, self.in_features(h)),
            "self_attn.k_proj": (kv, self.in_features(h)),
            "self_attn.v_proj": (kv, self.in_features(h)),
            "self_attn.o_proj": (h, self.in_features(self.num_attention_heads * hd)),
            **({"mlp.gate_proj": (f, self.in_features(h))} if self.mlp_gated else {}),
            "mlp.up_proj": (f, self.in_features(h)),
            "mlp.down_proj": (h, self.in_features(f)),
        }

    def projection_bits(self, name: str) -> int:
        """Activation bits of projection `name` (a key of projection_shapes)."""
        if name.startswith("self_attn.") and self.attention_activation_bits is not None:
            return self.attention_activation_bits
        return self.activation_bits

    def norm_shapes(self) -> dict[str, int]:
        """Size of each norm of one block, keyed by its name in the checkpoint (a LayerNorm
        stores `.weight` and `.bias`, an RMSNorm `.weight`). A post-norm block normalizes after
        each residual add; each projection may also normalize its own input."""
        h = self.hidden_size
        shapes = ({"post_attention_layernorm": h, "post_feedforward_layernorm": h} if self.post_norm
                  else {"input_layernorm": h, "post_attention_layernorm": h})
        if self.attn_sub_norm:
            shapes["self_attn.attn_sub_norm"] = self.num_attention_heads * self.head_dim
        if self.ffn_sub_norm:
            shapes["mlp.ffn_sub_norm"] = self.intermediate_size
        if self.projection_norm:
            for name in self.projection_shapes():
                shapes[f"{name}.layer_norm"] = self.intermediate_size if name == "mlp.down_proj" else h
        return shapes

    def num_parameters(self) -> int:
        per_layer = (sum(n * k for n, k in self.projection_shapes().values())
                     + sum(self.norm_shapes().values()))
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + self.num_hidden_layers * per_layer

    # ---- validation ----------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every reason this config is invalid (empty when it is valid)."""
        out = []
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if out:
            return out
        if self.hidden_size % self.num_attention_heads:
            out.append(f"hidden_size ({self.hidden_size}) must be divisible by "
                       f"num_attention_heads ({self.num_attention_heads})")
        elif self.rope and self.head_dim % 2:
            out.append(f"head_dim = hidden_size / num_attention_heads = {self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            out.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_key_value_heads})")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 4:
                out.append(f"{name} ({getattr(self, name)}) must be a multiple of 4 (four 2-bit codes a byte)")
        if self.activation_bits not in (4, 8):
            out.append(f"activation_bits must be 4 or 8, got {self.activation_bits!r}")
        elif max(self.in_features(self.hidden_size), self.in_features(self.intermediate_size)) \
                * self.activation_qmax >= 2 ** 24:
            out.append("in-features times the activation range must stay under 2^24 for exact accumulation")
        if not isinstance(self.hadamard, bool):
            out.append(f"hadamard must be true or false, got {self.hadamard!r}")
        for name in ("tie_word_embeddings", "attn_sub_norm", "ffn_sub_norm", "post_norm", "attn_input_norm",
                     "projection_norm", "mlp_gated", "rope", "learned_positions", "causal"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, allowed in (("hidden_act", HIDDEN_ACTS), ("norm_type", NORM_TYPES),
                              ("projection_act", PROJECTION_ACTS), ("hadamard_transform", HADAMARD_TRANSFORMS)):
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.attention_activation_bits not in (None, 4, 8):
            out.append(f"attention_activation_bits must be 4, 8 or null, got {self.attention_activation_bits!r}")
        if self.hadamard and self.hadamard_transform == "sandwich":
            sizes = (self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim)
            if any(n & (n - 1) for n in sizes):
                out.append(f"hadamard_transform 'sandwich' needs power-of-two projection sizes, got {sizes}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            out.append(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            out.append(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        points = self.exit_points
        if any(not isinstance(p, int) or not 1 <= p <= self.num_hidden_layers for p in points):
            out.append(f"exit_points must be layers in 1..{self.num_hidden_layers}, got {list(points)}")
        elif list(points) != sorted(set(points)):
            out.append(f"exit_points must be strictly increasing, got {list(points)}")
        if self.format_version != FORMAT_VERSION:
            out.append(f"format_version {self.format_version!r} is not supported (expected {FORMAT_VERSION})")
        return out

    # ---- (de)serialization ---------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exit_points"] = list(self.exit_points)
        d["model_type"] = "bitskip"
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "BitSkipConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = {"model_type", "architectures", "torch_dtype"}
        problems = [f"unknown field {k!r}" for k in d if k not in known | ignored]
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        problems += [f"missing field {k!r}" for k in missing]
        if problems:
            raise ConfigError(problems, source)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except ConfigError as e:
            raise ConfigError(e.problems, source) from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BitSkipConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError([f"cannot read JSON: {e}"], str(path)) from None
        if not isinstance(d, dict):
            raise ConfigError(["top level must be a JSON object"], str(path))
        return cls.from_dict(d, str(path))

    def with_variant(self, variant: str) -> "BitSkipConfig":
        if variant not in VARIANTS:
            raise ConfigError([f"variant must be one of {sorted(VARIANTS)}, got {variant!r}"])
        bits, hadamard = VARIANTS[variant]
        return dataclasses.replace(self, activation_bits=bits, hadamard=hadamard)


def default_exit_points(num_layers: int, every: int = 6) -> tuple[int, ...]:
    """Every `every` layers below the last (24 layers: 6, 12, 18)."""
    return tuple(range(every, num_layers, every))


PRESETS: dict[str, BitSkipConfig] = {
    "tiny-test": BitSkipConfig(
        vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
        exit_points=(1, 2, 3)),
    # The bundled default model: 24 layers (so exit 18 of 24 means what it means in the paper),
    # narrow enough to train on two CPU cores in about two hours.
    "small-24l": BitSkipConfig(
        vocab_size=4096, hidden_size=128, num_hidden_layers=24, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=384, max_position_embeddings=256,
        exit_points=default_exit_points(24)),
    "paper-1b": BitSkipConfig(
        vocab_size=50257, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=4096, max_position_embeddings=512,
        exit_points=default_exit_points(24)),
    # The dimensions of Microsoft's BitNet b1.58 2B-4T (random weights: a scale check). Not
    # trained for early exit, so no exit points.
    "bitnet-2b": BitSkipConfig(
        vocab_size=128256, hidden_size=2560, num_hidden_layers=30, num_attention_heads=20,
        num_key_value_heads=5, intermediate_size=6912, max_position_embeddings=4096,
        rope_theta=500000.0, tie_word_embeddings=True, hidden_act="relu2", attn_sub_norm=True,
        ffn_sub_norm=True),
}


def preset(name: str, variant: str = "v1") -> BitSkipConfig:
    if name not in PRESETS:
        raise ConfigError([f"preset must be one of {sorted(PRESETS)}, got {name!r}"])
    return PRESETS[name].with_variant(variant)
