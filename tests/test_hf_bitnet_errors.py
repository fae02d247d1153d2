"""A broken Hugging Face BitNet directory fails at load with one error that names the file and
the problem: missing shard, shard against index, unsupported options, corrupt 2-bit codes."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, load_checkpoint
from hf_bitnet_models import set_json, write_hf_bitnet

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("bitnet-src")
    return {"packed": write_hf_bitnet(root / "packed", "bitlinear-packed"),
            "sharded": write_hf_bitnet(root / "sharded", "autobitlinear-online")}


@pytest.fixture
def copy(originals, tmp_path):
    def make(kind):
        return shutil.copytree(originals[kind], tmp_path / kind)
    return make


def refused(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    return str(e.value)


def shard_names(path) -> list[str]:
    return sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_originals_load(originals):
    for path in originals.values():
        assert load_checkpoint(path).config.hidden_act == "relu2"


def test_missing_shard(copy):
    path = copy("sharded")
    gone = shard_names(path)[1]
    (path / gone).unlink()
    assert f"{gone}: missing (model.safetensors.index.json lists" in refused(path)


def test_shard_that_disagrees_with_the_index(copy):
    path = copy("sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    by_shard = {s: [n for n, t in index["weight_map"].items() if t == s] for s in shard_names(path)}
    first = max(by_shard, key=lambda s: len(by_shard[s]))  # it still holds others once one moves
    second = next(s for s in by_shard if s != first)
    moved = by_shard[first][0]
    index["weight_map"][moved] = second
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = refused(path)
    assert f"{first}: holds tensor '{moved}' that model.safetensors.index.json places in {second}" in message
    assert f"{second}: lacks tensor '{moved}'" in message


@pytest.mark.parametrize("change, expected", [
    ({"hidden_act": "gelu"}, "config.json: hidden_act must be one of ['silu', 'relu2'], got 'gelu'"),
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "fastlinear"}},
     "config.json: quantization_config.linear_class must be one of ['bitlinear', 'autobitlinear'], got 'fastlinear'"),
    ({"quantization_config": {"quant_method": "bitnet", "use_rms_norm": True}},
     "config.json: quantization_config.use_rms_norm=true"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0}},
     "config.json: rope_type 'yarn' is not supported"),
    ({"hidden_size": 66}, "config.json: hidden_size (66) must be divisible by num_attention_heads (4)"),
])
def test_unsupported_config_is_named(copy, change, expected):
    path = copy("packed")
    set_json(path / "config.json", **change)
    assert expected in refused(path)


def test_code_3_in_packed_weights(copy):
    path = copy("packed")
    tensors = load_file(path / "model.safetensors")
    tensors[Q_PROJ][2, 5] = 0b11_00_00_00  # bits 6-7 hold code 3: row 3 * N/4 + 2 of column 5
    save_file(tensors, path / "model.safetensors")
    assert (f"model.safetensors: tensor '{Q_PROJ}' contains the 2-bit code 3, which encodes no "
            f"ternary value") in refused(path)


def test_wrong_packed_shape_and_missing_scale(copy):
    path = copy("packed")
    tensors = load_file(path / "model.safetensors")
    tensors[Q_PROJ] = tensors[Q_PROJ][:, :-4].contiguous()
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, path / "model.safetensors")
    message = refused(path)
    assert f"model.safetensors: tensor '{Q_PROJ}' (packed) has shape [16, 60], expected [16, 64]" in message
    assert "model.safetensors: missing tensor 'model.layers.1.mlp.down_proj.weight_scale'" in message


def test_pickled_weights_are_never_loaded(copy):
    path = copy("packed")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    assert "pytorch_model.bin: pickled weights are never loaded" in refused(path)
