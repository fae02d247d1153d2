"""Checkpoints: what is saved loads back unchanged, packing is the DESIGN bit layout, and every
broken checkpoint is refused with one error that names each file and problem."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import BitSkipForCausalLM, preset
from models.checkpoint import (PROJECTIONS, Checkpoint, CheckpointError, expected_tensors,
                               latent_state, load_checkpoint, load_reference_model,
                               pack_checkpoint, pack_state, projection_prefix, save_checkpoint)
from models.packing import pack_ternary, unpack_ternary
from models.quant import ternarize
from models.tokenizer import byte_level_tokenizer, default_generation_config

VARIANTS = ["v1", "v2", "v3"]
UP = "model.layers.0.mlp.up_proj"


def make_model(variant="v1", **changes) -> BitSkipForCausalLM:
    torch.manual_seed(0)
    config = dataclasses.replace(preset("tiny-test", variant), **changes)
    return BitSkipForCausalLM(config)


def write(path, model, packed=True, generation=True):
    tensors = latent_state(model)
    if packed:
        tensors = pack_state(tensors, model.config)
    save_checkpoint(path, model.config, tensors, byte_level_tokenizer(),
                    default_generation_config() if generation else None)
    return tensors


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


# ---- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_latent_round_trip(tmp_path, variant):
    model = make_model(variant)
    tensors = write(tmp_path, model, packed=False)
    ckpt = load_checkpoint(tmp_path)
    assert isinstance(ckpt, Checkpoint) and ckpt.form == "latent"
    assert ckpt.config == model.config
    assert ckpt.generation_config == default_generation_config()
    assert ckpt.tokenizer.encode("héllo").ids == list("héllo".encode())
    assert_same_tensors(ckpt.tensors, tensors)
    assert set(ckpt.tensors) == set(expected_tensors(model.config, "latent"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_round_trip(tmp_path, variant):
    model = make_model(variant)
    tensors = write(tmp_path, model, packed=True)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.form == "packed"
    assert_same_tensors(ckpt.tensors, tensors)
    specs = expected_tensors(model.config, "packed")
    assert set(ckpt.tensors) == set(specs)
    for name, (shape, dtypes) in specs.items():
        assert tuple(ckpt.tensors[name].shape) == shape and ckpt.tensors[name].dtype in dtypes


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_codes_equal_ternarized_latent(variant):
    model = make_model(variant)
    latent = latent_state(model)
    packed = pack_state(latent, model.config)
    for i in range(model.config.num_hidden_layers):
        for name in PROJECTIONS:
            prefix = projection_prefix(i, name)
            codes, gamma = ternarize(latent[f"{prefix}.weight"])
            assert f"{prefix}.weight" not in packed
            assert torch.equal(unpack_ternary(packed[f"{prefix}.qweight"], torch.float32), codes)
            scale = packed[f"{prefix}.weight_scale"]
            assert scale.shape == () and scale.dtype == torch.float32 and scale == gamma
    assert torch.equal(packed["model.norm.weight"], latent["model.norm.weight"])
    assert pack_state(packed, model.config).keys() == packed.keys()  # packing twice is a no-op


def test_packed_bit_layout_matches_hand_built_example():
    # codes t+1: [0,1,2,2] -> 0 | 1<<2 | 2<<4 | 2<<6 = 164;  [1,1,0,2] -> 1 | 1<<2 | 0 | 2<<6 = 133
    row = torch.tensor([[-1, 0, 1, 1, 0, 0, -1, 1]])
    assert pack_ternary(row).tolist() == [[164, 133]]
    # pack_state on a weight c*T ternarizes back to T exactly (any nonzero share rounds to +-1)
    model = make_model("v1")
    state = latent_state(model)
    n, k = state[f"{UP}.weight"].shape
    pattern = row.float().repeat(n, k // 8)
    state[f"{UP}.weight"] = 0.03 * pattern
    packed = pack_state(state, model.config)
    assert packed[f"{UP}.qweight"].shape == (n, k // 4)
    assert packed[f"{UP}.qweight"][:, :2].tolist() == [[164, 133]] * n
    assert math.isclose(packed[f"{UP}.weight_scale"].item(), 0.03 * 5 / 8, rel_tol=1e-6)  # 5 of 8 nonzero


def test_tied_head_is_not_written_and_loads(tmp_path):
    model = make_model("v1", tie_word_embeddings=True)
    assert "lm_head.weight" in model.state_dict()
    write(tmp_path, model, packed=False)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    ref = load_reference_model(load_checkpoint(tmp_path))
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    assert torch.equal(ref.lm_head.weight, model.lm_head.weight)


def test_reference_model_reproduces_logits(tmp_path):
    model = make_model("v2")
    write(tmp_path, model, packed=False)
    ref = load_reference_model(load_checkpoint(tmp_path))
    ids = torch.tensor([[1, 5, 9, 300]])
    with torch.no_grad():
        want, got = model(ids, [2, 4]), ref(ids, [2, 4])
    assert all(torch.equal(want[k], got[k]) for k in (2, 4))


def test_reference_model_refuses_packed(tmp_path):
    write(tmp_path, make_model("v1"), packed=True)
    with pytest.raises(CheckpointError, match="packed projections cannot be loaded"):
        load_reference_model(load_checkpoint(tmp_path))


def test_pack_checkpoint(tmp_path):
    model = make_model("v3")
    latent = write(tmp_path / "src", model, packed=False)
    ckpt = pack_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert ckpt.form == "packed" and ckpt.config == model.config
    assert ckpt.generation_config == default_generation_config()
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == \
        (tmp_path / "src" / "tokenizer.json").read_text()
    assert_same_tensors(ckpt.tensors, pack_state(latent, model.config))


def test_half_precision_and_one_element_scale_are_normalised(tmp_path):
    write(tmp_path, make_model("v1"), generation=False)
    edit_tensors(tmp_path, lambda t: t.update({
        "model.norm.weight": t["model.norm.weight"].bfloat16(),
        "lm_head.weight": t["lm_head.weight"].half(),
        f"{UP}.weight_scale": t[f"{UP}.weight_scale"].reshape(1)}))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.generation_config == {}
    assert ckpt.tensors["model.norm.weight"].dtype == torch.float32
    assert ckpt.tensors["lm_head.weight"].dtype == torch.float32
    assert ckpt.tensors[f"{UP}.weight_scale"].shape == ()


def test_mixed_form_is_valid(tmp_path):
    model = make_model("v1")
    tensors = pack_state(latent_state(model), model.config)
    q = projection_prefix(1, "self_attn.q_proj")
    del tensors[f"{q}.qweight"], tensors[f"{q}.weight_scale"]
    tensors[f"{q}.weight"] = model.model.layers[1].self_attn.q_proj.weight.detach()
    save_checkpoint(tmp_path, model.config, tensors, byte_level_tokenizer())
    assert load_checkpoint(tmp_path).form == "mixed"


# ---- broken checkpoints --------------------------------------------------------------------

def edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"))


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def set_item(name, index, value):
    def fn(t):
        t[name] = t[name].clone()
        t[name][index] = value
    return fn


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage_header(path):
    data = path.read_bytes()
    path.write_bytes(b"\xde\xad\xbe\xef\xff\xff\xff\x7f" + data[8:])


BROKEN = {
    "missing config": (lambda d: (d / "config.json").unlink(), ["config.json: missing"]),
    "config not json": (lambda d: (d / "config.json").write_text("{not json"),
                        ["config.json: not valid JSON"]),
    "config not object": (lambda d: (d / "config.json").write_text("[1, 2]"),
                          ["config.json: top level must be a JSON object"]),
    "config self-contradicting": (
        lambda d: edit_json(d / "config.json", lambda c: c.update(num_attention_heads=3)),
        ["config.json: hidden_size (64) must be divisible by num_attention_heads (3)"]),
    "config unknown field": (lambda d: edit_json(d / "config.json", lambda c: c.update(colour=1)),
                             ["config.json: unknown field 'colour'"]),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), ["model.safetensors: missing"]),
    "truncated weights": (lambda d: truncate(d / "model.safetensors"),
                          ["model.safetensors: cannot be read", "truncated"]),
    "garbage header": (lambda d: garbage_header(d / "model.safetensors"),
                       ["model.safetensors: cannot be read", "header claims"]),
    "missing tensor": (lambda d: edit_tensors(d, lambda t: t.pop("model.norm.weight")),
                       ["model.safetensors: missing tensor 'model.norm.weight'"]),
    "missing scale": (lambda d: edit_tensors(d, lambda t: t.pop(f"{UP}.weight_scale")),
                      [f"model.safetensors: missing tensor '{UP}.weight_scale'"]),
    "unexpected tensor": (lambda d: edit_tensors(d, lambda t: t.update(extra=torch.zeros(2))),
                          ["model.safetensors: unexpected tensor 'extra'"]),
    "both forms": (lambda d: edit_tensors(d, lambda t: t.update({f"{UP}.weight": torch.zeros(128, 64)})),
                   [f"model.safetensors: projection '{UP}' is stored both latent"]),
    "mis-shaped": (lambda d: edit_tensors(d, lambda t: t.update({f"{UP}.qweight": t[f"{UP}.qweight"][:, :8]})),
                   [f"model.safetensors: tensor '{UP}.qweight' has shape [128, 8], expected [128, 16]"]),
    "wrong dtype": (lambda d: edit_tensors(d, lambda t: t.update(
                        {"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
                    ["model.safetensors: tensor 'model.norm.weight' has dtype int32, "
                     "expected float32 or bfloat16 or float16"]),
    "int8 qweight": (lambda d: edit_tensors(d, lambda t: t.update({f"{UP}.qweight": t[f"{UP}.qweight"].to(torch.int8)})),
                     [f"model.safetensors: tensor '{UP}.qweight' has dtype int8, expected uint8"]),
    "code 3": (lambda d: edit_tensors(d, set_item(f"{UP}.qweight", (5, 3), 0b11000000)),
               [f"model.safetensors: tensor '{UP}.qweight' contains the 2-bit code 3"]),
    "zero scale": (lambda d: edit_tensors(d, lambda t: t.update({f"{UP}.weight_scale": torch.tensor(0.0)})),
                   [f"model.safetensors: tensor '{UP}.weight_scale' must be finite and > 0, got 0.0"]),
    "negative scale": (lambda d: edit_tensors(d, lambda t: t.update({f"{UP}.weight_scale": torch.tensor(-1.0)})),
                       [f"'{UP}.weight_scale' must be finite and > 0, got -1.0"]),
    "nan weight": (lambda d: edit_tensors(d, set_item("model.layers.1.input_layernorm.weight", 3, math.nan)),
                   ["model.safetensors: tensor 'model.layers.1.input_layernorm.weight' contains 1 NaN"]),
    "inf embedding": (lambda d: edit_tensors(d, set_item("model.embed_tokens.weight", (2, 2), math.inf)),
                      ["model.safetensors: tensor 'model.embed_tokens.weight' contains 0 NaN and 1 Inf"]),
    "vocab mismatch": (lambda d: edit_json(d / "config.json", lambda c: c.update(vocab_size=300)),
                       ["config.json vocab_size=300 but model.embed_tokens.weight has 320 rows",
                        "model.safetensors: tensor 'lm_head.weight' has shape [320, 64], expected [300, 64]"]),
    "layer count mismatch": (lambda d: edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=3, exit_points=[1])),
                             ["config.json num_hidden_layers=3 but model.safetensors holds tensors for 4 layers",
                              "unexpected tensor 'model.layers.3.input_layernorm.weight'"]),
    "tokenizer larger than vocab": (lambda d: edit_json(d / "config.json", lambda c: c.update(vocab_size=200)),
                                    ["tokenizer.json has 258 tokens but config.json vocab_size=200"]),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), ["tokenizer.json: missing"]),
    "corrupt tokenizer": (lambda d: (d / "tokenizer.json").write_text('{"model": 1}'),
                          ["tokenizer.json: cannot be read by tokenizers"]),
    "generation not json": (lambda d: (d / "generation_config.json").write_text("bos=1"),
                            ["generation_config.json: not valid JSON"]),
    "eos out of range": (lambda d: edit_json(d / "generation_config.json", lambda g: g.update(eos_token_id=[257, 320])),
                         ["generation_config.json: eos_token_id must be an int or a non-empty list of ints "
                          "in 0..319, got [257, 320]"]),
    "bos not int": (lambda d: edit_json(d / "generation_config.json", lambda g: g.update(bos_token_id="1")),
                    ["generation_config.json: bos_token_id must be an int in 0..319, got '1'"]),
}


def refused(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    err = info.value
    assert err.path == str(path)
    assert str(err) == f"invalid checkpoint {path}:" + "".join(f"\n  - {p}" for p in err.problems)
    return err


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_refused_with_named_problem(tmp_path, case):
    write(tmp_path, make_model("v1"), packed=True)
    load_checkpoint(tmp_path)  # valid before the damage
    damage, expected = BROKEN[case]
    damage(tmp_path)
    message = str(refused(tmp_path))
    for text in expected:
        assert text in message, f"{case}: {text!r} not in:\n{message}"


def test_missing_directory(tmp_path):
    err = refused(tmp_path / "nope")
    assert err.problems == [f"{tmp_path / 'nope'}: directory does not exist"]


def test_path_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in str(refused(tmp_path / "file"))


def test_nan_latent_weight(tmp_path):
    write(tmp_path, make_model("v1"), packed=False)
    edit_tensors(tmp_path, set_item(f"{UP}.weight", (0, 0), math.nan))
    assert f"model.safetensors: tensor '{UP}.weight' contains 1 NaN" in str(refused(tmp_path))


def test_all_problems_are_reported_together(tmp_path):
    write(tmp_path, make_model("v1"), packed=True)

    def damage(t):
        t.pop("model.norm.weight")
        t["junk"] = torch.zeros(1)
        t[f"{UP}.weight_scale"] = torch.tensor(-2.0)
        t["model.layers.2.post_attention_layernorm.weight"][0] = math.nan
    edit_tensors(tmp_path, damage)
    (tmp_path / "tokenizer.json").write_text("garbage")
    edit_json(tmp_path / "generation_config.json", lambda g: g.update(bos_token_id=10_000))
    problems = refused(tmp_path).problems
    for text in ["missing tensor 'model.norm.weight'", "unexpected tensor 'junk'",
                 "weight_scale' must be finite and > 0", "post_attention_layernorm.weight' contains 1 NaN",
                 "tokenizer.json: cannot be read", "generation_config.json: bos_token_id"]:
        assert sum(text in p for p in problems) == 1, f"{text!r} not reported once in {problems}"
    assert len(problems) == 6


def test_invalid_config_still_reports_other_files(tmp_path):
    write(tmp_path, make_model("v1"), packed=True)
    edit_json(tmp_path / "config.json", lambda c: c.update(hidden_size=66, activation_bits=3))
    edit_tensors(tmp_path, set_item(f"{UP}.qweight", (0, 0), 255))
    (tmp_path / "tokenizer.json").unlink()
    message = str(refused(tmp_path))
    for text in ["config.json: hidden_size (66) must be divisible", "config.json: activation_bits must be 4 or 8",
                 f"'{UP}.qweight' contains the 2-bit code 3", "tokenizer.json: missing"]:
        assert text in message, f"{text!r} not in:\n{message}"
