"""Small random checkpoints in every file form the public BitSkip training code writes
(CHECKPOINTS.md): model_full.pt + config.json + quantization_config.json, model.safetensors in
fp32 or bf16, and a wrapper .pt with `model.`-prefixed keys and a duplicate head."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMS = ("model_full.pt", "safetensors-fp32", "safetensors-bf16", "wrapper.pt")

# Written as the training scripts write it: intermediate_size is ignored (mlp_ratio 2 gives 128),
# no num_key_value_heads (derived from k_proj: 2).
BASE_CONFIG = {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
               "intermediate_size": 999, "max_position_embeddings": 32, "activation_bits": 8,
               "weight_bits": 1.58}
KV_HEADS = 2


def random_state(config: dict, family: str, seed: int = 0, kv_heads: int = KV_HEADS,
                 pad_to_power_of_two: bool = False) -> dict[str, torch.Tensor]:
    """Random weights in that code's names, with training-only buffers it also saves."""
    g = torch.Generator().manual_seed(seed)
    h, L = config["hidden_size"], config["num_hidden_layers"]
    f = int(h * config.get("mlp_ratio", 2.0))
    kv = kv_heads * h // config["num_attention_heads"]
    v = config["vocab_size"]

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def padded(n):
        return 1 << (n - 1).bit_length() if pad_to_power_of_two else n

    sd = {"embed_tokens.weight": randn(v, h), "embed_positions.weight": randn(config["max_position_embeddings"], h, std=0.5),
          "layer_norm.weight": 1 + randn(h, std=0.2), "layer_norm.bias": randn(h, std=0.1),
          "lm_head.weight": randn(v, h, std=0.2),
          "layer_skipping.skip_masks": torch.zeros(L, dtype=torch.bool),
          "early_exit_curriculum": torch.ones(L, dtype=torch.bool)}
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "feed_forward.up_proj": (f, h), "feed_forward.down_proj": (h, f)}
    for i in range(L):
        p = f"layers.{i}"
        for name, (n, k) in shapes.items():
            sd[f"{p}.{name}.weight"] = randn(n, padded(k), std=0.05)
            sd[f"{p}.{name}.weight_scale"] = torch.ones(1)
            if family == "hadamard":
                sd[f"{p}.{name}.layer_norm.weight"] = 1 + randn(k, std=0.2)
                sd[f"{p}.{name}.layer_norm.bias"] = randn(k, std=0.1)
        for norm in ("self_attn_norm", "feed_forward_norm"):
            sd[f"{p}.{norm}.norm.weight"] = 1 + randn(h, std=0.2)
            sd[f"{p}.{norm}.norm.bias"] = randn(h, std=0.1)
        sd[f"{p}.routing_module.gate.weight"] = randn(1, h)
    return sd


def write_form(directory: Path, form: str, sd: dict[str, torch.Tensor], config: dict) -> Path:
    """Write `sd` the way `form` stores it; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if form == "model_full.pt":
        (directory / "quantization_config.json").write_text(json.dumps(
            {"weight_bits": 1.58, "activation_bits": config.get("activation_bits", 8), "packed": False}))
        torch.save({"model_state_dict": sd, "step": 100, "config": dict(config)}, directory / "model_full.pt")
    elif form.startswith("safetensors"):
        dtype = torch.bfloat16 if form.endswith("bf16") else torch.float32
        out = {n: (t.to(dtype) if t.is_floating_point() else t).contiguous() for n, t in sd.items()}
        save_file(out, str(directory / "model.safetensors"))
    elif form == "wrapper.pt":
        wrapped = {f"model.{n}": t for n, t in sd.items()}
        wrapped["lm_head.weight"] = sd["lm_head.weight"].clone()
        torch.save(wrapped, directory / "pytorch_model.pt")
    else:
        raise ValueError(form)
    return directory


def stored(sd: dict[str, torch.Tensor], form: str) -> dict[str, torch.Tensor]:
    """The tensors as a reader of `form` sees them (bf16 files round every float)."""
    if form != "safetensors-bf16":
        return sd
    return {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in sd.items()}
