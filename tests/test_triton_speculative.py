"""Self-speculative decoding on the Triton backend: the full model's greedy tokens, batched with
another policy (drafts also through the static decode buffers that CUDA graphs capture).

Without a GPU the kernels run under Triton's interpreter on CPU tensors, with torch's default
device set to "meta" (see test_triton_runner.py); with a GPU the same tests run on it. The
interpreter is slow, so the prompts and outputs are short.
"""

from __future__ import annotations

from test_triton_runner import engines, guarded  # sets TRITON_INTERPRET first

from conftest import write_packed
from engine import SamplingParams
from engine.speculative import SpeculativeRule
from test_confidence import sure_model

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = [[11, 12, 13], [40, 41]]


def run(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def test_speculative_greedy_equals_full_depth_batched(tmp_path):
    ckpt = write_packed(sure_model("v1"), tmp_path / "v1")
    L = ckpt.config.num_hidden_layers
    cpu, gpu = engines(ckpt)
    want = [s.output_ids for s in cpu.generate(PROMPTS, PARAMS, L)]
    with guarded():
        # Speculative rows at different draft exits, lengths and phases beside a fixed-exit row:
        # steps mix drafts, verifies and prompt chunks, and all-draft steps take the static
        # decode buffers (the drafts' states come back from them).
        batch = [gpu.add_request(PROMPTS[0], PARAMS, speculative=SpeculativeRule(2, 3)),
                 gpu.add_request(PROMPTS[1], PARAMS, speculative=SpeculativeRule(1, 2)),
                 gpu.add_request(PROMPTS[1], PARAMS, exit_layer=L)]
        run(gpu)
    assert [s.output_ids for s in batch] == [want[0], want[1], want[1]]
    assert gpu.runner.decode_graphs.steps > 0
    spec = [s.speculation for s in batch[:2]]
    assert sum(s.accepted for s in spec) > 0, "the test needs accepted drafts"
    assert sum(s.drafted - s.accepted for s in spec) > 0, "the test needs rejected drafts"
    assert gpu.kv_cache.num_free_blocks == gpu.kv_cache.num_blocks


def test_speculative_sampling_runs_seeded_on_the_device(tmp_path):
    """Two requests with one seed, in one batch: the same tokens (the draws are the request's)."""
    ckpt = write_packed(sure_model("v1"), tmp_path / "v1")
    params = SamplingParams(max_tokens=4, temperature=0.8, seed=7, ignore_eos=True)
    _, gpu = engines(ckpt)
    with guarded():
        seqs = [gpu.add_request(PROMPTS[1], params, speculative=SpeculativeRule(2, 2)) for _ in range(2)]
        run(gpu)
    for seq in seqs:
        assert seq.finish_reason == "length" and seq.speculation.drafted > 0
    assert seqs[0].output_ids == seqs[1].output_ids and len(seqs[0].output_ids) == 4
