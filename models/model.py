"""Reference BitSkip modules: DESIGN section 2 written plainly, trainable with the
straight-through estimator. The engine is tested against these (same inputs, same outputs)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import BitSkipConfig
from .functional import (activation, apply_rope, attention, causal_attention_fast, causal_mask,
                         gated_activation, layer_norm, rms_norm, rope_tables)
from .quant import activation_qmax, hadamard_transform, quantize_activations, ternarize


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(RMSNorm):
    def __init__(self, size: int, eps: float):
        super().__init__(size, eps)
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def norm(size: int, config: BitSkipConfig) -> RMSNorm:
    """The block norm the config's norm_type names."""
    return (LayerNorm if config.norm_type == "layer" else RMSNorm)(size, config.rms_norm_eps)


class BitLinear(nn.Module):
    """y = (q @ T^T) * (s / Q) * gamma, from a latent float weight [out, in].

    Architecture options (bitskip-ref) add a LayerNorm of the input (projection_norm), an
    activation of the output (projection_act) and, for hadamard_transform "sandwich", the
    unnormalized transform of the codes and of the output instead of the rotation before them."""

    def __init__(self, in_features: int, out_features: int, config: BitSkipConfig, bits: int | None = None):
        super().__init__()
        self.in_features = in_features
        self.bits = bits or config.activation_bits
        self.hadamard = config.hadamard
        self.sandwich = config.hadamard and config.hadamard_transform == "sandwich"
        self.act = config.projection_act
        self.layer_norm = LayerNorm(in_features, config.rms_norm_eps) if config.projection_norm else None
        self.weight = nn.Parameter(torch.empty(out_features, config.in_features(in_features)))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.hadamard and not self.sandwich:
            x = hadamard_transform(x, self.weight.shape[1])
        q, s = quantize_activations(x, self.bits)
        t, gamma = ternarize(self.weight)
        # q and t hold small integers, so this float32 product is the exact integer dot product.
        if not self.sandwich:
            return activation(F.linear(q, t) * (s / activation_qmax(self.bits)) * gamma, self.act)
        y = F.linear(hadamard_transform(q, normalized=False), t) * (s / activation_qmax(self.bits)) * gamma
        return activation(hadamard_transform(y, normalized=False), self.act)


class Attention(nn.Module):
    def __init__(self, config: BitSkipConfig):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, hd)
        bits = config.projection_bits("self_attn.q_proj")
        self.q_proj = BitLinear(h, self.num_heads * hd, config, bits)
        self.k_proj = BitLinear(h, self.num_kv_heads * hd, config, bits)
        self.v_proj = BitLinear(h, self.num_kv_heads * hd, config, bits)
        self.o_proj = BitLinear(self.num_heads * hd, h, config, bits)
        self.rope, self.causal = config.rope, config.causal
        # Optional sub-norm on the attention output (BitNet b1.58), before o_proj quantizes it.
        self.attn_sub_norm = RMSNorm(self.num_heads * hd, config.rms_norm_eps) if config.attn_sub_norm else None
        self.exact = True  # float64 attention (golden numerics); training switches it off for speed

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if not self.causal:  # every position attends to every other (public BitSkip code, gen. 1)
            out = attention(q, k, v, torch.ones(1, t, t, dtype=torch.bool))
        else:
            out = attention(q, k, v, causal_mask(t, t)) if self.exact else causal_attention_fast(q, k, v)
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: BitSkipConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = BitLinear(h, f, config) if config.mlp_gated else None
        self.up_proj = BitLinear(h, f, config)
        self.down_proj = BitLinear(f, h, config)
        self.hidden_act = config.hidden_act
        # Optional sub-norm on act(gate) * up (BitNet b1.58), before down_proj quantizes it.
        self.ffn_sub_norm = RMSNorm(f, config.rms_norm_eps) if config.ffn_sub_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:  # gate-less: down(act(up(x)))
            return self.down_proj(activation(self.up_proj(x), self.hidden_act))
        y = gated_activation(self.gate_proj(x), self.up_proj(x), self.hidden_act)
        if self.ffn_sub_norm is not None:
            y = self.ffn_sub_norm(y)
        return self.down_proj(y)


class Block(nn.Module):
    """Pre-norm (BitSkip, BitNet), or post-norm (public BitSkip code): normalize after each
    residual add, the attention reading a parameter-free LayerNorm of h (attn_input_norm)."""

    def __init__(self, config: BitSkipConfig):
        super().__init__()
        h = config.hidden_size
        self.post_norm, self.attn_input_norm = config.post_norm, config.attn_input_norm
        if not self.post_norm:
            self.input_layernorm = norm(h, config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = norm(h, config)
        self.mlp = MLP(config)
        if self.post_norm:
            self.post_feedforward_layernorm = norm(h, config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = layer_norm(h, None, None, 1e-5) if self.attn_input_norm else h
            h = self.post_attention_layernorm(h + self.self_attn(x, cos, sin))
            return self.post_feedforward_layernorm(h + self.mlp(h))
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, config: BitSkipConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        if config.learned_positions:  # added to the token embedding
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            nn.init.normal_(self.embed_positions.weight, std=0.02)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = norm(config.hidden_size, config)


class BitSkipForCausalLM(nn.Module):
    """Decoder plus one shared head; `forward` returns logits at any set of exit layers."""

    def __init__(self, config: BitSkipConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        cos, sin = rope_tables(config.max_position_embeddings, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def set_exact_attention(self, exact: bool) -> None:
        """float64 attention (the engine's numerics) or fast float32 attention (training)."""
        for block in self.model.layers:
            block.self_attn.exact = exact

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared head: lm_head(norm_final(h)), applied at every exit."""
        return self.lm_head(self.model.norm(h))

    def hidden_states(self, input_ids: torch.Tensor, num_layers: int | None = None,
                      keep: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[h_0, h_1, ..., h_k] for blocks 1..k (k = num_layers, default L).

        `keep` [B, L] bool (layer dropout): where False, block l is the identity for that sample.
        """
        k = self.config.num_hidden_layers if num_layers is None else num_layers
        if not 1 <= k <= self.config.num_hidden_layers:
            raise ValueError(f"exit layer must be in 1..{self.config.num_hidden_layers}, got {k}")
        t = input_ids.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        h = self.model.embed_tokens(input_ids)
        if self.config.learned_positions:
            h = h + self.model.embed_positions.weight[:t]
        states = [h]
        for layer, block in enumerate(self.model.layers[:k], start=1):
            h = states[-1]
            out = block(h, cos, sin)
            if keep is not None:
                out = torch.where(keep[:, layer - 1, None, None], out, h)
            states.append(out)
        return states

    def forward(self, input_ids: torch.Tensor, exit_layers: Iterable[int] | None = None
                ) -> dict[int, torch.Tensor]:
        """Logits [B, T, vocab] at each requested exit layer (1-based; default: the full model)."""
        layers = sorted(set(exit_layers or [self.config.num_hidden_layers]))
        states = self.hidden_states(input_ids, layers[-1])
        return {k: self.exit_logits(states[k]) for k in layers}
