"""Architecture options: a model family is a configuration of the one block. Options are
validated with the field named, change the reference math as DESIGN says, and travel through
checkpoints (the engine's equality with the reference under them is in test_engine_exact)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models import BitSkipForCausalLM, preset
from models.checkpoint import CheckpointError, latent_state, load_checkpoint
from models.config import BitSkipConfig, ConfigError

from conftest import BITNET_BLOCK, reference_model, write_packed


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("hidden_act", None),
                                          ("attn_sub_norm", "yes"), ("ffn_sub_norm", 1)])
def test_bad_option_is_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(preset("tiny-test"), **{field: value})


def test_options_round_trip_through_config_json(tmp_path):
    config = dataclasses.replace(preset("tiny-test"), **BITNET_BLOCK, rope_theta=500000.0)
    config.save(tmp_path / "config.json")
    assert BitSkipConfig.load(tmp_path / "config.json") == config


def test_defaults_are_the_bitskip_block():
    config = BitSkipConfig.from_dict({k: v for k, v in preset("tiny-test").to_dict().items()
                                      if k not in ("hidden_act", "attn_sub_norm", "ffn_sub_norm")})
    assert (config.hidden_act, config.attn_sub_norm, config.ffn_sub_norm) == ("silu", False, False)
    names = [n for n, _ in BitSkipForCausalLM(config).named_parameters()]
    assert not any("sub_norm" in n for n in names)


def test_sub_norms_and_relu2_follow_the_design():
    """attn_sub_norm normalizes the attention output before o_proj; the MLP is
    down_proj(RMSNorm(relu(gate)^2 * up))."""
    model = reference_model("v1", **BITNET_BLOCK)
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    seen = {}
    # (a forward hook that returns a value replaces the output: dict.update returns None)
    attn.attn_sub_norm.register_forward_hook(lambda m, i, o: seen.update(attn_out=i[0]))
    attn.o_proj.register_forward_hook(lambda m, i, o: seen.update(o_in=i[0]))
    mlp.down_proj.register_forward_hook(lambda m, i, o: seen.update(down_in=i[0]))
    with torch.no_grad():
        product = F.relu(mlp.gate_proj(x)) ** 2 * mlp.up_proj(x)
        mlp(x)
        attn(x, model.rope_cos[:5], model.rope_sin[:5])
    eps = model.config.rms_norm_eps

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w
    torch.testing.assert_close(seen["down_in"], rms(product, mlp.ffn_sub_norm.weight), rtol=1e-5, atol=1e-6)
    assert seen["attn_out"].shape[-1] == model.config.hidden_size
    torch.testing.assert_close(seen["o_in"], rms(seen["attn_out"], attn.attn_sub_norm.weight),
                               rtol=1e-5, atol=1e-6)


def test_missing_sub_norm_tensor_is_named(tmp_path):
    write_packed(reference_model("v1", **BITNET_BLOCK), tmp_path)
    name = "model.layers.1.mlp.ffn_sub_norm.weight"
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[name]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"model.safetensors: missing tensor '{name}'"):
        load_checkpoint(tmp_path)


def test_latent_checkpoint_with_options_round_trips(tmp_path):
    model = reference_model("v2", **BITNET_BLOCK)
    ckpt = write_packed(model, tmp_path)
    assert ckpt.config == model.config
    assert "model.layers.0.self_attn.attn_sub_norm.weight" in latent_state(model)
    assert ckpt.config.num_parameters() == sum(p.numel() for p in model.parameters())
