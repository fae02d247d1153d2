"""The Triton kernels of the CUDA backend against the CPU backend (the numerical reference).

Without a GPU these run on CPU tensors under Triton's interpreter. Triton picks the interpreter
when a @triton.jit decorator runs (checked: a function decorated before TRITON_INTERPRET=1 is set
stays a JITFunction, one decorated after is an InterpretedFunction, even with triton already
imported), so the variable is set here before engine.kernels.triton_kernels is first imported;
nothing else in the package imports that module eagerly. With a GPU the same tests run on it.

Shapes: every projection of tiny-test (fused qkv, o, fused gate_up, down) for V1/V2/V3; a
scaled-down model that takes the code paths paper-1b takes (several 128-wide K groups, N not a
multiple of any block, K/4 not a multiple of the 32-byte plane, Hadamard zero-padding from a
non-power-of-two width); and one projection at paper-1b's width (K = 2048: sixteen K groups).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.kernels import PackedWeight, available_backends, resolve_backend, ternary_linear  # noqa: E402
from engine.kernels import triton_kernels as tk  # noqa: E402
from engine.kernels.cpu import CpuTernaryLinear  # noqa: E402
from engine.kernels.cuda import CudaTernaryLinear  # noqa: E402
from models.config import preset  # noqa: E402
from models.functional import rms_norm  # noqa: E402
from models.packing import pack_ternary  # noqa: E402
from models.quant import hadamard_transform, quantize_activations  # noqa: E402

DEVICE = "cpu" if tk.INTERPRETED else "cuda"
VARIANTS = ["v1", "v2", "v3"]
PREFILL_M = [1, 3, 16, 33]
DECODE_M = [1, 4]
POISON_INT32 = -2**31          # |acc| <= Q * K < 2^31: never a real accumulator
POISON_INT8 = -128             # codes are clamped to [-Q, Q]


def scaled_config(variant: str):
    """paper-1b's code paths at a size the interpreter runs quickly."""
    return dataclasses.replace(preset("tiny-test", variant), hidden_size=200, num_attention_heads=5,
                               num_key_value_heads=1, intermediate_size=172)


def model_config(name: str, variant: str):
    return preset("tiny-test", variant) if name == "tiny-test" else scaled_config(variant)


def projections(config) -> dict[str, tuple[list[tuple[int, int]], int]]:
    """name -> ([(N, K) of each fused part], logical input width)."""
    s = config.projection_shapes()
    h, f, attn = config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim
    return {
        "qkv": ([s["self_attn.q_proj"], s["self_attn.k_proj"], s["self_attn.v_proj"]], h),
        "o": ([s["self_attn.o_proj"]], attn),
        "gate_up": ([s["mlp.gate_proj"], s["mlp.up_proj"]], h),
        "down": ([s["mlp.down_proj"]], f),
    }


def random_parts(shapes, gen) -> list[PackedWeight]:
    parts = []
    for n, k in shapes:
        t = torch.randint(-1, 2, (n, k), generator=gen)
        gamma = float(torch.rand((), generator=gen) * 0.05 + 0.01)
        parts.append(PackedWeight(pack_ternary(t), gamma))
    return parts


def build(shapes, bits, hadamard, gen):
    parts = random_parts(shapes, gen)
    cpu = CpuTernaryLinear(parts, bits, hadamard)
    dev = ternary_linear(parts, bits, hadamard, backend="cuda", device=DEVICE)
    return cpu, dev


def random_codes(m, k, qmax, gen):
    codes = torch.randint(-qmax, qmax + 1, (m, k), generator=gen, dtype=torch.int8)
    codes[0, : min(k, 8)] = qmax          # extremes exercised in every run
    codes[-1, -min(k, 8):] = -qmax
    return codes


def poisoned(shape, dtype):
    value = POISON_INT32 if dtype == torch.int32 else POISON_INT8 if dtype == torch.int8 else float("nan")
    return torch.full(shape, value, dtype=dtype, device=DEVICE)


def activations(t, k, gen):
    """Heavy-tailed rows (like LLM activations) with a few outlier features."""
    x = torch.randn(t, k, generator=gen) * 2.0
    x[:, :: max(k // 7, 1)] *= 8.0
    return x


# ---------------------------------------------------------------------------------------------
# Backend selection and layout
# ---------------------------------------------------------------------------------------------

def test_interpreter_chosen_when_no_gpu():
    assert tk.INTERPRETED == (DEVICE == "cpu")
    if not torch.cuda.is_available():
        assert tk.INTERPRETED, "TRITON_INTERPRET must be set before the kernels module is imported"


def test_backend_selection():
    cuda = torch.cuda.is_available()
    assert ("cuda" in available_backends()) == cuda
    assert resolve_backend("auto") == ("cuda" if cuda else "cpu")
    assert resolve_backend("cpu") == "cpu"
    assert resolve_backend("cuda") == "cuda"
    with pytest.raises(ValueError):
        resolve_backend("tpu")
    gen = torch.Generator().manual_seed(0)
    parts = random_parts([(8, 64)], gen)
    assert isinstance(ternary_linear(parts, 8, False, backend="cpu"), CpuTernaryLinear)
    assert isinstance(ternary_linear(parts, 8, False, backend="cuda", device=DEVICE), CudaTernaryLinear)
    auto = ternary_linear(parts, 8, False, backend="auto")
    assert isinstance(auto, CudaTernaryLinear if cuda else CpuTernaryLinear)


@pytest.mark.parametrize("k", [4, 64, 128, 200, 344, 2048])
def test_relayout_round_trip_and_stays_packed(k):
    gen = torch.Generator().manual_seed(k)
    (part,) = random_parts([(24, k)], gen)
    grouped = tk.relayout_packed(part.qweight, k)
    assert grouped.dtype == torch.uint8
    assert grouped.shape == (24, tk.padded_in_features(k) // 4)
    assert torch.equal(tk.unrelayout_packed(grouped, k), part.qweight)
    lin = CudaTernaryLinear([part, part], 8, False, device=DEVICE)
    # 2 bits a weight on the device, nothing else of the weight's size.
    assert lin.qweight.dtype == torch.uint8 and lin.packed_bytes() == 48 * tk.padded_in_features(k) // 4
    assert lin.scale.numel() == 48


# ---------------------------------------------------------------------------------------------
# (1) + (4): exact int32 accumulators of both kernels, every output element written
# ---------------------------------------------------------------------------------------------

def check_accumulate(cpu, dev, qmax, gen):
    k = cpu.in_features
    for kernel, ms in (("prefill", PREFILL_M), ("decode", DECODE_M)):
        for m in ms:
            codes = random_codes(m, k, qmax, gen)
            want = cpu.accumulate(codes)
            out = poisoned((m, dev.out_features), torch.int32)
            got = dev.accumulate(codes.to(DEVICE), kernel=kernel, out=out)
            assert got is out
            assert not (got == POISON_INT32).any(), f"{kernel} M={m}: unwritten outputs"
            assert torch.equal(got.cpu(), want), f"{kernel} M={m}: int32 accumulators differ"


@pytest.mark.parametrize("model", ["tiny-test", "scaled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_accumulate_exact(model, variant):
    config = model_config(model, variant)
    gen = torch.Generator().manual_seed(hash((model, variant)) % 2**31)
    for name, (shapes, _) in projections(config).items():
        cpu, dev = build(shapes, config.activation_bits, config.hadamard, gen)
        assert dev.out_features == cpu.out_features and dev.in_features == cpu.in_features, name
        check_accumulate(cpu, dev, config.activation_qmax, gen)


def test_accumulate_exact_paper_width():
    """K = 2048 (paper-1b's hidden size): sixteen K groups in both kernels; N = 72."""
    gen = torch.Generator().manual_seed(7)
    cpu, dev = build([(40, 2048), (32, 2048)], 8, False, gen)
    check_accumulate(cpu, dev, 127, gen)


def test_accumulate_small_blocks():
    """Explicit small tiles: many N tiles with a ragged last one, several M tiles."""
    gen = torch.Generator().manual_seed(3)
    cpu, dev = build([(50, 200), (20, 200)], 8, False, gen)
    codes = random_codes(37, 200, 127, gen)
    want = cpu.accumulate(codes)
    got = dev.accumulate(codes.to(DEVICE), kernel="prefill",
                         config=dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2, num_warps=4))
    assert torch.equal(got.cpu(), want)
    for m in (1, 2, 3, 5, 8):
        got = dev.accumulate(codes[:m].to(DEVICE), kernel="decode",
                             config=dict(BLOCK_N=8, BLOCK_KB=32, num_warps=4))
        assert torch.equal(got.cpu(), want[:m]), m


def test_auto_kernel_choice():
    gen = torch.Generator().manual_seed(5)
    cpu, dev = build([(16, 64)], 8, False, gen)
    assert dev.pick_kernel(1) == "decode" and dev.pick_kernel(dev.decode_max_m) == "decode"
    assert dev.pick_kernel(dev.decode_max_m + 1) == "prefill"
    codes = random_codes(6, 64, 127, gen)
    assert torch.equal(dev.accumulate(codes.to(DEVICE)).cpu(), cpu.accumulate(codes))
    with pytest.raises(ValueError):
        dev.accumulate(random_codes(tk.DECODE_MAX_M + 1, 64, 127, gen).to(DEVICE), kernel="decode")


# ---------------------------------------------------------------------------------------------
# (2) + (4): the quantization kernel against models.quant (and models.functional.rms_norm)
# ---------------------------------------------------------------------------------------------

def reference_codes(x, bits, width, hadamard, norm_weight=None, eps=1e-5):
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    if hadamard:
        x = hadamard_transform(x, width)
    return quantize_activations(x, bits)


def check_quantize(x, bits, width, hadamard, norm_weight=None, eps=1e-5):
    t = x.shape[0]
    q_want, s_want = reference_codes(x, bits, width, hadamard, norm_weight, eps)
    codes_out = poisoned((t, width), torch.int8)
    scale_out = poisoned((t, 1), torch.float32)
    nw = None if norm_weight is None else norm_weight.to(DEVICE)
    codes, scales = tk.quantize_rows(x.to(DEVICE), 2 ** (bits - 1) - 1, width, hadamard, norm_weight=nw,
                                     eps=eps, codes_out=codes_out, scale_out=scale_out)
    assert codes is codes_out and scales is scale_out
    assert not (codes == POISON_INT8).any() and not scales.isnan().any(), "unwritten outputs"
    # Exact: the kernel does the reference's float32 operations in the reference's order
    # (correctly rounded divisions and square root, no FMA contraction, round half to even).
    assert torch.equal(scales.cpu(), s_want)
    assert torch.equal(codes.cpu().float(), q_want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fused_norm", [False, True], ids=["plain", "rmsnorm"])
def test_quantize_exact(variant, fused_norm):
    config = scaled_config(variant)
    gen = torch.Generator().manual_seed(11)
    for logical in (config.hidden_size, config.intermediate_size, 64):
        width = config.in_features(logical)
        x = activations(24, logical, gen)
        x[3] = 0.0                                     # s clamps to eps
        x[4] *= 1e-7                                   # tiny row: s == eps region
        w = (torch.rand(logical, generator=gen) + 0.5) if fused_norm else None
        check_quantize(x, config.activation_bits, width, config.hadamard, w, eps=config.rms_norm_eps)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_ties_round_half_even(bits):
    """Rows built so x * (Q / s) lands exactly on .5: the rounding must be half-to-even."""
    q = 2 ** (bits - 1) - 1
    halves = torch.arange(-q, q, dtype=torch.float32) + 0.5      # -Q+.5 .. Q-.5
    row = torch.cat([torch.tensor([float(q)]), halves])            # s = Q: Q / s = 1 exactly
    k = 4 * ((row.numel() + 3) // 4) + 4
    x = torch.zeros(3, k)
    x[0, : row.numel()] = row
    x[1, : row.numel()] = row * 0.25                               # s = Q/4: Q / s = 4, exact
    x[2, : row.numel()] = -row
    check_quantize(x, bits, k, False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_quantize_exact_paper_width(variant):
    config = preset("paper-1b", variant)
    gen = torch.Generator().manual_seed(13)
    for logical in (config.hidden_size, config.intermediate_size):
        x = activations(6, logical, gen)
        w = torch.rand(logical, generator=gen) + 0.5
        check_quantize(x, config.activation_bits, config.in_features(logical), config.hadamard)
        check_quantize(x, config.activation_bits, config.in_features(logical), config.hadamard, w)


def test_hadamard_pads_non_power_of_two():
    gen = torch.Generator().manual_seed(17)
    x = activations(5, 200, gen)
    check_quantize(x, 8, 256, True)
    with pytest.raises(ValueError):
        tk.quantize_rows(x.to(DEVICE), 127, 200, True)             # not a power of two


# ---------------------------------------------------------------------------------------------
# (3) + (4): whole projections against the CPU backend
# ---------------------------------------------------------------------------------------------

def check_projection(cpu, dev, x, norm_weight=None, eps=1e-5):
    if norm_weight is None:
        want = cpu(x)
    else:
        want = cpu(rms_norm(x, norm_weight, eps))
    codes, scales = dev.quantize(x.to(DEVICE), None if norm_weight is None else norm_weight.to(DEVICE), eps)
    for kernel in ("prefill", "decode") if x.shape[0] <= tk.DECODE_MAX_M else ("prefill",):
        out = poisoned((x.shape[0], dev.out_features), torch.float32)
        got = dev.matmul(codes, scales, kernel=kernel, out=out)
        assert got is out and not got.isnan().any(), f"{kernel}: unwritten outputs"
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0.0)
        # In fact bit-identical: same integers, same float32 epilogue in the same order.
        assert torch.equal(got.cpu(), want), kernel
    got = dev(x.to(DEVICE)) if norm_weight is None else dev(x.to(DEVICE), norm_weight=norm_weight.to(DEVICE), eps=eps)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("model", ["tiny-test", "scaled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_projection_matches_cpu(model, variant):
    config = model_config(model, variant)
    gen = torch.Generator().manual_seed(19)
    for name, (shapes, logical) in projections(config).items():
        cpu, dev = build(shapes, config.activation_bits, config.hadamard, gen)
        for t in (1, 4, 19):
            x = activations(t, logical, gen)
            check_projection(cpu, dev, x)
            if name in ("qkv", "gate_up"):    # the projections that follow an RMSNorm
                w = torch.rand(logical, generator=gen) + 0.5
                check_projection(cpu, dev, x, w, config.rms_norm_eps)


def test_projection_empty_batch():
    gen = torch.Generator().manual_seed(23)
    _, dev = build([(16, 64)], 8, False, gen)
    assert dev(torch.zeros(0, 64, device=DEVICE)).shape == (0, 16)
