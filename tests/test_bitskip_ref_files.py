"""Reading checkpoints of the public BitSkip training code: every file form, the config defaults
and KV-head derivation, and one clear error for each malformed file."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from models.bitskip_ref import RefCheckpointError, load_ref_checkpoint
from tests.ref_fixtures import BASE_CONFIG, FORMS, random_state, stored, write_form


@dataclass
class TrainingConfig:  # what some scripts pickle instead of a plain dict
    hidden_size: int = 64


@pytest.mark.parametrize("family", ["bitlinear", "hadamard"])
@pytest.mark.parametrize("form", FORMS)
def test_every_form_reads_with_the_defaults_applied(tmp_path, form, family):
    sd = random_state(BASE_CONFIG, family)
    ckpt = load_ref_checkpoint(write_form(tmp_path, form, sd, BASE_CONFIG))
    c = ckpt.config
    assert (c.family, c.generation, c.num_key_value_heads, c.ffn_size) == (family, 1, 2, 128)
    assert (c.layer_norm_eps, c.rope_theta, c.activation_bits) == (1e-5, 10000.0, 8)
    assert ckpt.dtype == (torch.bfloat16 if form.endswith("bf16") else torch.float32)
    want = stored(sd, form)
    # Training buffers, the routing gate and the unused weight_scale are dropped; the rest is kept as stored.
    assert not any("routing" in n or "skip" in n or "weight_scale" in n for n in ckpt.tensors)
    for name, t in ckpt.tensors.items():
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name


def test_config_embedded_in_model_full_is_used_without_config_json(tmp_path):
    write_form(tmp_path, "model_full.pt", random_state(BASE_CONFIG, "bitlinear"), BASE_CONFIG)
    (tmp_path / "config.json").unlink()
    assert load_ref_checkpoint(tmp_path / "model_full.pt").config.num_hidden_layers == 3


def test_head_count_comes_from_the_config_not_the_shapes(tmp_path):
    # hidden 96 with 4 heads of 24 (not a power of two); KV heads derived from k_proj (2 * 24 rows).
    config = dict(BASE_CONFIG, hidden_size=96, num_attention_heads=4, mlp_ratio=1.5)
    c = load_ref_checkpoint(write_form(tmp_path, "safetensors-fp32", random_state(config, "bitlinear"), config)).config
    assert (c.head_dim, c.num_key_value_heads, c.ffn_size) == (24, 2, 144)


def test_explicit_kv_heads_field_is_honoured(tmp_path):
    config = dict(BASE_CONFIG, num_kv_heads=4)
    sd = random_state(config, "bitlinear", kv_heads=4)
    assert load_ref_checkpoint(write_form(tmp_path, "model_full.pt", sd, config)).config.num_key_value_heads == 4


def _error(tmp_path, form="model_full.pt", family="bitlinear", config=BASE_CONFIG, edit=None, **kw) -> str:
    sd = random_state(config, family)
    if edit:
        edit(sd)
    write_form(tmp_path, form, sd, config)
    with pytest.raises(RefCheckpointError) as e:
        load_ref_checkpoint(tmp_path, **kw)
    return str(e.value)


def test_missing_tensor(tmp_path):
    msg = _error(tmp_path, edit=lambda sd: sd.pop("layers.1.feed_forward.up_proj.weight"))
    assert "model_full.pt: missing tensor 'layers.1.feed_forward.up_proj.weight'" in msg
    assert msg.count("\n  - ") == 1


def test_missing_hadamard_layer_norm(tmp_path):
    msg = _error(tmp_path, family="hadamard", form="safetensors-fp32",
                 edit=lambda sd: sd.pop("layers.0.self_attn.k_proj.layer_norm.bias"))
    assert "missing tensor 'layers.0.self_attn.k_proj.layer_norm.bias'" in msg


def test_wrong_shape(tmp_path):
    def edit(sd):
        sd["layers.2.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    msg = _error(tmp_path, edit=edit)
    assert "tensor 'layers.2.self_attn.o_proj.weight' has shape [64, 32], expected [64, 64]" in msg


def test_ffn_width_comes_from_mlp_ratio_not_intermediate_size(tmp_path):
    write_form(tmp_path, "safetensors-fp32", random_state(BASE_CONFIG, "bitlinear"), dict(BASE_CONFIG, mlp_ratio=3.0))
    with pytest.raises(RefCheckpointError) as e:
        load_ref_checkpoint(tmp_path)
    assert "'layers.0.feed_forward.up_proj.weight' has shape [128, 64], expected [192, 64]" in str(e.value)


def test_pickled_config_object_is_refused_without_unpickling(tmp_path):
    sd = random_state(BASE_CONFIG, "bitlinear")
    tmp_path.joinpath("config.json").write_text(json.dumps(BASE_CONFIG))
    torch.save({"model_state_dict": sd, "step": 1, "config": TrainingConfig()}, tmp_path / "model_full.pt")
    with pytest.raises(RefCheckpointError) as e:
        load_ref_checkpoint(tmp_path)
    assert "holds pickled Python objects" in str(e.value) and "never unpickled" in str(e.value)


def test_unknown_family(tmp_path):
    def edit(sd):  # a Llama-style layout, not the training code's
        for name in [n for n in sd if ".self_attn." in n]:
            sd[name.replace("self_attn.", "attention.")] = sd.pop(name)
    msg = _error(tmp_path, form="safetensors-fp32", edit=edit)
    assert "unknown model family" in msg and msg.count("\n  - ") == 1


def test_hadamard_sizes_that_fit_neither_generation(tmp_path):
    config = dict(BASE_CONFIG, hidden_size=96, num_attention_heads=4)
    msg = _error(tmp_path, family="hadamard", config=config)
    assert "power-of-two" in msg and "--generation 2" in msg


def test_second_generation_expects_padded_in_dimensions(tmp_path):
    config = dict(BASE_CONFIG, hidden_size=96, num_attention_heads=4)
    sd = random_state(config, "hadamard", pad_to_power_of_two=True)
    c = load_ref_checkpoint(write_form(tmp_path, "model_full.pt", sd, config), generation=2).config
    assert c.causal and c.projection_shapes()["self_attn.q_proj"] == (96, 128)
    with pytest.raises(RefCheckpointError, match="has shape"):
        load_ref_checkpoint(tmp_path)  # the first generation does not fit these shapes


def test_wrapper_with_a_different_duplicate_head(tmp_path):
    sd = random_state(BASE_CONFIG, "bitlinear")
    write_form(tmp_path, "wrapper.pt", sd, BASE_CONFIG)
    wrapped = torch.load(tmp_path / "pytorch_model.pt", weights_only=True)
    wrapped["lm_head.weight"] = wrapped["lm_head.weight"] + 1
    torch.save(wrapped, tmp_path / "pytorch_model.pt")
    with pytest.raises(RefCheckpointError, match="'lm_head.weight' and 'model.lm_head.weight' differ"):
        load_ref_checkpoint(tmp_path)


def test_missing_config_and_bad_fields(tmp_path):
    write_form(tmp_path, "safetensors-fp32", random_state(BASE_CONFIG, "bitlinear"), BASE_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE_CONFIG, activation_bits=3, num_hidden_layers=0)))
    with pytest.raises(RefCheckpointError) as e:
        load_ref_checkpoint(tmp_path)
    msg = str(e.value)
    assert "activation_bits must be 4 or 8, got 3" in msg and "num_hidden_layers must be a positive integer" in msg
    (tmp_path / "config.json").unlink()
    with pytest.raises(RefCheckpointError, match="config.json: missing"):
        load_ref_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RefCheckpointError, match="cannot be read as safetensors"):
        load_ref_checkpoint(tmp_path)
    with pytest.raises(RefCheckpointError, match="no such file"):
        load_ref_checkpoint(tmp_path / "nope")
