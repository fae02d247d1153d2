"""The engine's copy of a checkpoint: float embeddings, norms and head, and fused ternary
projections (q/k/v as one, gate/up as one), on the chosen backend's device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.checkpoint import Checkpoint, pack_state
from models.config import BitSkipConfig

from .backends import Backend, make_backend
from .kernels import PackedWeight, TernaryLinear


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv_proj: TernaryLinear
    o_proj: TernaryLinear
    gate_up_proj: TernaryLinear
    down_proj: TernaryLinear
    attn_sub_norm: torch.Tensor | None = None   # architecture options (config.attn_sub_norm, ...)
    ffn_sub_norm: torch.Tensor | None = None


@dataclass
class ModelWeights:
    config: BitSkipConfig
    backend: Backend
    embed_tokens: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor

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

        def proj(*names: str) -> TernaryLinear:
            parts = [PackedWeight(t[f"{n}.qweight"], float(t[f"{n}.weight_scale"])) for n in names]
            return backend.projection(parts, config.activation_bits, config.hadamard)

        def dense(name: str) -> torch.Tensor:
            return t[name].to(backend.device, torch.float32)

        layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}"
            layers.append(LayerWeights(
                input_norm=dense(f"{p}.input_layernorm.weight"),
                post_attention_norm=dense(f"{p}.post_attention_layernorm.weight"),
                qkv_proj=proj(f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"),
                o_proj=proj(f"{p}.self_attn.o_proj"),
                gate_up_proj=proj(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
                down_proj=proj(f"{p}.mlp.down_proj"),
                attn_sub_norm=dense(f"{p}.self_attn.attn_sub_norm.weight") if config.attn_sub_norm else None,
                ffn_sub_norm=dense(f"{p}.mlp.ffn_sub_norm.weight") if config.ffn_sub_norm else None,
            ))
        embed = dense("model.embed_tokens.weight")
        head = embed if config.tie_word_embeddings else dense("lm_head.weight")
        return cls(config, backend, embed, layers, dense("model.norm.weight"), head)
