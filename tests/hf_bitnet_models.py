"""Small random BitNet b1.58 models written by transformers itself (save_pretrained, offline), in
the three forms the Hugging Face format has, and transformers' own float32 forward over them.

transformers is imported only here, so the rest of the suite never pays for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.tokenizer import byte_level_tokenizer

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# form -> (quantization_config, tied embeddings, shard size for save_pretrained or None)
FORMS = {
    "bitlinear-packed": ({"quant_method": "bitnet", "linear_class": "bitlinear",
                          "quantization_mode": "offline"}, False, None),
    "autobitlinear-packed": ({"quant_method": "bitnet", "linear_class": "autobitlinear",
                              "quantization_mode": "offline"}, True, None),
    "autobitlinear-online": ({"quant_method": "bitnet", "linear_class": "autobitlinear",
                              "quantization_mode": "online"}, True, "60KB"),
}
BOS_ID, EOS_ID = 256, 257  # the byte-level tokenizer's
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def _transformers():
    # The reference's @torch.compile'd helpers would compile on first call (slow on a CPU, and
    # the same math as eager): run them eagerly.
    torch._dynamo.config.disable = True
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def hf_config(form: str, **overrides):
    quant, tied, _ = FORMS[form]
    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=BOS_ID,
                  eos_token_id=EOS_ID, quantization_config=quant,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    fields.update(overrides)
    return _transformers().BitNetConfig(**fields)


def _ternary_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's weight rule as its training code writes it: scale = 1 / mean|W|."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1), scale


def write_hf_bitnet(path: Path, form: str, seed: int = 0, **overrides) -> Path:
    """A random BitNetForCausalLM saved by save_pretrained, its projections then stored in `form`
    (packed forms: transformers' own pack_weights; bitlinear keeps 1/gamma, autobitlinear gamma)."""
    tf = _transformers()
    from transformers.integrations.bitnet import pack_weights
    config = hf_config(form, **overrides)
    torch.manual_seed(seed)
    model = tf.BitNetForCausalLM(config).eval()
    with torch.no_grad():  # norm weights away from 1 exercise more codes
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    quant, _, shard = FORMS[form]
    model.save_pretrained(path, max_shard_size=shard or "50GB")
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    if quant["quantization_mode"] == "offline":
        weights = path / "model.safetensors"
        tensors = load_file(weights)
        for i in range(config.num_hidden_layers):
            for proj in PROJECTIONS:
                name = f"model.layers.{i}.{proj}"
                ternary, scale = _ternary_weights(tensors.pop(f"{name}.weight"))
                tensors[f"{name}.weight"] = pack_weights(ternary.clone())
                gamma = 1.0 / scale
                tensors[f"{name}.weight_scale"] = (scale if quant["linear_class"] == "bitlinear"
                                                   else gamma).reshape(1).float()
        save_file(tensors, weights, metadata={"format": "pt"})
    return path


def load_hf(path: Path):
    """transformers' own model from the directory, float32, eval."""
    return _transformers().BitNetForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_exit_logits(model, ids: list[int]) -> dict[int, torch.Tensor]:
    """transformers' logits [T, vocab] at every depth: lm_head(norm(hidden_states[k])) below the
    top (hidden_states[L] is already normalized, so full depth is its own logits)."""
    out = model(torch.tensor([ids]), output_hidden_states=True)
    L = model.config.num_hidden_layers
    logits = {k: model.lm_head(model.model.norm(out.hidden_states[k]))[0] for k in range(1, L)}
    logits[L] = out.logits[0]
    return logits


def set_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))
