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
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, the heuristic configs instead of autotuning every test shape (minutes of benchmarking);
# test_every_autotune_config_exact runs each autotuner candidate explicitly instead.
os.environ.setdefault("BITSKIP_TRITON_AUTOTUNE", "0")

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
    for kernel, ms in (("prefill", PREFILL_M), ("decode", DECODE_M), ("decode_bytes", DECODE_M)):
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
    gen = torch.Generator().manual_seed(zlib.crc32(f"{model}-{variant}".encode()))
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
    """Explicit small tiles: many N tiles with a ragged last one, several M tiles, decode word
    blocks smaller than one 32-byte plane chunk."""
    gen = torch.Generator().manual_seed(3)
    cpu, dev = build([(50, 200), (20, 200)], 8, False, gen)
    codes = random_codes(37, 200, 127, gen)
    want = cpu.accumulate(codes)
    got = dev.accumulate(codes.to(DEVICE), kernel="prefill",
                         config=dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2, num_warps=4))
    assert torch.equal(got.cpu(), want)
    got = dev.accumulate(codes[:5].to(DEVICE), kernel="decode", config=dict(BLOCK_N=16, BLOCK_W=4, num_warps=4))
    assert torch.equal(got.cpu(), want[:5])
    got = dev.accumulate(codes[:8].to(DEVICE), kernel="decode", config=dict(BLOCK_N=32, BLOCK_W=8, num_warps=4))
    assert torch.equal(got.cpu(), want[:8])
    got = dev.accumulate(codes[:5].to(DEVICE), kernel="decode_bytes",
                         config=dict(BLOCK_N=16, BLOCK_KB=32, num_warps=4))
    assert torch.equal(got.cpu(), want[:5])
    # Codes that are a column slice (row stride not the width): the word view copies them.
    wide = random_codes(3, 208, 127, gen)
    got = dev.accumulate(wide[:, 4:204].to(DEVICE), kernel="decode")
    assert torch.equal(got.cpu(), cpu.accumulate(wide[:, 4:204].contiguous()))


def config_dict(c) -> dict:
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def test_every_autotune_config_exact():
    """Each candidate config the autotuner may pick on a GPU gives the exact accumulators."""
    gen = torch.Generator().manual_seed(31)
    cpu, dev = build([(12, 200), (8, 200)], 8, False, gen)
    codes = random_codes(33, 200, 127, gen)
    want = cpu.accumulate(codes)
    for c in tk._PREFILL_CONFIGS:
        got = dev.accumulate(codes.to(DEVICE), kernel="prefill", config=config_dict(c))
        assert torch.equal(got.cpu(), want), c
    for kernel, configs in (("decode", tk._DECODE_CONFIGS), ("decode_bytes", tk._DECODE_BYTES_CONFIGS)):
        for i, c in enumerate(configs):
            m = (1, 3, 8)[i % 3]
            got = dev.accumulate(codes[:m].to(DEVICE), kernel=kernel, config=config_dict(c))
            assert torch.equal(got.cpu(), want[:m]), (kernel, c)


def test_auto_kernel_choice():
    gen = torch.Generator().manual_seed(5)
    cpu, dev = build([(16, 64)], 8, False, gen)
    picked = os.environ.get("BITSKIP_DECODE_KERNEL", "decode")  # fastest in a graph on an H200
    assert dev.pick_kernel(1) == picked and dev.pick_kernel(dev.decode_max_m) == picked
    assert dev.pick_kernel(dev.decode_max_m + 1) == "prefill"
    codes = random_codes(6, 64, 127, gen)
    assert torch.equal(dev.accumulate(codes.to(DEVICE)).cpu(), cpu.accumulate(codes))
    for kernel in ("decode", "decode_bytes"):
        with pytest.raises(ValueError):
            dev.accumulate(random_codes(tk.DECODE_MAX_M + 1, 64, 127, gen).to(DEVICE), kernel=kernel)


# ---------------------------------------------------------------------------------------------
# (2) + (4): the quantization kernel against models.quant (and models.functional.rms_norm)
# ---------------------------------------------------------------------------------------------

def ieee_rms_norm(x, weight, eps):
    """models.functional.rms_norm with a correctly rounded float32 square root.

    torch's CPU float32 sqrt is not always correctly rounded (on this AVX-512 build about 0.6% of
    inputs come out 1 ulp off); torch on CUDA, numpy and the Triton kernel (sqrt_rn) are. A square
    root taken in float64 and rounded once to float32 is the correctly rounded float32 one.
    """
    mean_sq = x.double().square().mean(dim=-1, keepdim=True).float()
    return x / torch.sqrt((mean_sq + eps).double()).float() * weight


def reference_codes(x, bits, width, hadamard, norm_weight=None, eps=1e-5, norm=ieee_rms_norm):
    if norm_weight is not None:
        x = norm(x, norm_weight, eps)
    if hadamard:
        x = hadamard_transform(x, width)
    return quantize_activations(x, bits)


def check_quantize(x, bits, width, hadamard, norm_weight=None, eps=1e-5):
    t = x.shape[0]
    q_want, s_want = reference_codes(x, bits, width, hadamard, norm_weight, eps)
    if norm_weight is not None:
        # Against the CPU's own rms_norm: the rows where torch's sqrt is 1 ulp off get scales
        # 1 ulp apart; a code can flip only where x * Q / s sits within ~1 ulp of a .5 boundary
        # (expected far below one such code in this suite). Allow a handful.
        q_cpu, s_cpu = reference_codes(x, bits, width, hadamard, norm_weight, eps, norm=rms_norm)
        torch.testing.assert_close(s_want, s_cpu, rtol=2.0 ** -22, atol=0.0)
        assert (q_want - q_cpu).abs().max() <= 1 and int((q_want != q_cpu).sum()) <= 4
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


def test_quantize_scale_is_reciprocal_times_q():
    """torch evaluates `q_max / s` as s.reciprocal() * q_max (two roundings). Rows built where
    that and the correctly rounded quotient give different codes: the kernel must follow torch."""
    gen = torch.Generator().manual_seed(29)
    rows = []
    while len(rows) < 4:
        s = torch.rand((), generator=gen) * 9 + 1
        inv_torch = 127 / s                                        # reciprocal(s) * 127
        inv_exact = torch.tensor(127.0 / s.double().item()).float()  # correctly rounded quotient
        if inv_torch == inv_exact:
            continue
        half = torch.arange(1, 127, dtype=torch.float32) + 0.5
        cand = (half / inv_torch).float()
        cand = torch.cat([cand, torch.nextafter(cand, cand + 1), torch.nextafter(cand, cand - 1)])
        cand = cand[cand < s]
        differs = torch.round(cand * inv_torch) != torch.round(cand * inv_exact)
        if differs.any():
            rows.append(torch.cat([s.view(1), cand[differs][:15]]))
    k = 4 * ((max(r.numel() for r in rows) + 3) // 4)
    x = torch.zeros(len(rows), k)
    for i, r in enumerate(rows):
        x[i, : r.numel()] = r
    check_quantize(x, 8, k, False)


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

def check_projection(cpu, dev, x):
    """The projection as the runner calls it (kernel picked by rows), plus the other kernel on
    the same codes when the rows allow both: bit-identical to the CPU backend (same integers,
    same float32 epilogue in the same order), so certainly within 1e-6 relative."""
    want = cpu(x)
    got = dev(x.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0.0)
    assert torch.equal(got.cpu(), want)
    codes, scales = dev.quantize(x.to(DEVICE))
    for kernel in tk.KERNELS:
        if kernel == dev.pick_kernel(x.shape[0]) or (kernel != "prefill" and x.shape[0] > tk.DECODE_MAX_M):
            continue
        out = poisoned((x.shape[0], dev.out_features), torch.float32)
        got = dev.matmul(codes, scales, kernel=kernel, out=out)
        assert got is out and not got.isnan().any(), f"{kernel}: unwritten outputs"
        assert torch.equal(got.cpu(), want), kernel


def check_fused_norm_projection(cpu, dev, x, norm_weight, eps):
    got = dev(x.to(DEVICE), norm_weight=norm_weight.to(DEVICE), eps=eps).cpu()
    # Exact against the reference norm with a correctly rounded sqrt (see ieee_rms_norm) ...
    assert torch.equal(got, cpu(ieee_rms_norm(x, norm_weight, eps)))
    # ... and within 1e-6 of the CPU's own rms_norm followed by the CPU backend.
    torch.testing.assert_close(got, cpu(rms_norm(x, norm_weight, eps)), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("model", ["tiny-test", "scaled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_projection_matches_cpu(model, variant):
    config = model_config(model, variant)
    gen = torch.Generator().manual_seed(19)
    for name, (shapes, logical) in projections(config).items():
        cpu, dev = build(shapes, config.activation_bits, config.hadamard, gen)
        for t in (3, 17):
            check_projection(cpu, dev, activations(t, logical, gen))
        if name in ("qkv", "gate_up"):    # the projections that follow an RMSNorm
            w = torch.rand(logical, generator=gen) + 0.5
            check_fused_norm_projection(cpu, dev, activations(5, logical, gen), w, config.rms_norm_eps)


def test_projection_empty_batch():
    gen = torch.Generator().manual_seed(23)
    _, dev = build([(16, 64)], 8, False, gen)
    assert dev(torch.zeros(0, 64, device=DEVICE)).shape == (0, 16)
