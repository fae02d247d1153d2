"""The engine's copy of a checkpoint: float embeddings, norms and head, and fused ternary
projections (q/k/v as one, gate/up as one), on the chosen backend's device, wrapped in what the
architecture adds around them (engine/projection.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.checkpoint import Checkpoint, pack_state
from models.config import BitSkipConfig
from models.functional import layer_norm, rms_norm

from .backends import Backend, make_backend
from .kernels import PackedWeight, TernaryLinear
from .projection import Projection, SandwichTernaryLinear


@dataclass
class Norm:
    """An RMSNorm (`bias` None: the backend may fuse it into the projection after it) or a
    LayerNorm with weight and bias (config.norm_type "layer")."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return rms_norm(x, self.weight, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)


@dataclass
class LayerWeights:
    input_norm: Norm | None             # pre-norm blocks
    post_attention_norm: Norm
    qkv_proj: TernaryLinear
    o_proj: TernaryLinear
    gate_up_proj: TernaryLinear         # gate and up side by side, or up alone (mlp_gated false)
    down_proj: TernaryLinear
    attn_sub_norm: Norm | None = None   # architecture options (config.attn_sub_norm, ...)
    ffn_sub_norm: Norm | None = None
    post_feedforward_norm: Norm | None = None  # post-norm blocks


@dataclass
class ModelWeights:
    config: BitSkipConfig
    backend: Backend
    embed_tokens: torch.Tensor
    layers: list[LayerWeights]
    norm: Norm
    lm_head: torch.Tensor
    embed_positions: torch.Tensor | None = None  # learned absolute positions (config.learned_positions)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, backend: Backend | None = None) -> "ModelWeights":
        return cls.from_tensors(ckpt.config, ckpt.tensors, backend)

    @classmethod
    def from_tensors(cls, config: BitSkipConfig, tensors: dict[str, torch.Tensor],
                     backend: Backend | None = None) -> "ModelWeights":
        """Build from packed or latent tensors (latent ones are packed first); default backend:
        torch on the CPU."""
        t = pack_state(tensors, config)
        backend = backend or make_backend("cpu", "torch")

        def dense(name: str) -> torch.Tensor:
            return t[name].to(backend.device, torch.float32)

        def norm(prefix: str, kind: str = config.norm_type) -> Norm | None:
            if f"{prefix}.weight" not in t:
                return None
            bias = dense(f"{prefix}.bias") if kind == "layer" else None
            return Norm(dense(f"{prefix}.weight"), bias, config.rms_norm_eps)

        def product(prefixes: list[str], bits: int) -> TernaryLinear:
            parts = [PackedWeight(t[f"{n}.qweight"], float(t[f"{n}.weight_scale"])) for n in prefixes]
            if config.hadamard and config.hadamard_transform == "sandwich":
                sandwiches = [SandwichTernaryLinear(p, bits, backend.device) for p in parts]
                return sandwiches[0] if len(parts) == 1 else Projection(sandwiches, None, 0.0, "none")
            return backend.projection(parts, bits, config.hadamard)

        def proj(layer: int, *names: str) -> TernaryLinear:
            prefixes = [f"model.layers.{layer}.{n}" for n in names]
            bits = config.projection_bits(names[0])
            if not config.projection_norm:
                core = product(prefixes, bits)
                return core if config.projection_act == "none" else Projection([core], None, 0.0, config.projection_act)
            # Each projection normalizes its own input, so q/k/v cannot share one quantization.
            norms = [(dense(f"{n}.layer_norm.weight"), dense(f"{n}.layer_norm.bias")) for n in prefixes]
            return Projection([product([n], bits) for n in prefixes], norms, config.rms_norm_eps,
                              config.projection_act)

        layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}"
            layers.append(LayerWeights(
                input_norm=norm(f"{p}.input_layernorm"),
                post_attention_norm=norm(f"{p}.post_attention_layernorm"),
                qkv_proj=proj(i, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                o_proj=proj(i, "self_attn.o_proj"),
                gate_up_proj=proj(i, *(("mlp.gate_proj",) if config.mlp_gated else ()), "mlp.up_proj"),
                down_proj=proj(i, "mlp.down_proj"),
                attn_sub_norm=norm(f"{p}.self_attn.attn_sub_norm", "rms") if config.attn_sub_norm else None,
                ffn_sub_norm=norm(f"{p}.mlp.ffn_sub_norm", "rms") if config.ffn_sub_norm else None,
                post_feedforward_norm=norm(f"{p}.post_feedforward_layernorm"),
            ))
        embed = dense("model.embed_tokens.weight")
        head = embed if config.tie_word_embeddings else dense("lm_head.weight")
        positions = dense("model.embed_positions.weight") if config.learned_positions else None
        return cls(config, backend, embed, layers, norm("model.norm"), head, positions)
