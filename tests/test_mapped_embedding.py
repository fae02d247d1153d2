"""A large untied embedding (and head) stays in its file (models/mapped.py): the loaded tensor holds the
file's values, the NaN/Inf check still sees every one, the engine generates the same tokens as
from a loaded copy, private writes never reach the file, and a checkpoint saved over the served
one leaves the served tensor intact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import EngineConfig, LLMEngine, SamplingParams
from models import checkpoint as ckpt_module
from models.checkpoint import CheckpointError, latent_state, load_checkpoint, pack_state, save_checkpoint
from models.mapped import _regions, release
from models.tokenizer import byte_level_tokenizer, default_generation_config

from conftest import reference_model

EMBED = "model.embed_tokens.weight"


def is_mapped(t: torch.Tensor) -> bool:
    return any(base <= t.data_ptr() < stop for base, (stop, ref) in _regions.items() if ref() is not None)


@pytest.fixture
def untied(tmp_path, monkeypatch):
    """(packed tensors, checkpoint directory) of an untied tiny model; every embedding is mapped."""
    monkeypatch.setattr(ckpt_module, "MAP_EMBEDDING_BYTES", 0)
    model = reference_model("v1")
    tensors = pack_state(latent_state(model), model.config)
    save_checkpoint(tmp_path, model.config, tensors, byte_level_tokenizer(), default_generation_config())
    return tensors, tmp_path


def test_mapped_embedding_holds_the_file_values(untied):
    tensors, path = untied
    ckpt = load_checkpoint(path)
    embed = ckpt.tensors[EMBED]
    assert is_mapped(embed) and is_mapped(ckpt.tensors["lm_head.weight"])  # untied: both
    assert embed.dtype == torch.float32 and torch.equal(embed, tensors[EMBED])
    release(embed)  # pages dropped: read again from the file, same values
    assert torch.equal(embed, tensors[EMBED])


def test_private_writes_do_not_reach_the_file(untied):
    tensors, path = untied
    embed = load_checkpoint(path).tensors[EMBED]
    embed[3] = 7.0
    assert torch.equal(load_file(str(path / "model.safetensors"))[EMBED], tensors[EMBED])


def test_nan_in_a_mapped_embedding_is_refused(untied):
    _, path = untied
    state = load_file(str(path / "model.safetensors"))
    state[EMBED][5, 2] = float("nan")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight' contains 1 NaN and 0 Inf"):
        load_checkpoint(path)


def test_engine_generates_the_same_tokens_from_the_mapped_embedding(untied, monkeypatch):
    _, path = untied
    mapped = load_checkpoint(path)
    monkeypatch.setattr(ckpt_module, "MAP_EMBEDDING_BYTES", 1 << 62)
    loaded = load_checkpoint(path)
    assert is_mapped(mapped.tensors[EMBED]) and not is_mapped(loaded.tensors[EMBED])
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 100, 7], [33, 2]]
    outs = [LLMEngine(c, EngineConfig(max_num_seqs=2)).generate(prompts, params) for c in (mapped, loaded)]
    assert [o.output_ids for o in outs[0]] == [o.output_ids for o in outs[1]]


def test_saving_over_a_served_checkpoint_leaves_it_intact(untied):
    tensors, path = untied
    embed = load_checkpoint(path).tensors[EMBED]
    model = reference_model("v1", seed=1)
    save_checkpoint(path, model.config, pack_state(latent_state(model), model.config), byte_level_tokenizer())
    release(embed)  # even its dropped pages come back from the old file
    assert torch.equal(embed, tensors[EMBED])
    assert not torch.equal(load_checkpoint(path).tensors[EMBED], tensors[EMBED])
