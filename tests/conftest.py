"""Shared fixtures: small reference models and the packed checkpoints made from them."""

from __future__ import annotations

import os

import pytest
import torch

from models.checkpoint import Checkpoint, latent_state, load_checkpoint, pack_state, save_checkpoint
from models.config import preset
from models.model import BitSkipForCausalLM
from models.tokenizer import byte_level_tokenizer, default_generation_config


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors: threads only add overhead (and contention on a shared CI machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_model(variant: str = "v1", seed: int = 0, **overrides) -> BitSkipForCausalLM:
    """A tiny-test reference model with random weights (eval mode)."""
    import dataclasses
    torch.manual_seed(seed)
    config = dataclasses.replace(preset("tiny-test", variant), **overrides)
    model = BitSkipForCausalLM(config).eval()
    # Larger norm weights than 1.0 spread activations so more codes are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_packed(model: BitSkipForCausalLM, path) -> Checkpoint:
    save_checkpoint(path, model.config, pack_state(latent_state(model), model.config),
                    byte_level_tokenizer(), default_generation_config())
    return load_checkpoint(path)


@pytest.fixture(params=["v1", "v2", "v3"])
def variant(request) -> str:
    return request.param


# Architecture options (models.config) beside the BitSkip block: the BitNet b1.58 block.
BITNET_BLOCK = dict(hidden_act="relu2", attn_sub_norm=True, ffn_sub_norm=True, tie_word_embeddings=True)


@pytest.fixture(params=["v1", "v2", "v3", "v1-bitnet-block"])
def tiny(tmp_path, request):
    """(reference model, packed checkpoint of the same weights) for each variant, and for the
    BitNet block's architecture options."""
    variant, _, arch = request.param.partition("-")
    model = reference_model(variant, **(BITNET_BLOCK if arch else {}))
    return model, write_packed(model, tmp_path / f"tiny-{request.param}")


@pytest.fixture(scope="session")
def shared_v1(tmp_path_factory):
    """(reference v1 model, its packed checkpoint), built once for every test that only reads them."""
    model = reference_model("v1")
    return model, write_packed(model, tmp_path_factory.mktemp("shared") / "tiny-v1")


@pytest.fixture
def tiny_v1(tmp_path):
    model = reference_model("v1")
    return model, write_packed(model, tmp_path / "tiny-v1")


def require_system(missing: str, how: str) -> None:
    """A system dependency (Debian package, tool) is absent: fail in CI, which installs it
    (.ci/run exports CI=1), and skip with the fix elsewhere, so `make test` on a machine with
    only Python still passes."""
    message = f"{missing} is missing: {how}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
