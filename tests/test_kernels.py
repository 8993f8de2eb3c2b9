"""The Triton kernels against their PyTorch references.

Without a GPU the kernels run under Triton's interpreter on small awkward shapes: token counts that are not
multiples of the tile, head dims 40 and 112 (not powers of 2), several pass-1 splits. The interpreter must be
switched on (TRITON_INTERPRET=1) before `import triton`, which other test modules may already have done in this
process, so on CPU one test re-runs this file in a fresh process with the variable set, and the kernel tests of
this process defer to it. With a GPU the same tests run compiled, in this process, and the full LongSANA shapes,
torch.compile and CUDA graphs are checked too. Every buffer a kernel writes starts as NaN (poisoned), so an
element left unwritten fails the test.

The Triton ops' backward is their reference's: gradients through the entry points, and a transformer training step
with the Triton kernels everywhere, must equal the reference's.

Tolerances come from the dtype: fp32 1e-5, bf16 1e-2. Under the interpreter a bf16 result also carries the
interpreter's truncating fp32 -> bf16 conversion (the GPU rounds to nearest), which still fits 1e-2. Its fp32 -> e4m3
conversion is wrong outright (Triton 3.9: 127.2 becomes 64, ties round up, subnormals flush to zero), so under the
interpreter that one conversion is done by PyTorch's, which rounds as the GPU does (`exact_fp8_casts`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from longsana.benchmarks.kernels import (FRAME_HW, SHARED_MEMORY, compile_for, la_compile, la_shared_memory,  # noqa: E402
                                        loop_instructions, stack_bytes)
from longsana.config import TransformerConfig  # noqa: E402
from longsana.kernels import (triton_common, triton_cross_attention, triton_glu_conv,  # noqa: E402
                              triton_linear_attention, triton_ln_modulate, triton_quantize)
from longsana.kernels.cross_attention import cross_attention, cross_attention_ref  # noqa: E402
from longsana.kernels.glu_conv import glu_conv, glu_conv_ref  # noqa: E402
from longsana.kernels.linear_attention import (QKNorm, chunk_state, linear_attention, linear_attention_ref,  # noqa: E402
                                                normalized_qk, rms_norm)
from longsana.kernels.ln_modulate import (add_ln_modulate, add_ln_modulate_fp8, ln_modulate,  # noqa: E402
                                          ln_modulate_fp8, ln_modulate_fp8_ref, ln_modulate_ref)
from longsana.kernels.quantize import FP8, FP8_MAX, quantize_rows, quantize_rows_ref  # noqa: E402
from longsana.testing import needs_cuda, rel_err  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETER
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
runs_triton = pytest.mark.skipif(not (CUDA or INTERPRETER),
                                 reason="runs in test_kernels_under_interpreter's process (TRITON_INTERPRET=1)")
# The interpreter is known to run these kernels from the Makefile's pins on; under torch 2.11 with triton 3.6 it cannot
# (torch's wrap_triton refuses interpreted kernels, the interpreter fails on loops with tensor bounds).
INTERPRETER_WORKS_FROM = {torch: (2, 13), triton: (3, 9)}


def older(module, release: tuple[int, int]) -> bool:
    return tuple(int(part) for part in module.__version__.split(".")[:2]) < release


TOO_OLD = [f"{m.__name__} {m.__version__} (known to work from {'.'.join(map(str, v))})"
           for m, v in INTERPRETER_WORKS_FROM.items() if older(m, v)]


@pytest.mark.slow
@pytest.mark.skipif(CUDA or INTERPRETER, reason="only without a GPU, and not inside itself")
@pytest.mark.skipif(bool(TOO_OLD), reason=f"Triton's interpreter cannot run these kernels here: {', '.join(TOO_OLD)}")
def test_kernels_under_interpreter():
    """This file again, in a process that had TRITON_INTERPRET=1 before it imported triton."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


UNPOISONED = triton_common.empty


@pytest.fixture(autouse=True)
def poisoned_small(monkeypatch):
    """NaN-filled output buffers; a small linear-attention tiling (several splits and tiles on small shapes)."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_common, "empty", poisoned)
    small = triton_linear_attention.LinearAttentionConfig(state_block_n=32, state_programs=4, out_block_n=32,
                                                          out_tokens=64)
    monkeypatch.setattr(triton_linear_attention, "CONFIG", small)
    monkeypatch.setattr(triton_glu_conv, "CONFIG", triton_glu_conv.GluConvConfig(block_x=2, block_c=32, rows=3))
    monkeypatch.setattr(triton_cross_attention, "CONFIG", triton_cross_attention.CrossAttentionConfig(16, 16, 1, 4))


@pytest.fixture(autouse=True)
def exact_fp8_casts(monkeypatch):
    """Under the interpreter, its fp32 -> e4m3 conversion replaced by PyTorch's (round to nearest even, saturating
    the kernel's clamp already did, subnormals kept), as the GPU converts; every other conversion is its own."""
    if not INTERPRETER:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    own = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.float8e4nv:
            return torch.from_numpy(data.astype("float32")).to(FP8).view(torch.uint8).numpy()
        return own(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


def rope_tables(N: int, d: int, g: torch.Generator):
    angle = torch.rand(N, d // 2, generator=g) * 20  # arbitrary angles: every cos/sin sign
    return angle.cos().to(DEVICE), angle.sin().to(DEVICE)


def qkv(B, N, H, d, dtype, g, fused=False):
    """q, k as the model makes them (ReLU'd, non-negative), v signed; `fused` gives strided views of one tensor."""
    x = torch.randn(B, N, 3, H, d, generator=g)
    x[:, :, :2] = x[:, :, :2].relu()
    x = x.to(DEVICE, dtype)
    if fused:
        return x.unbind(2)
    return (x[:, :, i].contiguous() for i in range(3))


def past_state(B, N, H, d, g):
    """A carried (S0, z0) as a previous chunk leaves it."""
    k, v = torch.randn(B, N, H, d, generator=g).relu(), torch.randn(B, N, H, d, generator=g)
    angle = torch.rand(N, d // 2, generator=g) * 20
    S0, z0 = chunk_state(k, v, angle.cos(), angle.sin())
    return S0.to(DEVICE), z0.to(DEVICE)


LA_CASES = [  # (B, N, H, d, dtype, with_state, fused)
    (1, 1, 1, 40, torch.float32, False, False),
    (1, 1, 1, 40, torch.bfloat16, True, False),
    (2, 37, 3, 40, torch.float32, True, False),
    (2, 37, 1, 40, torch.bfloat16, False, True),
    (1, 130, 2, 112, torch.float32, True, True),
    (1, 130, 2, 112, torch.bfloat16, True, False),
    (2, 37, 1, 112, torch.bfloat16, False, False),
]


@runs_triton
@pytest.mark.parametrize("B,N,H,d,dtype,with_state,fused", LA_CASES)
def test_linear_attention_matches_reference(B, N, H, d, dtype, with_state, fused):
    g = torch.Generator().manual_seed(N * 1000 + d)
    q, k, v = qkv(B, N, H, d, dtype, g, fused)
    cos, sin = rope_tables(N, d, g)
    S0, z0 = past_state(B, 7, H, d, g) if with_state else (None, None)
    o, (S_c, z_c) = linear_attention(q, k, v, cos, sin, S0, z0, return_state=True, backend="triton")
    o_ref, (S_ref, z_ref) = linear_attention_ref(q, k, v, cos, sin, S0, z0, return_state=True)
    assert o.dtype == v.dtype and o.shape == v.shape and S_c.dtype == z_c.dtype == torch.float32
    for out in (o, S_c, z_c):
        assert torch.isfinite(out).all(), "an output element was left unwritten (NaN poison survived)"
    assert rel_err(o, o_ref) < TOL[dtype]
    # S_c, z_c are fp32 sums; with 16-bit inputs R k enters the products as hi + lo halves: 16 significant bits
    assert rel_err(S_c, S_ref) < (TOL[torch.float32] if dtype == torch.float32 else 2**-15)
    assert rel_err(z_c, z_ref) < TOL[torch.float32]
    o_only = linear_attention(q, k, v, cos, sin, S0, z0, backend="triton")
    assert torch.equal(o_only, o)


def projections(B, N, H, d, dtype, g):
    """q, k as their projections (signed, of any scale, per token: the norm removes it), v, and the norm's weights
    (signed: the ReLU after them matters)."""
    scale = torch.logspace(-2, 2, N)[None, :, None, None]
    q, k, v = (torch.randn(B, N, H, d, generator=g) * s for s in (scale, scale.flip(1), 1))
    w_q, w_k = torch.randn(2, H * d, generator=g)
    return *(a.to(DEVICE, dtype) for a in (q, k, v)), QKNorm(w_q.to(DEVICE, dtype), w_k.to(DEVICE, dtype), 1e-5)


def normed_reference(q, k, v, cos, sin, S0, z0, norm: QKNorm, return_state=False):
    """The fp64 reference of linear attention on q and k given as projections: the norms, then the attention."""
    wide = QKNorm(norm.w_q.double(), norm.w_k.double(), norm.eps)
    return linear_attention_ref(*normalized_qk(q.double(), k.double(), wide), v.double(), cos, sin, S0, z0,
                                return_state=return_state)


@runs_triton
@pytest.mark.parametrize("B,N,H,d,dtype,with_state,fused", LA_CASES)
def test_linear_attention_norms_q_and_k(B, N, H, d, dtype, with_state, fused):
    """qk_norm: q and k given as projections, RMS-normed (over all heads' channels) and ReLU'd inside the kernels,
    against the fp64 reference of the norms and the attention; the output as accurate as from normed inputs."""
    g = torch.Generator().manual_seed(N * 1000 + d + 1)
    q, k, v, norm = projections(B, N, H, d, dtype, g)
    cos, sin = rope_tables(N, d, g)
    S0, z0 = past_state(B, 7, H, d, g) if with_state else (None, None)
    o, (S_c, z_c) = linear_attention(q, k, v, cos, sin, S0, z0, return_state=True, backend="triton", qk_norm=norm)
    o_ref, (S_ref, z_ref) = normed_reference(q, k, v, cos, sin, S0, z0, norm, return_state=True)
    for out in (o, S_c, z_c):
        assert torch.isfinite(out).all(), "an output element was left unwritten (NaN poison survived)"
    assert rel_err(o, o_ref) < TOL[dtype]
    assert rel_err(S_c, S_ref) < TOL[torch.float32] and rel_err(z_c, z_ref) < TOL[torch.float32]
    on_cpu = linear_attention(q, k, v, cos, sin, S0, z0, return_state=True, backend="torch", qk_norm=norm)
    assert rel_err(on_cpu[0], o_ref) < TOL[dtype]  # the reference backend: the norms in the model's dtype


@runs_triton
def test_qk_norm_gradients_are_the_reference_gradients():
    """Training through the normed entry point: gradients for the projections, v, the norm weights and a carried
    state equal those of the plain norms then attention (q's RMS, which the kernels skip, changes no gradient)."""
    g = torch.Generator().manual_seed(6)
    B, N, H, d = 2, 37, 2, 40
    q, k, v, norm = projections(B, N, H, d, torch.float32, g)
    cos, sin = rope_tables(N, d, g)
    S0, z0 = past_state(B, 7, H, d, g)
    weights = [torch.randn(B, N, H, d, generator=g).to(DEVICE), torch.randn(B, H, d, d, generator=g).to(DEVICE),
               torch.randn(B, H, d, generator=g).to(DEVICE)]
    grads = {}
    for backend in ("triton", "torch"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, norm.w_q, norm.w_k, S0, z0)]
        o, (S_c, z_c) = linear_attention(*inputs[:3], cos, sin, *inputs[5:], return_state=True, backend=backend,
                                         qk_norm=QKNorm(*inputs[3:5], norm.eps))
        loss = sum((a * w).sum() for a, w in zip((o, S_c, z_c), weights))
        grads[backend] = torch.autograd.grad(loss, inputs)
    for a, b in zip(grads["triton"], grads["torch"]):
        assert b.abs().sum() > 0 and rel_err(a, b) < 1e-4


GLU_CASES = [  # (B, frames, height, width, C, dtype): pixel and channel counts that are not multiples of the tiles
    (2, 3, 5, 7, 40, torch.float32),
    (1, 2, 6, 9, 72, torch.bfloat16),
    (1, 1, 1, 1, 8, torch.float32),
    (1, 2, 4, 17, 16, torch.bfloat16),
    (1, 2, 3, 6, 64, torch.bfloat16),  # channels a multiple of the tile (no channel masks), width of the tiles
]


def glu_inputs(B, frames, height, width, C, dtype, g):
    h = torch.randn(B, frames * height * width, 2 * C, generator=g).to(DEVICE, dtype)
    weight = torch.randn(2 * C, 1, 3, 3, generator=g).to(DEVICE, dtype)
    return h, weight, torch.randn(2 * C, generator=g).to(DEVICE, dtype)


@runs_triton
@pytest.mark.parametrize("phases", [1, 2, 3])
@pytest.mark.parametrize("B,frames,height,width,C,dtype", GLU_CASES)
def test_glu_conv_matches_reference(B, frames, height, width, C, dtype, phases, monkeypatch):
    """Against the reference in fp64 (the kernel keeps fp32 throughout, the reference rounds each op to its dtype);
    a row's columns in 1, 2 and 3 phases, with strips narrower and shorter than the frame."""
    monkeypatch.setattr(triton_glu_conv, "CONFIG", dataclasses.replace(triton_glu_conv.CONFIG, phases=phases))
    h, weight, bias = glu_inputs(B, frames, height, width, C, dtype, torch.Generator().manual_seed(C + width))
    o = glu_conv(h, weight, bias, height, width, backend="triton")
    assert (o.shape, o.dtype) == ((B, h.shape[1], C), dtype)
    assert torch.isfinite(o).all(), "an output element was left unwritten (NaN poison survived)"
    exact = glu_conv_ref(h.double(), weight.double(), bias.double(), height, width)
    assert rel_err(o, exact) < TOL[dtype]
    assert rel_err(o, exact) <= rel_err(glu_conv_ref(h, weight, bias, height, width), exact) * 1.5


@runs_triton
def test_glu_conv_gradients_are_the_reference_gradients():
    g = torch.Generator().manual_seed(9)
    inputs = [t.requires_grad_() for t in glu_inputs(2, 2, 3, 5, 24, torch.float32, g)]
    w = torch.randn(2, 30, 24, generator=g).to(DEVICE)
    got = torch.autograd.grad((glu_conv(*inputs, 3, 5, backend="triton") * w).sum(), inputs)
    want = torch.autograd.grad((glu_conv_ref(*inputs, 3, 5) * w).sum(), inputs)
    for a, b in zip(got, want):
        assert a.shape == b.shape and b.abs().sum() > 0
        assert rel_err(a, b) < TOL[torch.float32]


@runs_triton
def test_linear_attention_state_carries_across_chunks():
    """Two chunks run one after the other with the carried state equal the second chunk of a causal reference."""
    g = torch.Generator().manual_seed(3)
    B, N, H, d = 1, 40, 2, 40
    q, k, v = qkv(B, 2 * N, H, d, torch.float32, g)
    cos, sin = rope_tables(2 * N, d, g)
    first = slice(0, N)
    _, (S1, z1) = linear_attention(q[:, first], k[:, first], v[:, first], cos[first], sin[first], return_state=True,
                                   backend="triton")
    second = slice(N, 2 * N)
    o2 = linear_attention(q[:, second], k[:, second], v[:, second], cos[second], sin[second], S1, z1,
                          backend="triton")
    # the second chunk attends to everything: the bidirectional reference over all tokens, restricted to chunk 2
    o_all = linear_attention_ref(q, k, v, cos, sin)
    assert rel_err(o2, o_all[:, second]) < TOL[torch.float32]


LN_CASES = [  # (B, N, D, dtype, per_token)
    (1, 1, 40, torch.float32, False),
    (2, 5, 112, torch.bfloat16, True),
    (2, 3, 2240, torch.float32, True),
    (1, 4, 2240, torch.bfloat16, False),
]


@runs_triton
@pytest.mark.parametrize("B,N,D,dtype,per_token", LN_CASES)
def test_ln_modulate_matches_reference(B, N, D, dtype, per_token):
    x, shift, scale = ln_inputs(B, N, D, dtype, per_token, torch.Generator().manual_seed(D + N))
    y = ln_modulate(x, shift, scale, backend="triton")
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.isfinite(y).all(), "an output element was left unwritten (NaN poison survived)"
    assert rel_err(y, ln_modulate_ref(x, shift, scale)) < TOL[dtype]


@runs_triton
@pytest.mark.parametrize("B,N,D,dtype,per_token", LN_CASES)
def test_ln_modulate_fp8_matches_reference(B, N, D, dtype, per_token):
    """The FP8 variant: the same row scales as quantizing the fp32 result, and the same e4m3 values but for the odd
    one that an fp32 rounding difference in the row's statistics puts on the other side of a rounding boundary."""
    x, shift, scale = ln_inputs(B, N, D, dtype, per_token, torch.Generator().manual_seed(D + N + 1))
    y = ln_modulate_fp8(x, shift, scale, backend="triton")
    assert_quantized_like(y, ln_modulate_fp8_ref(x, shift, scale), x.shape)


def assert_quantized_like(y, y_ref, shape):
    """A kernel's FP8 rows against the reference's: the same row scales, each row's largest magnitude on e4m3's
    largest number, at most 1% of the e4m3 values a rounding step apart."""
    (q, s), (q_ref, s_ref) = y, y_ref
    assert (q.dtype, q.shape, s.dtype, s.shape) == (FP8, shape, torch.float32, (*shape[:-1], 1))
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all(), "an output element was left unwritten"
    assert rel_err(s, s_ref) < 1e-5
    assert (q.float().abs().amax(-1) == FP8_MAX).all()
    assert (q.float() != q_ref.float()).float().mean() <= 0.01
    assert rel_err(y.dequantized(), y_ref.dequantized()) < 1e-2


def ln_inputs(B, N, D, dtype, per_token, g):
    """x, with a mean and a spread to normalize away, and shift, scale as strided rows of a modulation tensor, as
    the model passes them."""
    x = (3 * torch.randn(B, N, D, generator=g) + 1).to(DEVICE, dtype)
    mods = torch.randn(B, N if per_token else 1, 6, D, generator=g).to(DEVICE, dtype)
    return x, mods[:, :, 0], mods[:, :, 1]


def residual_inputs(B, N, D, dtype, per_token, g):
    """ln_inputs and the branch output a that the block adds to x (a strided view: every other D-wide half of a
    wider tensor): x, a, shift, scale."""
    x, shift, scale = ln_inputs(B, N, D, dtype, per_token, g)
    return x, torch.randn(B, N, 2 * D, generator=g).to(DEVICE, dtype)[..., D:], shift, scale


def assert_is_the_sum(total, x, a):
    """x + a as PyTorch rounds it; under the interpreter, whose fp32 -> bf16 conversion truncates, within bf16's
    tolerance instead."""
    assert total.dtype == x.dtype and total.shape == x.shape and torch.isfinite(total).all()
    if CUDA or x.dtype == torch.float32:
        assert torch.equal(total, x + a)
    else:
        assert rel_err(total, x + a) < TOL[x.dtype]


@runs_triton
@pytest.mark.parametrize("B,N,D,dtype,per_token", LN_CASES)
@pytest.mark.parametrize("fp8", [False, True])
def test_add_ln_modulate_matches_reference(B, N, D, dtype, per_token, fp8):
    """The residual add before the norm, in the norm's pass: the sum, and the norm of the sum it wrote (bf16 or
    quantized to e4m3)."""
    x, a, shift, scale = residual_inputs(B, N, D, dtype, per_token, torch.Generator().manual_seed(D + N + fp8))
    total, y = (add_ln_modulate_fp8 if fp8 else add_ln_modulate)(x, a, shift, scale, backend="triton")
    assert_is_the_sum(total, x, a)
    if fp8:
        assert_quantized_like(y, ln_modulate_fp8_ref(total, shift, scale), x.shape)
    else:
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.isfinite(y).all(), "an output element was left unwritten (NaN poison survived)"
        assert rel_err(y, ln_modulate_ref(total, shift, scale)) < TOL[dtype]


@runs_triton
def test_add_ln_modulate_refuses_an_addend_unlike_x():
    x, a, shift, scale = residual_inputs(1, 3, 40, torch.float32, False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="addend must be x's shape and dtype"):
        add_ln_modulate(x, a[:, :2], shift, scale, backend="triton")
    with pytest.raises(ValueError, match="addend must be x's shape and dtype"):
        add_ln_modulate_fp8(x, a.double(), shift, scale, backend="triton")


QUANT_CASES = [  # (leading shape, K, dtype, strided): the attention outputs and z (2240), the FFN's middle (6720)
    ((1, 3), 40, torch.float32, False),
    ((2, 5), 112, torch.bfloat16, True),
    ((3,), 2240, torch.float32, True),
    ((1, 7), 6720, torch.bfloat16, False),
]


def quant_input(lead, K, dtype, strided, g):
    """Rows of magnitudes 1e-2 .. 1e2 (one row zero), each with a range inside it; `strided`: a view of every
    other row of a wider tensor, as a slice of a larger activation would be."""
    x = torch.randn(*lead, 2 if strided else 1, K, generator=g) * torch.logspace(-1, 1, K)
    x = x * torch.logspace(-2, 2, x[..., 0].numel()).view(x.shape[:-1] + (1,))
    x.view(-1, K)[0] = 0
    x = x.to(DEVICE, dtype)
    return x[..., 0, :] if strided else x[..., 0, :].contiguous()


@runs_triton
@pytest.mark.parametrize("lead,K,dtype,strided", QUANT_CASES)
def test_quantize_rows_matches_reference(lead, K, dtype, strided):
    """The same scales, and the same e4m3 values but for the odd one that the GPU's division (within 2 ulp) puts on
    the other side of a rounding boundary; every row's largest magnitude on e4m3's largest number."""
    x = quant_input(lead, K, dtype, strided, torch.Generator().manual_seed(K))
    (q, s), (q_ref, s_ref) = quantize_rows(x, backend="triton"), quantize_rows_ref(x)
    assert (q.dtype, q.shape, s.dtype, s.shape) == (FP8, x.shape, torch.float32, (*lead, 1))
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all(), "an output element was left unwritten"
    assert rel_err(s, s_ref) < 1e-6
    assert (q.float().flatten(0, -2)[1:].abs().amax(-1) == FP8_MAX).all()  # row 0 is zero
    assert (q.float() != q_ref.float()).float().mean() <= 0.01
    assert rel_err(q.float() * s, q_ref.float() * s_ref) < 1e-2


@runs_triton
def test_quantize_rows_non_finite_rows_are_the_references():
    """A NaN makes its row's scale NaN, an infinity its row's scale infinite and itself NaN, as in the reference:
    either row dequantizes to NaN everywhere (Triton's own max and clamp drop NaN). Other rows are untouched."""
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(9))
    x[1, 3], x[2, 5], x[2, 6] = float("nan"), float("inf"), -float("inf")
    x = x.to(DEVICE)
    got, want = quantize_rows(x, backend="triton"), quantize_rows_ref(x)
    assert torch.equal(got.scale.isnan(), want.scale.isnan()) and torch.equal(got.q.float().isnan(),
                                                                               want.q.float().isnan())
    assert got.dequantized()[1:3].isnan().all() and torch.isfinite(got.dequantized()[[0, 3]]).all()
    assert torch.equal(got.scale[[0, 3]], want.scale[[0, 3]])


@runs_triton
def test_quantize_rows_too_wide_for_the_kernel_runs_the_reference(monkeypatch):
    monkeypatch.setattr(triton_quantize, "MAX_K", 32)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert not triton_quantize.supports(x)
    got, want = quantize_rows(x, backend="triton"), quantize_rows_ref(x)
    assert torch.equal(got.q.float(), want.q.float()) and torch.equal(got.scale, want.scale)


def prompt_attention_inputs(B, N, H, d, L, dtype, g, padded=True):
    """q (B, N, H*d) as the q projection gives it; k, v (B, H, L, d) as `CrossAttention.text_kv` gives them (views
    of (B, L, H, d) memory); the padding bias of prompts of different lengths (0 kept, -10000 dropped), or None."""
    q = (2 * torch.randn(B, N, H * d, generator=g)).to(DEVICE, dtype)  # peaked softmaxes, not flat ones
    k, v = (torch.randn(B, L, H, d, generator=g).to(DEVICE, dtype).transpose(1, 2) for _ in range(2))
    if not padded:
        return q, k, v, None
    kept = torch.arange(L)[None, :] < torch.tensor([L, max(1, L - 5)][:B])[:, None]  # the second prompt is shorter
    return q, k, v, ((~kept).to(dtype) * -10000.0)[:, None, None, :].to(DEVICE)


CROSS_CASES = [  # (B, N, H, d, L, dtype, padded): token and key counts that are not multiples of the tiles
    (1, 1, 1, 40, 1, torch.float32, False),
    (2, 37, 3, 40, 7, torch.bfloat16, True),
    (2, 70, 2, 112, 77, torch.float32, True),
    (1, 45, 2, 112, 300, torch.bfloat16, True),
]


@runs_triton
@pytest.mark.parametrize("B,N,H,d,L,dtype,padded", CROSS_CASES)
@pytest.mark.parametrize("normed", [False, True])
def test_cross_attention_matches_reference(B, N, H, d, L, dtype, padded, normed):
    """Against the reference in fp64 on the same (rounded) inputs, q given normed or as its projection with the norm's
    weight (normed in the kernel, against rms_norm in fp64); the padded keys of the shorter prompt change nothing."""
    g = torch.Generator().manual_seed(N + L)
    q, k, v, bias = prompt_attention_inputs(B, N, H, d, L, dtype, g, padded)
    q_norm = (1 + 0.5 * torch.randn(H * d, generator=g)).to(DEVICE, dtype), 1e-6
    o = cross_attention(q, k, v, bias, backend="triton", q_norm=q_norm if normed else None)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert torch.isfinite(o).all(), "an output element was left unwritten (NaN poison survived)"
    q_in = rms_norm(q.double(), q_norm[0].double(), q_norm[1]) if normed else q
    exact = cross_attention_ref(*(x if x is None else x.double() for x in (q_in, k, v, bias)))
    assert rel_err(o, exact) < TOL[dtype]
    if padded and B > 1:  # the second prompt's padding is never read: even NaN there changes nothing
        k2, v2 = k.clone(), v.clone()
        k2[1, :, -5:], v2[1, :, -5:] = float("nan"), float("nan")
        o2 = cross_attention(q, k2, v2, bias, backend="triton", q_norm=q_norm if normed else None)
        assert torch.equal(o2[1], o[1])


@runs_triton
@pytest.mark.parametrize("kind", ["all padding", "a hole", "soft tail", "per-sample rows"])
def test_cross_attention_reads_every_key_with_a_weight(kind):
    """Keys after the last one above NO_WEIGHT_BIAS are skipped, no others: a row of padding only (the reference
    weighs all its keys alike), padding between kept keys, a tail of small but nonzero weights (a blend of two
    prompts gives such biases), and two samples' rows of different lengths against one of them broadcast."""
    B, N, H, d, L = 2, 19, 2, 40, 45
    q, k, v, _ = prompt_attention_inputs(B, N, H, d, L, torch.float32, torch.Generator().manual_seed(5), False)
    bias = torch.zeros(B, 1, 1, L)
    if kind == "all padding":
        bias[:] = -10000.0
    elif kind == "a hole":
        bias[..., 3:30] = -10000.0
    elif kind == "soft tail":
        bias[..., 20:] = -5.0
    else:
        bias[0, ..., 9:], bias[1, ..., 33:] = -10000.0, -10000.0
    bias = bias.to(DEVICE)
    for b in (bias, bias[:1]):
        o = cross_attention(q, k, v, b, backend="triton")
        exact = cross_attention_ref(q.double(), k.double(), v.double(), b.double())
        assert torch.isfinite(o).all()  # fp32 scores near -10000 keep 1e-3 of their value: the reference's error too
        assert rel_err(o, exact) < max(TOL[torch.float32], 2 * rel_err(cross_attention_ref(q, k, v, b), exact))


@runs_triton
def test_cross_attention_checks_its_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v, bias = prompt_attention_inputs(2, 5, 2, 40, 7, torch.float32, g)
    for args, match in (((q[..., :-1], k, v, bias), "does not fit"), ((q, k, v[..., :3], bias), "one"),
                        ((q, k, v, bias[..., :3]), "bias must be"), ((q.double(), k, v, bias), "share a dtype")):
        with pytest.raises(ValueError, match=match):
            cross_attention(*args, backend="triton")
    with pytest.raises(ValueError, match="q's norm needs its weight"):
        cross_attention(q, k, v, bias, backend="triton", q_norm=(q.new_ones(5), 1e-6))
    assert torch.equal(cross_attention(q, k, v, bias, backend="torch"), cross_attention_ref(q, k, v, bias))


@runs_triton
@pytest.mark.parametrize("with_state", [False, True])
def test_gradients_are_the_reference_gradients(with_state):
    """Training runs the entry points: where inputs require grad, the Triton ops' gradients equal the reference's
    (the backward is the reference's vector-Jacobian product), for every differentiable input and output."""
    g = torch.Generator().manual_seed(5)
    B, N, H, d = 2, 37, 2, 40
    q, k, v = qkv(B, N, H, d, torch.float32, g)
    cos, sin = rope_tables(N, d, g)
    S0, z0 = past_state(B, 7, H, d, g) if with_state else (None, None)
    x = (3 * torch.randn(B, N, H * d, generator=g) + 1).to(DEVICE)
    mods = torch.randn(B, 1, 2, H * d, generator=g).to(DEVICE)
    w_c = 1 + torch.randn(H * d, generator=g).to(DEVICE)  # the cross-attention's q norm weight
    weights = [torch.randn(B, N, H, d, generator=g).to(DEVICE), torch.randn(B, H, d, d, generator=g).to(DEVICE),
               torch.randn(B, H, d, generator=g).to(DEVICE), torch.randn(B, N, H * d, generator=g).to(DEVICE),
               torch.randn(B, N, H * d, generator=g).to(DEVICE)]

    def loss(backend, *inputs):  # a weighted sum of all outputs: every output's gradient flows back
        q, k, v, S0, z0, x, shift, scale, w_c = inputs
        o, (S_c, z_c) = linear_attention(q, k, v, cos, sin, S0, z0, return_state=True, backend=backend)
        y = ln_modulate(x, shift, scale, backend=backend)
        c = cross_attention(x, k.transpose(1, 2)[:, :, :9], v.transpose(1, 2)[:, :, :9], None, backend=backend,
                            q_norm=(w_c, 1e-6))
        if backend == "triton":  # the Triton ops ran, with their own backward (no fallback to the reference)
            assert all("longsana_" in type(a.grad_fn).__name__ for a in (o, y, c))
        return sum((a * w).sum() for a, w in zip((o, S_c, z_c, y, c), weights))

    inputs = [t if t is None else t.clone().requires_grad_() for t in (q, k, v, S0, z0, x, mods[:, :, 0],
                                                                        mods[:, :, 1], w_c)]
    wrt = [t for t in inputs if t is not None]
    got = torch.autograd.grad(loss("triton", *inputs), wrt)
    want = torch.autograd.grad(loss("torch", *inputs), wrt)
    assert len(got) == (9 if with_state else 7)
    for a, b in zip(got, want):
        assert a.shape == b.shape and b.abs().sum() > 0
        assert rel_err(a, b) < TOL[torch.float32]


@runs_triton
def test_training_step_through_the_triton_kernels(monkeypatch):
    """A training step of the transformer (block-causal whole-sequence forward, backward) with the Triton kernels
    everywhere gives the parameter gradients of the PyTorch reference kernels."""
    from longsana.config import get_config
    from longsana.kernels import backend
    from longsana.model import LongSANATransformer
    from longsana.testing import randomize_

    cfg = get_config("tiny").transformer
    torch.manual_seed(0)
    model = randomize_(LongSANATransformer(cfg)).to(DEVICE)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, cfg.in_channels, 3, 4, 6, generator=g).to(DEVICE)
    y, t = torch.randn(2, 5, cfg.caption_channels, generator=g).to(DEVICE), torch.tensor([500.0, 20.0], device=DEVICE)
    grads = {}
    for kernels in ("triton", "torch"):
        monkeypatch.setattr(backend, "BACKEND", kernels)
        model.zero_grad()
        model(x, y, t, chunks=[1, 2]).square().mean().backward()
        grads[kernels] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["triton"], grads["torch"]):
        assert rel_err(a, b) < TOL[torch.float32]
    assert sum(b.abs().sum() > 0 for b in grads["torch"]) > len(grads["torch"]) // 2


@runs_triton
def test_dispatch():
    g = torch.Generator().manual_seed(0)
    q, k, v = qkv(1, 5, 1, 40, torch.float32, g)
    cos, sin = rope_tables(5, 40, g)
    ref = linear_attention_ref(q, k, v, cos, sin)
    assert torch.equal(linear_attention(q, k, v, cos, sin, backend="torch"), ref)
    x = torch.randn(1, 3, 40, generator=g).to(DEVICE)
    assert torch.equal(ln_modulate(x, x[:, :1], x[:, 1:2], backend="torch"), ln_modulate_ref(x, x[:, :1], x[:, 1:2]))
    with pytest.raises(ValueError, match="backend"):
        ln_modulate(x, x, x, backend="cuda")
    with pytest.raises(ValueError, match="cos, sin"):
        linear_attention(q, k, v, cos[:, :3], sin, backend="triton")
    with pytest.raises(ValueError, match="S0 and z0"):
        linear_attention(q, k, v, cos, sin, S0=torch.zeros(1, 1, 40, 40, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="q/k norm needs"):
        linear_attention(q, k, v, cos, sin, backend="triton", qk_norm=QKNorm(cos[0], cos[0], 1e-5))
    h, weight, bias = glu_inputs(1, 2, 3, 5, 4, torch.float32, g)
    with pytest.raises(ValueError, match="multiple of 3 x 4"):
        glu_conv(h, weight, bias, 3, 4, backend="triton")


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
def test_auto_backend_uses_reference_on_cpu(monkeypatch):
    def refuse(*args):
        raise AssertionError("the Triton op ran on a CPU tensor under backend='auto'")

    monkeypatch.setattr("longsana.kernels.linear_attention.linear_attention_triton", refuse)
    monkeypatch.setattr("longsana.kernels.ln_modulate.ln_modulate_triton", refuse)
    monkeypatch.setattr("longsana.kernels.ln_modulate.ln_modulate_fp8_triton", refuse)
    monkeypatch.setattr("longsana.kernels.ln_modulate.add_ln_modulate_triton", refuse)
    monkeypatch.setattr("longsana.kernels.ln_modulate.add_ln_modulate_fp8_triton", refuse)
    monkeypatch.setattr("longsana.kernels.glu_conv.glu_conv_triton", refuse)
    monkeypatch.setattr(triton_quantize, "quantize_rows_triton", refuse)
    monkeypatch.setattr("longsana.kernels.cross_attention.cross_attention_triton", refuse)
    g = torch.Generator().manual_seed(0)
    q, k, v = qkv(1, 5, 1, 40, torch.float32, g)
    cos, sin = rope_tables(5, 40, g)
    linear_attention(q, k, v, cos, sin)
    ln_modulate(q[0], q[0, :1], q[0, :1])
    ln_modulate_fp8(q[0], q[0, :1], q[0, :1])
    add_ln_modulate(q[0], k[0], q[0, :1], q[0, :1])
    add_ln_modulate_fp8(q[0], k[0], q[0, :1], q[0, :1])
    glu_conv(*glu_inputs(1, 1, 2, 3, 4, torch.float32, g), 2, 3)
    quantize_rows(q[0])
    cross_attention(*prompt_attention_inputs(1, 5, 1, 40, 7, torch.float32, g))


@pytest.mark.skipif(INTERPRETER, reason="Triton's interpreter would run the kernels on the fake tensors")
@pytest.mark.skipif(older(torch, (2, 11)), reason="torch before 2.11 asks Triton's GPU driver for the kernel even to "
                    "trace fake tensors (on a machine without a GPU, 2.7 fails)")
def test_fake_tensors_give_shapes():
    """torch.compile traces the ops with fake tensors: the shapes and dtypes must come out without running."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 37, 3, 112, dtype=torch.bfloat16, device=DEVICE)
        cos = torch.empty(37, 56, device=DEVICE)
        S0, z0 = torch.empty(2, 3, 112, 112, device=DEVICE), torch.empty(2, 3, 112, device=DEVICE)
        o, S_c, z_c = torch.ops.longsana.linear_attention(q, q, q, cos, cos, S0, z0, 1e-8)
        y = torch.ops.longsana.ln_modulate(q[:, :, 0], q[:, :1, 0], q[:, :, 1], 1e-6)
        y_q, y_s = torch.ops.longsana.ln_modulate_fp8(q[:, :, 0], q[:, :1, 0], q[:, :, 1], 1e-6)
        r, r_y = torch.ops.longsana.add_ln_modulate(q[:, :, 0], q[:, :, 1], q[:, :1, 0], q[:, :, 1], 1e-6)
        r8, r_q, r_s = torch.ops.longsana.add_ln_modulate_fp8(q[:, :, 0], q[:, :, 1], q[:, :1, 0], q[:, :, 1], 1e-6)
        h = torch.empty(2, 35, 48, dtype=torch.bfloat16, device=DEVICE)
        u = torch.ops.longsana.glu_conv(h, h.new_empty(48, 1, 3, 3), h.new_empty(48), 5, 7)
        u_q, u_s = torch.ops.longsana.quantize_rows(h[:, :, :40])
        kv = torch.empty(2, 3, 300, 112, dtype=torch.bfloat16, device=DEVICE)
        c = torch.ops.longsana.cross_attention(q.flatten(2), kv, kv, kv.new_empty(2, 1, 1, 300))
    assert (u.shape, u.dtype) == ((2, 35, 24), torch.bfloat16)
    assert (u_q.shape, u_q.dtype, u_s.shape, u_s.dtype) == ((2, 35, 40), FP8, (2, 35, 1), torch.float32)
    assert (c.shape, c.dtype) == ((2, 37, 336), torch.bfloat16)
    assert (o.shape, o.dtype) == (q.shape, q.dtype)
    assert (S_c.shape, S_c.dtype, z_c.shape) == (S0.shape, torch.float32, z0.shape)
    assert (y.shape, y.dtype) == ((2, 37, 112), torch.bfloat16)
    assert (y_q.shape, y_q.dtype, y_s.shape, y_s.dtype) == ((2, 37, 112), FP8, (2, 37, 1), torch.float32)
    assert all((t.shape, t.dtype) == ((2, 37, 112), torch.bfloat16) for t in (r, r_y, r8))
    assert (r_q.shape, r_q.dtype, r_s.shape, r_s.dtype) == ((2, 37, 112), FP8, (2, 37, 1), torch.float32)


# ---- tiles that fit a GPU's shared memory ----

def test_tile_is_the_largest_that_fits():
    tile = triton_linear_attention.tile
    assert tile(torch.bfloat16, SHARED_MEMORY[90]) == (128, 2)  # the tuned default
    assert tile(torch.bfloat16, SHARED_MEMORY[80]) == (64, 2)  # an A100 lacks the 225 KB of (128, 2)
    assert tile(torch.float32, SHARED_MEMORY[90]) == (64, 2)  # (128, 2) would take 256 KB
    assert tile(torch.float16, SHARED_MEMORY[89]) == tile(torch.float32, SHARED_MEMORY[89]) == (64, 1)
    assert tile(torch.float32, 64 * 1024) is None and tile(torch.float64, None) is None
    assert tile(torch.float32, None) == (64, 2)  # no limit (the interpreter): the largest


def test_tile_lookup_is_a_constant_to_torch_compile():
    """The device's shared memory, which picks the tile, is taken as a value while tracing: no graph break, and no
    dynamo warning about tracing a cached function (one on every compile with functools.cache)."""
    x = torch.ones(2, 3, 1, 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.compile(lambda x: x * triton_linear_attention.supports(x), fullgraph=True, backend="eager")
        assert torch.equal(traced(x), x)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]


@runs_triton
def test_what_no_tile_fits_runs_the_reference():
    """Head dims over 128 and fp64 go to the reference, even when the Triton backend is asked for."""
    g = torch.Generator().manual_seed(4)
    for d, dtype in ((256, torch.float32), (40, torch.float64)):
        q, k, v = qkv(1, 9, 1, d, dtype, g)
        cos, sin = rope_tables(9, d, g)
        assert not triton_linear_attention.supports(v)
        got = linear_attention(q, k, v, cos, sin, backend="triton")
        assert torch.equal(got, linear_attention_ref(q, k, v, cos, sin))


@pytest.mark.skipif(INTERPRETER, reason="compiles for a GPU; needs no interpreter")
@pytest.mark.parametrize("silu", ["tanh", "tanh_bf16x2"])
@pytest.mark.parametrize("stages", [1, 2])
def test_glu_conv_compiles_for_hopper_with_few_spills(silu, stages):
    """The FFN kernel at the default tiling, each GPU SiLU, with and without a pipelined row loop, through Triton's
    compiler and ptxas for sm_90 (no GPU needed), at the full model's 480p frame and with the alignment Triton sees
    at its launch: at most a few register spills (an earlier, unrolled kernel spilled 4,544 bytes and ran 12x slower
    than unfused code on the H200); the rows and taps as vector loads; the packed SiLU as bf16x2 instructions. At the
    default setting a row step issues at most two instructions per multiply-add of the convolution: the kernel's
    time goes to issuing them (627 with Triton 3.6 and 641 with 3.9 before the frame's sizes were constants)."""
    default = triton_glu_conv.GluConvConfig()
    tuned = dataclasses.replace(default, num_stages=stages, silu=silu)
    signature = {"h_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*bf16", "o_ptr": "*bf16"}
    (height, width), C = FRAME_HW, TransformerConfig().ffn_dim
    consts = dict(H=height, W=width, C=C, BLOCK_X=tuned.block_x, BLOCK_C=tuned.block_c, ROWS=tuned.rows,
                  K=tuned.phases, SILU=triton_glu_conv.SILU_MODES.index(silu), STAGES=tuned.num_stages,
                  EVEN_C=C % tuned.block_c == 0)
    compiled = compile_for(triton_glu_conv._glu_conv_kernel, signature, consts, 90,
                           divisible=("h_ptr", "w_ptr", "b_ptr", "o_ptr"), num_warps=tuned.num_warps)
    ptx = compiled.asm["ptx"]
    assert stack_bytes(compiled) <= 128
    assert ("cp.async" in ptx) == (stages > 1)  # pipelined: the next rows' loads in flight
    assert ("tanh.approx.bf16x2" in ptx) == (silu == "tanh_bf16x2")
    assert "ld.global.b16" not in ptx  # no 2-byte loads
    if tuned == default:
        fmas = 9 * 2 * tuned.phases * tuned.block_x * tuned.block_c // (32 * tuned.num_warps)  # a thread's, a row
        assert len(loop_instructions(compiled)) <= 2 * fmas


FP64_MATH = re.compile(r"\b(?:add|sub|mul|div|fma|sqrt|rcp)\.[a-z.]*f64\b")  # fp64 arithmetic in PTX


def ln_modulate_signature(y: str) -> dict:
    """The LayerNorm-modulate kernel's argument types, eps as fp64: inductor types a Python float so."""
    strides = ("stride_xb", "stride_xn", "stride_ab", "stride_an", "stride_sb", "stride_sn", "stride_sd",
               "stride_cb", "stride_cn", "stride_cd")
    return {"x_ptr": "*bf16", "a_ptr": "*bf16", "shift_ptr": "*bf16", "scale_ptr": "*bf16", "y_ptr": y,
            "s_ptr": "*fp32", "sum_ptr": "*bf16", "M": "i32", "N": "i32", "D": "i32", "eps": "fp64",
            **dict.fromkeys(strides, "i32")}


@pytest.mark.skipif(INTERPRETER, reason="compiles for GPUs; needs no interpreter")
@pytest.mark.parametrize("arch", [89, 90])
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("add", [False, True])
def test_ln_modulate_compiles_for_gpus_in_fp32(arch, quant, add):
    """The LayerNorm-modulate kernel, bf16 out or e4m3 out (the FP8 blocks' norms), with or without the residual add,
    tuned config, full width, through Triton's compiler and ptxas for Ada and Hopper (no GPU needed), with eps typed
    fp64 as inductor passes it: no fp64 arithmetic (on the H200 Triton 3.6 could not lower the e4m3 store from fp64
    under inductor)."""
    tuned, t = triton_ln_modulate.LnModulateConfig(), triton_ln_modulate
    consts = dict(ROWS=tuned.rows, BLOCK_D=triton.next_power_of_2(TransformerConfig().dim), QUANT=quant, ADD=add,
                  FP8_MAX=FP8_MAX, AMAX_FLOOR=t.AMAX_FLOOR)
    compiled = compile_for(t._ln_modulate_kernel, ln_modulate_signature("*fp8e4nv" if quant else "*bf16"), consts,
                           arch, num_warps=tuned.num_warps)
    assert not FP64_MATH.findall(compiled.asm["ptx"])


@pytest.mark.skipif(INTERPRETER, reason="compiles for GPUs; needs no interpreter")
@pytest.mark.parametrize("arch", [89, 90])
@pytest.mark.parametrize("K", [2240, 6720])
def test_quantize_rows_compiles_for_gpus(arch, K):
    """The quantization kernel at its default config and the model's widths, through Triton's compiler and ptxas for
    Ada and Hopper (no GPU needed): NaN-propagating max and clamp lower to PTX, with no register spills, and the
    rows are read as vector loads."""
    t = triton_quantize
    signature = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "K": "i32", "stride_xm": "i32"}
    consts = dict(ROWS=t.rows_per_program(K), BLOCK_K=triton.next_power_of_2(K), FP8_MAX=FP8_MAX,
                  AMAX_FLOOR=t.AMAX_FLOOR)
    compiled = compile_for(t._quantize_rows_kernel, signature, consts, arch,
                           divisible=("x_ptr", "q_ptr", "s_ptr", "K", "stride_xm"), num_warps=t.CONFIG.num_warps)
    ptx = compiled.asm["ptx"]
    assert stack_bytes(compiled) == 0
    assert "max.NaN.f32" in ptx and "ld.global.b16" not in ptx


@pytest.mark.skipif(INTERPRETER, reason="compiles for a GPU; needs no interpreter")
def test_linear_attention_output_in_fp32_under_inductor():
    """The output pass with eps typed fp64, as inductor passes a Python float: no fp64 arithmetic (its division was
    fp64 once, and the kernel 3x slower inside the compiled pass than alone)."""
    compiled = la_compile(triton_linear_attention._chunk_output_kernel, "bf16", 128, 2, 8, 90, eps="fp64")
    assert not FP64_MATH.findall(compiled.asm["ptx"])


@pytest.mark.skipif(INTERPRETER, reason="compiles for GPUs; needs no interpreter")
@pytest.mark.parametrize("arch", [89, 90])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cross_attention_compiles_for_gpus(arch, dtype):
    """The cross-attention kernel at head dim 112, each dtype's default tiling, through Triton's compiler and ptxas for
    Ada and Hopper (no GPU needed), its scale typed fp64 as inductor passes a Python float: no register spills on
    Hopper, a few bytes on Ada (16 in bf16, 40 in fp32), no fp64 arithmetic, and the shared memory the architecture
    has. With q's norm inside, q still goes to the tensor cores as loaded: no more loads from shared memory into
    registers than without the norm (q normed in registers was loaded back for every key tile, and the kernel took a
    third longer on an H100)."""
    compiled = cross_attention_compiled(arch, dtype, norm=True)
    ptx = compiled.asm["ptx"]
    assert stack_bytes(compiled) <= (0 if arch == 90 else 64)
    assert not FP64_MATH.findall(ptx)
    assert compiled.metadata.shared <= SHARED_MEMORY[arch]
    assert ptx.count("ldmatrix") == cross_attention_compiled(arch, dtype, norm=False).asm["ptx"].count("ldmatrix")


def cross_attention_compiled(arch: int, dtype: str, norm: bool):
    """The cross-attention kernel at head dim 112 and `dtype`'s default tiling (not the small one this module's
    tests run), compiled for sm_<arch> with the alignment of the model's launch (pointers and strides multiples of
    16)."""
    t = triton_cross_attention
    tiling = t.FP32_TILING if dtype == "fp32" else t.CrossAttentionConfig()
    consts = dict(D=112, BLOCK_D=128, BLOCK_M=tiling.block_m, BLOCK_L=tiling.block_l, HAS_BIAS=True, BLOCK_ALL_L=512,
                  NO_WEIGHT=t.NO_WEIGHT_BIAS, NORM=norm,
                  PRECISION="ieee" if dtype == "fp32" else None, UPCAST=False, LOG2E=t.LOG2E)
    kernel = t._cross_attention_kernel
    signature = {name: ("*fp32" if name == "r_ptr" else f"*{dtype}" if name.endswith("_ptr")
                        else "fp64" if name == "qk_scale" else "i32")
                 for name in kernel.arg_names if name not in consts}
    aligned = [name for name in signature  # the bias row's strides: 0 (one row for all samples) and 1
               if name.endswith("_ptr") or name.startswith("stride_") and name not in ("stride_bb", "stride_bl")]
    return compile_for(kernel, signature, consts, arch, divisible=aligned, num_warps=tiling.num_warps,
                       num_stages=tiling.num_stages)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER, reason="compiles for GPUs; needs no interpreter")
@pytest.mark.parametrize("arch", [80, 90])
def test_tiles_take_the_shared_memory_they_claim(arch):
    """Each TILES entry, compiled for the GPU architecture (no GPU needed: Triton's compiler and ptxas), takes at most
    the memory `tile` counts on, so that the tiling chosen for a device fits it."""
    tla, tuned = triton_linear_attention, triton_linear_attention.LinearAttentionConfig()
    for itemsize, dtype in ((2, "bf16"), (4, "fp32")):
        for block_n, stages, kb in tla.TILES[itemsize]:
            for kernel, warps in ((tla._chunk_state_kernel, tuned.state_warps), (tla._chunk_output_kernel,
                                                                               tuned.out_warps)):
                shared = la_shared_memory(kernel, dtype, block_n, stages, warps, arch)
                assert shared <= kb * 1024, (kernel.__name__, dtype, block_n, stages, shared)


# ---- GPU: full LongSANA shapes, torch.compile, CUDA graphs ----

FULL = dict(B=1, N=15600, H=20, d=112)  # one 10-latent-frame chunk of the 2B model at 480p


@pytest.fixture
def tuned(monkeypatch):
    """The default (tuned) linear-attention tiling instead of the small test one."""
    monkeypatch.setattr(triton_linear_attention, "CONFIG", triton_linear_attention.LinearAttentionConfig())


def full_inputs(dtype: torch.dtype, seed: int):
    """q, k, v, cos, sin, S0, z0 of one chunk at the FULL shape, a carried state of the same size."""
    g = torch.Generator().manual_seed(seed)
    B, N, H, d = FULL.values()
    return *qkv(B, N, H, d, dtype, g), *rope_tables(N, d, g), *past_state(B, N, H, d, g)


@needs_cuda
def test_linear_attention_full_shape(tuned):
    q, k, v, cos, sin, S0, z0 = full_inputs(torch.bfloat16, 0)
    o, (S_c, z_c) = linear_attention(q, k, v, cos, sin, S0, z0, return_state=True)
    o_ref, (S_ref, z_ref) = linear_attention_ref(q, k, v, cos, sin, S0, z0, return_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S_c).all()
    exact = linear_attention_ref(*(x.double() for x in (q, k, v, cos, sin, S0, z0)))
    # as accurate as the fp32 reference (both are dominated by rounding o to bf16), and close to it
    assert rel_err(o, exact) < 1.1 * rel_err(o_ref, exact)
    assert rel_err(o, o_ref) < TOL[torch.bfloat16]
    assert rel_err(S_c, S_ref) < 2**-15 and rel_err(z_c, z_ref) < TOL[torch.float32]


@needs_cuda
def test_linear_attention_full_shape_fp32(tuned):
    """fp32 on the GPU at full size: exact fp32 products, with the tile that fits (no OutOfResources)."""
    q, k, v, cos, sin, S0, z0 = full_inputs(torch.float32, 5)
    o, (S_c, z_c) = linear_attention(q, k, v, cos, sin, S0, z0, return_state=True)
    exact = linear_attention_ref(*(x.double() for x in (q, k, v, cos, sin, S0, z0)), return_state=True)
    for got, want in zip((o, S_c, z_c), (exact[0], *exact[1])):
        assert rel_err(got, want) < TOL[torch.float32]


@needs_cuda
@pytest.mark.parametrize("silu", triton_glu_conv.SILU_MODES)
@pytest.mark.parametrize("phases,block_x", [(1, 64), (4, 16), (7, 8)])
def test_glu_conv_full_shape(silu, phases, block_x, monkeypatch):
    """The FFN's middle of a 10-latent-frame chunk at 480p: 10 frames of 30 x 52 tokens, 2C = 13440; each SiLU, a
    row in 1, 4 and 7 phases."""
    config = triton_glu_conv.GluConvConfig(silu=silu, phases=phases, block_x=block_x)
    monkeypatch.setattr(triton_glu_conv, "CONFIG", config)
    h, weight, bias = glu_inputs(1, 10, 30, 52, TransformerConfig().ffn_dim, torch.bfloat16,
                                 torch.Generator().manual_seed(6))
    o = glu_conv(h, weight, bias, 30, 52, backend="triton")
    assert torch.isfinite(o).all()
    assert rel_err(o, glu_conv_ref(h.float(), weight.float(), bias.float(), 30, 52)) < TOL[torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_attention_norms_q_and_k_full_shape(tuned, dtype):
    g = torch.Generator().manual_seed(4)
    B, N, H, d = FULL.values()
    q, k, v, norm = projections(B, N, H, d, dtype, g)
    cos, sin = rope_tables(N, d, g)
    S0, z0 = past_state(B, N, H, d, g)
    o = linear_attention(q, k, v, cos, sin, S0, z0, qk_norm=norm)
    o_ref = normed_reference(q, k, v, cos, sin, S0, z0, norm)
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_attention_full_shape(dtype, monkeypatch):
    """A 10-latent-frame chunk's 15,600 tokens to a 300-token prompt of which 120 are kept, 20 heads of 112, at the
    default tiling of each dtype: as accurate as PyTorch's own attention in that dtype, against fp64."""
    monkeypatch.setattr(triton_cross_attention, "CONFIG", triton_cross_attention.CrossAttentionConfig())
    q, k, v, _ = prompt_attention_inputs(1, FULL["N"], 20, 112, 300, dtype, torch.Generator().manual_seed(7), False)
    bias = torch.zeros(1, 1, 1, 300, dtype=dtype, device=DEVICE)
    bias[..., 120:] = -10000.0
    o = cross_attention(q, k, v, bias, backend="triton")
    exact = cross_attention_ref(q.double(), k.double(), v.double(), bias.double())
    assert torch.isfinite(o).all()
    assert rel_err(o, exact) < max(TOL[dtype], 1.5 * rel_err(cross_attention_ref(q, k, v, bias), exact))
    q_norm = (1 + 0.5 * torch.randn(20 * 112, generator=torch.Generator().manual_seed(8))).to(DEVICE, dtype), 1e-6
    o = cross_attention(q, k, v, bias, backend="triton", q_norm=q_norm)  # q as its projection, normed inside
    exact = cross_attention_ref(rms_norm(q.double(), q_norm[0].double(), q_norm[1]), k.double(), v.double(),
                                bias.double())
    assert rel_err(o, exact) < max(TOL[dtype], 1.5 * rel_err(cross_attention(q, k, v, bias, "torch", q_norm), exact))


@needs_cuda
@pytest.mark.parametrize("per_token", [False, True])
def test_ln_modulate_full_shape(per_token):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(1, FULL["N"], 2240, generator=g) + 1).to(DEVICE, torch.bfloat16)
    mods = torch.randn(1, FULL["N"] if per_token else 1, 6, 2240, generator=g).to(DEVICE)
    shift, scale = mods[:, :, 0], mods[:, :, 1]
    y = ln_modulate(x, shift, scale)
    assert torch.isfinite(y).all()
    assert rel_err(y, ln_modulate_ref(x, shift, scale)) < TOL[torch.bfloat16]
    assert_quantized_like(ln_modulate_fp8(x, shift, scale), ln_modulate_fp8_ref(x, shift, scale), x.shape)
    a = torch.randn(x.shape, generator=g).to(DEVICE, torch.bfloat16)  # the residual add before the FFN's norm
    total, y = add_ln_modulate(x, a, shift, scale)
    assert torch.equal(total, x + a) and rel_err(y, ln_modulate_ref(x + a, shift, scale)) < TOL[torch.bfloat16]
    total, y = add_ln_modulate_fp8(x, a, shift, scale)
    assert torch.equal(total, x + a)
    assert_quantized_like(y, ln_modulate_fp8_ref(x + a, shift, scale), x.shape)


@needs_cuda
@pytest.mark.parametrize("K", [2240, 6720])
def test_quantize_rows_full_shape(K):
    """A chunk's attention output or z (2240 wide) and its FFN middle (6720), bf16, as the FP8 products get them."""
    x = quant_input((1, FULL["N"]), K, torch.bfloat16, False, torch.Generator().manual_seed(K))
    (q, s), (q_ref, s_ref) = quantize_rows(x), quantize_rows_ref(x)
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    assert rel_err(s, s_ref) < 1e-6 and (q.float() != q_ref.float()).float().mean() <= 0.01


@needs_cuda
def test_compile_and_cuda_graph(tuned, monkeypatch):
    """The ops (the FP8 norm and quantize_rows too) inside torch.compile(fullgraph=True) (no graph break) and a
    captured CUDA graph. Unpoisoned buffers: inductor traces the FP8 ops' allocations, and cannot compile a NaN fill
    of an e4m3 buffer (Triton has no e4m3 scalar constant: the failure seen on the H100); the other tests check every
    element is written."""
    monkeypatch.setattr(triton_common, "empty", UNPOISONED)
    g = torch.Generator().manual_seed(2)
    B, N, H, d = 1, 1560, 20, 112
    q, k, v = qkv(B, N, H, d, torch.bfloat16, g)
    cos, sin = rope_tables(N, d, g)
    S0, z0 = past_state(B, 50, H, d, g)
    x = torch.randn(B, N, H * d, generator=g).to(DEVICE, torch.bfloat16)
    mod = torch.randn(B, 1, 2, H * d, generator=g).to(DEVICE)
    weight, bias = glu_inputs(1, 1, 30, 52, H * d, torch.bfloat16, g)[1:]  # N = one 30 x 52 frame
    norm = QKNorm(*torch.randn(2, H * d, generator=g).to(DEVICE, torch.bfloat16), 1e-5)
    prompt = prompt_attention_inputs(B, 1, H, d, 300, torch.bfloat16, g)[1:]  # k, v, bias of a 300-token prompt

    def block(x, q, k, v):
        h = ln_modulate(x, mod[:, :, 0], mod[:, :, 1])
        o, (S_c, z_c) = linear_attention(q, k, v, cos, sin, S0, z0, return_state=True)
        o_normed = linear_attention(q, k, v, cos, sin, S0, z0, qk_norm=norm)  # q, k as projections
        u = glu_conv(torch.cat([x, h], dim=-1), weight, bias, 30, 52, backend="triton")
        c = cross_attention(h, *prompt, backend="triton", q_norm=(norm.w_q, 1e-6))
        x_q, x_s = ln_modulate_fp8(x, mod[:, :, 0], mod[:, :, 1])  # inductor compiles it its own way (eps in fp64)
        u_q, u_s = quantize_rows(u)
        r, r_h = add_ln_modulate(x, h, mod[:, :, 0], mod[:, :, 1])
        r8, (r_q, r_s) = add_ln_modulate_fp8(x, h, mod[:, :, 0], mod[:, :, 1])
        return h, o, S_c, o_normed, u, c, x_s, u_s, r, r_h, r8, r_s, x_q.float(), u_q.float(), r_q.float()

    names = ("h", "o", "S_c", "o_normed", "u", "c", "x_s", "u_s", "r", "r_h", "r8", "r_s", "x_q", "u_q", "r_q")
    eager = block(x, q, k, v)
    compiled = torch.compile(block, fullgraph=True)(x, q, k, v)
    # Inductor recompiles the same kernels (its own fp contraction, its own order for the sum of the pass-1
    # partials): a few 1-ulp bf16 differences; in the e4m3 values, those differences a step apart. Every comparison
    # is reported, so that one GPU run names each output that is off and by how much.
    rel = {n: rel_err(b, a) for n, a, b in zip(names[:12], eager, compiled)}
    q_differ = {n: (a != b).float().mean().item() for n, a, b in zip(names[12:], eager[12:], compiled[12:])}
    assert max(rel.values()) < 1e-4 and max(q_differ.values()) <= 0.01, (rel, q_differ)

    static = [t.clone() for t in (x, q, k, v)]
    block(*static)  # warm up (compiles the kernels) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block(*static)
    for s, t in zip(static, (x, q, k, v)):
        s.copy_(t * 0.5)  # new inputs, then replay
    graph.replay()
    fresh = block(*(t * 0.5 for t in (x, q, k, v)))
    unequal = {n: rel_err(b, a) for n, a, b in zip(names, out, fresh) if not torch.equal(a, b)}
    assert not unequal, unequal


@needs_cuda
def test_compiled_backward(tuned):
    """Gradients through both ops inside torch.compile(fullgraph=True): the registered backward traces too."""
    g = torch.Generator().manual_seed(3)
    B, N, H, d = 1, 1560, 4, 112
    q, k, v = qkv(B, N, H, d, torch.float32, g)
    cos, sin = rope_tables(N, d, g)
    x = torch.randn(B, N, H * d, generator=g).to(DEVICE)
    mod = torch.randn(B, 1, 2, H * d, generator=g).to(DEVICE)

    def loss(x, q, k, v):
        h = ln_modulate(x, mod[:, :, 0], mod[:, :, 1])
        o, (S_c, z_c) = linear_attention(q, k, v, cos, sin, return_state=True)
        return h.square().sum() + o.square().sum() + S_c.sum() + z_c.sum()

    inputs = [t.clone().requires_grad_() for t in (x, q, k, v)]
    want = torch.autograd.grad(loss(*inputs), inputs)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*inputs), inputs)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4
