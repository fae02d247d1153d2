"""The whole model on the Triton backend computes what the torch (CPU) backend computes.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter (set before the
kernels are first imported, as in test_triton_kernels.py); with a GPU the same tests run on it.
Every Triton-side call runs with torch's default device set to "meta", so a tensor the runner
makes without naming its device fails loudly instead of silently landing on the CPU.

The interpreter is slow (every Triton op is a numpy call), so the prompts are a few tokens and
each test covers several properties per forward.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("BITSKIP_TRITON_AUTOTUNE", "0")

from conftest import BITNET_BLOCK, reference_model, write_packed  # noqa: E402
from test_confidence import sure_model  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.backends import make_backend  # noqa: E402
from engine.model_runner import ModelRunner, Row  # noqa: E402
from engine.perplexity import perplexity  # noqa: E402
from engine.weights import ModelWeights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(max_tokens=3, ignore_eos=True)


def guarded():
    """Tensors made without an explicit device land on "meta" and fail at first use."""
    return torch.device("meta") if DEVICE == "cpu" else contextlib.nullcontext()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).abs().max() / b.cpu().abs().max())


@pytest.fixture(scope="module", params=["v1", "v2", "v3", "v1-bitnet-block"])
def ckpt(request, tmp_path_factory):
    """Each variant, and the BitNet block's architecture options (relu2, sub-norms, tied head)."""
    variant, _, arch = request.param.partition("-")
    model = reference_model(variant, **(BITNET_BLOCK if arch else {}))
    return write_packed(model, tmp_path_factory.mktemp(request.param))


def engines(ckpt, **kw):
    return (LLMEngine(ckpt, EngineConfig(device="cpu", backend="torch", **kw)),
            LLMEngine(ckpt, EngineConfig(device=DEVICE, backend="triton", **kw)))


def test_logits_at_every_exit_and_perplexity_match_the_torch_backend(ckpt):
    c = ckpt.config
    L = c.num_hidden_layers
    ids = torch.randint(0, c.vocab_size, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    torch_runner = ModelRunner(ModelWeights.from_checkpoint(ckpt))
    triton_runner = ModelRunner(ModelWeights.from_checkpoint(ckpt, make_backend(DEVICE, "triton")))
    row = Row(ids, 0, L, None, {k: "all" for k in range(1, L + 1)})
    want = torch_runner.forward([row])[0].logits
    with guarded():
        got = triton_runner.forward([row])[0].logits
    for k in range(1, L + 1):
        assert got[k].device.type == DEVICE
        assert rel_err(got[k], want[k]) < 1e-3, k
        assert torch.equal(got[k].argmax(-1).cpu(), want[k].argmax(-1)), k
    with guarded():
        ppl = perplexity(triton_runner, ids, list(range(1, L + 1)))
    ref = perplexity(torch_runner, ids, list(range(1, L + 1)))
    for k in range(1, L + 1):
        assert abs(ppl.perplexity[k] - ref.perplexity[k]) <= 1e-4 * ref.perplexity[k], k


def test_mixed_exit_batch_gives_the_torch_backends_greedy_tokens(ckpt):
    """Eight requests at exits 1..L (chunked prefill, then decode steps from static buffers, the
    code CUDA graphs capture, with rows leaving after their own exit): the same tokens as the
    torch backend, request by request."""
    L = ckpt.config.num_hidden_layers
    prompts = [[5 + i, 40 + 3 * i, 7, 90 - i][: 2 + i % 3] for i in range(8)]
    exits = [1 + i % L for i in range(8)]
    cpu, gpu = engines(ckpt, max_num_batched_tokens=16)
    want = [s.output_ids for s in cpu.generate(prompts, GREEDY, exits)]
    with guarded():
        got = [s.output_ids for s in gpu.generate(prompts, GREEDY, exits)]
    assert got == want
    assert gpu.runner.decode_graphs.steps > 0  # decode steps went through the static buffers


def test_batch_of_eight_equals_each_request_alone(tmp_path):
    ckpt = write_packed(reference_model("v1"), tmp_path / "v1")
    L = ckpt.config.num_hidden_layers
    prompts = [[9 + i, 30 + i, 50 + 2 * i] for i in range(8)]
    exits = [1 + i % L for i in range(8)]
    _, gpu = engines(ckpt)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    with guarded():
        together = [s.output_ids for s in gpu.generate(prompts, params, exits)]
        alone = [gpu.generate([p], params, k)[0].output_ids for p, k in zip(prompts, exits)]
    assert together == alone


def test_confidence_policy_gives_the_same_tokens_and_exits(tmp_path):
    ckpt = write_packed(sure_model("v1"), tmp_path / "v1")
    cpu, gpu = engines(ckpt)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    results = []
    for engine in (cpu, gpu):
        # A threshold inside this model's confidence range, so exits vary per token and later
        # tokens fill the KV of earlier early-exited ones (deferred fills).
        rule = engine.confidence_rule(0.6)
        with guarded() if engine is gpu else contextlib.nullcontext():
            seq = engine.add_request([11, 12, 13], params, confidence=rule)
            while engine.has_unfinished():
                engine.step()
        results.append((seq.output_ids, seq.exit_layers, engine.runner.deferred_fills))
    assert results[0] == results[1]
    assert len(set(results[0][1])) > 1, f"test needs mixed exits, got {results[0][1]}"


def test_sampling_on_the_device_is_seeded_and_takes_penalties_and_logprobs(tmp_path):
    ckpt = write_packed(reference_model("v1"), tmp_path / "v1")
    params = SamplingParams(max_tokens=3, temperature=0.8, top_k=50, seed=5, repetition_penalty=1.3,
                            logprobs=2, ignore_eos=True)
    runs = []
    for _ in range(2):
        _, gpu = engines(ckpt)
        with guarded():
            seq = gpu.generate([[4, 5, 6]], params)[0]
        runs.append((seq.output_ids, [lp.logprob for lp in seq.logprobs]))
    assert runs[0] == runs[1] and len(runs[0][0]) == 3 and len(runs[0][1]) == 3
