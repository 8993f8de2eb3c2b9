"""GPU micro-benchmark of the Triton kernels at full LongSANA shapes: `python -m longsana.benchmarks.kernels [--sweep]`.

Prints a cost card (FLOPs, bytes, roofline floors on an H100: 781 TFLOP/s bf16 dense, 3.0 TB/s), checks accuracy
against an fp64 run of the reference, then times each variant (median of `triton.testing.do_bench`, which warms
up and flushes L2 between runs) against the eager PyTorch reference and the reference under torch.compile.
`--sweep` first tunes the kernels' tilings by coordinate descent and reports the best configs. `--gemms` adds a
block's matrix products (fp8.GEMMS) in bf16 and in FP8, with the FP8 input given quantized (as a norm that writes
FP8 gives it) and quantized by `quantize_rows` (the kernel) of its own (an input no kernel writes in FP8): where
FP8 pays for its input's quantization. The last line is one JSON object with every number.

`--shared-memory` needs no GPU: it compiles both linear-attention kernels for sm_80, sm_89 and sm_90 with Triton's
compiler and ptxas, at head dim 112, in bf16 and fp32, for each tiling, and prints the shared memory per block
each needs beside each architecture's limit (what `triton_linear_attention.TILES` records).

Shapes: one 10-latent-frame chunk of the 2B model at 480p: B = 1, N = 15,600 tokens, H = 20 heads of d = 112,
bf16; ln_modulate on (1, 15600, 2240) with per-sample (B, 1, D) or per-token (B, N, D) shift and scale; glu_conv
(the FFN's SiLU + depthwise 3x3 + gate) on (1, 15600, 13440): 10 frames of 30 x 52 tokens, 2C = 13440;
quantize_rows on (1, 15600, 2240) (an attention output, z) and (1, 15600, 6720) (the FFN's gated middle).
cross_attention from (1, 15600, 2240) to a 300-token prompt (20 heads of 112) of which 20, 120 or all 300 tokens
are kept: the kernel reads only the kept ones, the reference all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton

from longsana.config import TransformerConfig
from longsana.fp8 import GEMMS, Fp8Linear, Fp8TemporalConv
from longsana.kernels import cross_attention as cross_attention_module
from longsana.kernels import triton_cross_attention as txa
from longsana.kernels import triton_glu_conv as tglu
from longsana.kernels import triton_linear_attention as tla
from longsana.kernels import triton_ln_modulate as tln
from longsana.kernels import triton_quantize as tq
from longsana.kernels import glu_conv as glu_conv_module
from longsana.kernels.cross_attention import cross_attention, cross_attention_ref
from longsana.kernels.glu_conv import glu_conv, glu_conv_ref
from longsana.kernels.linear_attention import (QKNorm, chunk_state, linear_attention, linear_attention_ref,
                                                normalized_qk)
from longsana.kernels.ln_modulate import ln_modulate, ln_modulate_fp8, ln_modulate_fp8_ref, ln_modulate_ref
from longsana.kernels.quantize import quantize_rows, quantize_rows_ref
from longsana.model import Block, TemporalConv
from longsana.testing import randomize_, rel_err

PEAK_FLOPS, PEAK_BYTES = 781e12, 3.0e12  # H100: measured bf16 matmul ceiling, device copy bandwidth
CFG = TransformerConfig()  # the 2B model
B, N, H, d = 1, 15600, CFG.num_heads, CFG.head_dim
D = CFG.dim
FRAME_HW, C = (30, 52), CFG.ffn_dim  # tokens of a latent frame at 480p; the FFN's hidden width (3 D)
L, KEPT = 300, (20, 120, 300)  # the prompt padded by the text encoder; tokens a short, a long, a full one keeps


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def floor_us(flops: float, nbytes: float) -> float:
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES) * 1e6


def la_inputs(g: torch.Generator):
    x = torch.randn(B, N, 3, H, d, generator=g)
    q, k, v = (t.contiguous().cuda().bfloat16() for t in (x[:, :, 0].relu(), x[:, :, 1].relu(), x[:, :, 2]))
    angle = torch.rand(N, d // 2, generator=g) * 100
    cos, sin = angle.cos().cuda(), angle.sin().cuda()
    S0, z0 = chunk_state(k.flip(1), v.flip(1), cos, sin)  # a carried state of realistic size
    return q, k, v, cos, sin, S0, z0


def la_cost() -> dict:
    tokens = B * N * H
    flops = 4 * tokens * d * d  # S_c (2 N d^2 per head) and S (R q) (2 N d^2 per head)
    nbytes = 4 * tokens * d * 2 + 3 * B * H * d * d * 4  # q, k, v read, o written (bf16); S0 read, S_c, S written
    pass_floor = floor_us(flops / 2, 2 * tokens * d * 2)  # pass 1 reads k, v; pass 2 reads q, writes o
    return dict(flops=flops, bytes=nbytes, floor_us=floor_us(flops, nbytes), pass1_floor_us=pass_floor,
                pass2_floor_us=pass_floor)


def cuda_graph(fn):
    """fn captured once in a CUDA graph; returns the replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_linear_attention(g) -> dict:
    q, k, v, cos, sin, S0, z0 = la_inputs(g)
    exact = linear_attention_ref(*(t.double() for t in (q, k, v, cos, sin, S0, z0)))
    ref = lambda: linear_attention_ref(q, k, v, cos, sin, S0, z0)  # noqa: E731
    ref_compiled = torch.compile(linear_attention_ref)
    ours = lambda: linear_attention(q, k, v, cos, sin, S0, z0)  # noqa: E731
    errors = dict(reference=rel_err(ref(), exact), triton=rel_err(ours(), exact))
    times = dict(reference=bench_us(ref), reference_compiled=bench_us(lambda: ref_compiled(q, k, v, cos, sin, S0, z0)),
                 triton=bench_us(ours), triton_cuda_graph=bench_us(cuda_graph(ours)))
    # the passes alone, replayed from CUDA graphs: outside the op, wrap_triton would add Python dispatch time
    times["pass1_state_graph"] = bench_us(cuda_graph(lambda: tla.chunk_state_triton(k, v, cos, sin)))
    S_c, z_c = tla.chunk_state_triton(k, v, cos, sin)
    S, z = S_c + S0, z_c + z0
    times["pass2_output_graph"] = bench_us(cuda_graph(lambda: tla.chunk_output_triton(q, cos, sin, S, z, 1e-8,
                                                                                      v.dtype)))
    plain = dataclasses.replace(tla.CONFIG, hi_lo=False)
    tuned, tla.CONFIG = tla.CONFIG, plain
    errors["triton_no_hi_lo"] = rel_err(ours(), exact)
    times["triton_no_hi_lo"] = bench_us(ours)
    tla.CONFIG = tuned
    return dict(errors=errors, times_us=times)


def bench_qk_norm(g) -> dict:
    """q and k from their projections as a block makes them, RMS-normed and ReLU'd: by separate norms, then the
    attention (eager, and compiled: inductor's norm kernels, what the pass ran before `qk_norm`), against the norms
    inside the kernels (`qk_norm`, compiled: k's 1/RMS an inductor reduction)."""
    _, _, v, cos, sin, S0, z0 = la_inputs(g)
    u_q, u_k = (torch.randn(B, N, H, d, generator=g).cuda().bfloat16() for _ in range(2))
    norm = QKNorm(*(torch.randn(H * d, generator=g).cuda().bfloat16() for _ in range(2)), CFG.qk_norm_eps)
    wide = QKNorm(norm.w_q.double(), norm.w_k.double(), norm.eps)
    exact = linear_attention_ref(*normalized_qk(u_q.double(), u_k.double(), wide), v.double(), cos.double(),
                                 sin.double(), S0.double(), z0.double())
    apart = lambda: linear_attention(*normalized_qk(u_q, u_k, norm), v, cos, sin, S0, z0)  # noqa: E731
    apart_compiled = torch.compile(apart)
    fused = torch.compile(lambda: linear_attention(u_q, u_k, v, cos, sin, S0, z0, qk_norm=norm))
    errors = dict(reference=rel_err(apart(), exact), reference_compiled=rel_err(apart_compiled(), exact),
                  triton=rel_err(fused(), exact))
    times = dict(reference=bench_us(apart), reference_compiled=bench_us(apart_compiled), triton=bench_us(fused))
    return dict(errors=errors, times_us=times)


def sweep(module, choices: dict, run) -> dict:
    """Coordinate descent, one round, over `module.CONFIG`'s fields: keep a value only if it is 2% faster."""
    best, best_us = module.CONFIG, bench_us(run)
    print(f"  start: {best_us:.1f} us")
    for field, values in choices.items():
        for value in values:
            if value == getattr(best, field):
                continue
            module.CONFIG = dataclasses.replace(best, **{field: value})
            try:
                us = bench_us(run)
            except Exception as e:  # e.g. out of shared memory for a large tile
                print(f"  {field}={value}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            print(f"  {field}={value}: {us:.1f} us")
            if us < best_us * 0.98:
                best, best_us = module.CONFIG, us
        module.CONFIG = best
    print(f"  best: {best} ({best_us:.1f} us)")
    return dict(best=dataclasses.asdict(best), best_us=best_us)


def sweep_all(g) -> dict:
    q, k, v, cos, sin, S0, z0 = la_inputs(g)
    la = sweep(tla, dict(state_block_n=[32, 64, 128], state_warps=[4, 8], state_programs=[264, 528, 1056],
                         out_block_n=[32, 64, 128], out_warps=[4, 8], out_tokens=[256, 512, 1024, 2048],
                         num_stages=[1, 2, 3]),
               lambda: linear_attention(q, k, v, cos, sin, S0, z0))
    x = torch.randn(B, N, D, generator=g).cuda().bfloat16()
    mods = torch.randn(B, 1, 6, D, generator=g).cuda().bfloat16()
    ln = sweep(tln, dict(rows=[1, 2, 4], num_warps=[4, 8, 16]), lambda: ln_modulate(x, mods[:, :, 0], mods[:, :, 1]))
    h, weight, bias = glu_inputs(g)
    # a row in phases x block_x columns: 52 at 480p is 4 x 16 (wasting 12), 7 x 8 (wasting 4) or 13 x 4
    glu = sweep(tglu, dict(silu=["tanh", "tanh_bf16x2"], phases=[4, 7, 13], block_x=[4, 8, 16], block_c=[16, 32, 64],
                           num_warps=[4, 8], num_stages=[1, 2], rows=[8, 16]),
                lambda: glu_conv(h, weight, bias, *FRAME_HW, backend="triton"))
    q, k, v, bias = xa_inputs(g, KEPT[1])
    xa = sweep(txa, dict(block_m=[32, 64, 128], block_l=[16, 32, 64, 128], num_warps=[4, 8], num_stages=[1, 2, 3]),
               lambda: cross_attention(q, k, v, bias, backend="triton"))
    xa_ref = torch.compile(cross_attention_ref)
    xa["reference_compiled_us"] = bench_us(lambda: xa_ref(q, k, v, bias))
    cross_attention_module.TRITON_AUTO = xa["triton_auto"] = xa["best_us"] < xa["reference_compiled_us"]
    print(f"  cross-attention, inductor's reference: {xa['reference_compiled_us']:.1f} us: \"auto\" runs the "
          f"{'kernel' if xa['triton_auto'] else 'reference'}")
    # the kernel or the reference compiled by inductor, whichever is faster, for "auto" in this process
    ref_compiled = torch.compile(glu_conv_ref)
    glu["reference_compiled_us"] = bench_us(lambda: ref_compiled(h, weight, bias, *FRAME_HW))
    glu_conv_module.TRITON_AUTO = glu["triton_auto"] = glu["best_us"] < glu["reference_compiled_us"]
    print(f"  inductor's reference: {glu['reference_compiled_us']:.1f} us: \"auto\" runs the "
          f"{'kernel' if glu['triton_auto'] else 'reference'}")
    x = torch.randn(B, N, D, generator=g).cuda().bfloat16()
    quant = sweep(tq, dict(elements=[2048, 4096, 8192, 16384], num_warps=[2, 4, 8, 16]), lambda: quantize_rows(x))
    return dict(linear_attention=la, ln_modulate=ln, glu_conv=glu, quantize_rows=quant, cross_attention=xa)


def xa_inputs(g, kept: int):
    """q (B, N, D) as the q projection and its norm give it; the prompt's k, v (B, H, L, d), views of (B, L, H, d)
    memory as `CrossAttention.text_kv` gives them; the bias of a prompt of `kept` tokens."""
    q = torch.randn(B, N, D, generator=g).cuda().bfloat16()
    shape = (B, L, CFG.cross_num_heads, CFG.cross_head_dim)
    k, v = (torch.randn(shape, generator=g).cuda().bfloat16().transpose(1, 2) for _ in range(2))
    bias = torch.zeros(B, 1, 1, L, device="cuda", dtype=torch.bfloat16)
    bias[..., kept:] = -10000.0
    return q, k, v, bias


def bench_cross_attention(g, kept: int) -> dict:
    """The kernel against the reference (PyTorch's SDPA between the two transposes), eager and compiled, for a prompt
    of `kept` tokens; FLOPs of those keys (the reference computes all L); minimal bytes: q read and the output written
    once (k and v, 2.7 MB, are read from cache)."""
    q, k, v, bias = xa_inputs(g, kept)
    exact = cross_attention_ref(q.double(), k.double(), v.double(), bias.double())
    ref_compiled = torch.compile(cross_attention_ref)
    flops, nbytes = 4 * B * N * kept * D, 2 * q.numel() * 2
    ours = lambda: cross_attention(q, k, v, bias, backend="triton")  # noqa: E731
    return dict(
        flops=flops, bytes=nbytes, floor_us=floor_us(flops, nbytes), config=dataclasses.asdict(txa.CONFIG),
        errors=dict(reference=rel_err(cross_attention_ref(q, k, v, bias), exact), triton=rel_err(ours(), exact)),
        times_us=dict(reference=bench_us(lambda: cross_attention_ref(q, k, v, bias)),
                      reference_compiled=bench_us(lambda: ref_compiled(q, k, v, bias)), triton=bench_us(ours),
                      triton_cuda_graph=bench_us(cuda_graph(ours))))


def glu_inputs(g):
    shapes = (B, N, 2 * C), (2 * C, 1, 3, 3), (2 * C,)  # h, the depthwise weight, its bias
    return tuple(torch.randn(shape, generator=g).cuda().bfloat16() for shape in shapes)


def bench_glu_conv(g) -> dict:
    """Fused against the reference, eager and compiled (Inductor around cuDNN's depthwise conv), with each SiLU (the
    configured one is "triton"); minimal bytes: h read once, the output written once."""
    h, weight, bias = glu_inputs(g)
    exact = glu_conv_ref(h.float(), weight.float(), bias.float(), *FRAME_HW)
    ref_compiled = torch.compile(glu_conv_ref)
    errors, times = {}, {}
    for silu in (tglu.CONFIG.silu, *(m for m in tglu.SILU_MODES if m != tglu.CONFIG.silu)):
        name = "triton" if silu == tglu.CONFIG.silu else f"triton_silu_{silu}"
        tuned, tglu.CONFIG = tglu.CONFIG, dataclasses.replace(tglu.CONFIG, silu=silu)
        errors[name] = rel_err(glu_conv(h, weight, bias, *FRAME_HW, backend="triton"), exact)
        times[name] = bench_us(lambda: glu_conv(h, weight, bias, *FRAME_HW, backend="triton"))
        tglu.CONFIG = tuned
    return dict(
        bytes=h.numel() * 2 + h.numel(), floor_us=(h.numel() * 3) / PEAK_BYTES * 1e6,
        config=dataclasses.asdict(tglu.CONFIG),
        errors=dict(reference=rel_err(glu_conv_ref(h, weight, bias, *FRAME_HW), exact), **errors),
        times_us=dict(reference=bench_us(lambda: glu_conv_ref(h, weight, bias, *FRAME_HW)),
                      reference_compiled=bench_us(lambda: ref_compiled(h, weight, bias, *FRAME_HW)), **times))


def bench_ln_modulate(g, per_token: bool) -> dict:
    x = (3 * torch.randn(B, N, D, generator=g) + 1).cuda().bfloat16()
    mods = torch.randn(B, N if per_token else 1, 6, D, generator=g).cuda().bfloat16()
    shift, scale = mods[:, :, 0], mods[:, :, 1]
    ref_compiled = torch.compile(ln_modulate_ref)
    # FP8 output (the FP8 blocks' norms): the fused kernel against the two other ways to get it, the kernel's bf16
    # output quantized by a compiled quantize_rows, and the whole reference compiled (inductor's own fusion)
    quantize_compiled, fp8_ref_compiled = torch.compile(quantize_rows), torch.compile(ln_modulate_fp8_ref)
    nbytes = 2 * x.numel() * 2 + (2 * x.numel() * 2 if per_token else 0)
    exact = ln_modulate_ref(x.float(), shift.float(), scale.float())  # fp32 output: no bf16 rounding
    fp8_ref = ln_modulate_fp8_ref(x, shift, scale).dequantized()
    return dict(
        bytes=nbytes, floor_us=nbytes / PEAK_BYTES * 1e6,
        errors=dict(reference=rel_err(ln_modulate_ref(x, shift, scale), exact),
                    triton=rel_err(ln_modulate(x, shift, scale), exact),
                    fp8_fused_vs_fp8_reference=rel_err(ln_modulate_fp8(x, shift, scale).dequantized(), fp8_ref),
                    fp8_reference=rel_err(fp8_ref, exact)),
        times_us=dict(reference=bench_us(lambda: ln_modulate_ref(x, shift, scale)),
                      reference_compiled=bench_us(lambda: ref_compiled(x, shift, scale)),
                      triton=bench_us(lambda: ln_modulate(x, shift, scale)),
                      fp8_fused=bench_us(lambda: ln_modulate_fp8(x, shift, scale)),
                      fp8_triton_then_quantize=bench_us(lambda: quantize_compiled(ln_modulate(x, shift, scale))),
                      fp8_reference_compiled=bench_us(lambda: fp8_ref_compiled(x, shift, scale))))


def bench_quantize_rows(g, K: int) -> dict:
    """A (1, N, K) bf16 activation quantized per row (the FP8 products' inputs that no kernel writes in FP8): the
    kernel against the reference, eager and compiled; minimal bytes: x read once, e4m3 and the scales written."""
    x = torch.randn(B, N, K, generator=g).cuda().bfloat16()
    ref_compiled = torch.compile(quantize_rows_ref)
    nbytes = x.numel() * 3 + B * N * 4
    (q, s), (q_ref, s_ref) = quantize_rows(x), quantize_rows_ref(x)
    differing = (q.float() != q_ref.float()).float().mean().item()
    return dict(bytes=nbytes, floor_us=nbytes / PEAK_BYTES * 1e6, config=dataclasses.asdict(tq.CONFIG),
                errors=dict(scales=rel_err(s, s_ref), e4m3_values_differing=differing),
                times_us=dict(reference=bench_us(lambda: quantize_rows_ref(x)),
                              reference_compiled=bench_us(lambda: ref_compiled(x)),
                              triton=bench_us(lambda: quantize_rows(x))))


def bench_gemms() -> dict:
    """Each of a block's GEMMS at a chunk's N tokens: bf16 and FP8 quantizing its bf16 input itself, each layer
    compiled (as the engine's compiled blocks run it); FP8 with its input quantized already, called as it is (one
    product, nothing for inductor to fuse). Inside a block inductor may fuse the quantization with the op that makes
    the input, so the true cost lies between the two FP8 times."""
    blk = randomize_(Block(CFG).cuda()).bfloat16()
    frames = N // (FRAME_HW[0] * FRAME_HW[1])
    out = {}
    for path in GEMMS:
        bf16 = blk.get_submodule(path)
        temporal = isinstance(bf16, TemporalConv)
        fp8 = Fp8TemporalConv(bf16) if temporal else Fp8Linear.of(bf16)
        d_out, d_in = bf16.weight.shape[:2]
        x = torch.randn(B, frames, N // frames, d_in, device="cuda").bfloat16()
        x = x if temporal else x.flatten(1, 2)
        exact = bf16.float()(x.float())
        bf16.bfloat16()  # back, exactly: the weights were bf16
        d_out *= 3 if temporal else 1  # the temporal conv: one product with its three taps stacked
        layers = dict(bf16=torch.compile(bf16), fp8=torch.compile(fp8))
        errors = {name: rel_err(layer(x), exact) for name, layer in layers.items()}
        times = {name: bench_us(lambda layer=layer: layer(x)) for name, layer in layers.items()}
        x_q = quantize_rows(x)
        times["fp8_input_quantized"] = bench_us(lambda: fp8(x_q))
        flops = 2 * B * N * d_in * d_out
        out[path] = dict(shape=(B * N, d_in, d_out), tflops=flops / 1e12, errors=errors, times_us=times)
        print(f"  {path:16s} {B * N} x {d_in} x {d_out}: " + ", ".join(
            f"{name} {us:7.1f} us ({flops / us / 1e6:4.0f} TFLOP/s)" for name, us in times.items()) +
            "; rel. error vs fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return out


def print_times(times: dict, nbytes: int):
    """One line per variant: median time, effective bandwidth (minimal bytes: half of them for one pass of the
    linear attention), speed-ups."""
    for name, us in times.items():
        moved = nbytes / 2 if name.startswith("pass") else nbytes
        print(f"  {name:22s} {us:9.1f} us  {moved / us / 1e6:5.2f} TB/s  x{times['reference'] / us:5.1f} vs ref  "
              f"x{times['reference_compiled'] / us:5.1f} vs compiled ref")


# -- shared memory, compiled for GPUs on any machine -----------------------------------------------------------------
SHARED_MEMORY = {80: 166912, 89: 101376, 90: 232448}  # bytes per block (opt-in): A100; RTX 40 / L4 / L40; H100 / H200
TILINGS = ((128, 2), (64, 2), (64, 1), (32, 1))  # (tokens per tile, stages): the tuned one, then smaller


def compile_for(kernel, signature: dict[str, str], consts: dict, arch: int, divisible=(), **options):
    """`kernel` compiled for sm_<arch> by Triton's compiler and ptxas, which need no GPU. signature: each
    non-constexpr argument's Triton type ("*bf16", "i32", ...); divisible: the arguments Triton may take as multiples
    of 16, as it does at a launch where they are (pointers from PyTorch's allocator, widths like 6720): this is
    what lets it vectorize the loads."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(kernel, {**signature, **dict.fromkeys(consts, "constexpr")},
                       {(kernel.arg_names.index(k),): v for k, v in consts.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def cuobjdump(compiled, flag: str) -> str:
    """The output of the cuobjdump that Triton carries, run with `flag` on a compiled kernel's cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def stack_bytes(compiled) -> int:
    """Bytes of stack a thread of a compiled kernel uses: register spills. Nonzero means the kernel spills (on the
    H200 an unrolled glu_conv spilled 4.5 KB and ran 12x slower than inductor's unfused code)."""
    return max(int(n) for n in re.findall(r"STACK:(\d+)", cuobjdump(compiled, "-res-usage")))


def loop_instructions(compiled) -> list[str]:
    """The machine (SASS) instructions of a compiled kernel's last loop, from the target of its last backward
    branch to the branch: what a thread issues per iteration, the cost of a kernel that is bound by issuing them."""
    lines = re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;", cuobjdump(compiled, "-sass"), re.M)
    start = end = None
    for addr, text in lines:
        target = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < int(addr, 16):
            start, end = int(target.group(1), 16), int(addr, 16)
    if start is None:
        raise ValueError("no loop in this kernel")
    return [text for addr, text in lines if start <= int(addr, 16) <= end]


def la_compile(kernel, dtype: str, block_n: int, stages: int, warps: int, arch: int, eps: str = "fp32"):
    """A linear-attention kernel at head dim 112 (BLOCK_D 128), norming q or k as the model has it, compiled for
    sm_<arch> with the alignment of the model's launch: pointers, strides and token counts multiples of 16 (not the
    head count). eps: the type its eps argument is given (a launch passes fp32, inductor fp64)."""
    exact = dtype == "fp32"
    consts = dict(D=112, BLOCK_D=128, BLOCK_N=block_n, COS_ALIGN=8, PRECISION="ieee" if exact else None,
                  HI_LO=not exact, UPCAST=False, NORM=True)
    fp32 = ("S_ptr", "z_ptr", "cos_ptr", "sin_ptr", "w_ptr", "r_ptr")
    signature = {name: ("*fp32" if name in fp32 else f"*{dtype}") if name.endswith("_ptr") else
                 eps if name == "eps" else "i32" for name in kernel.arg_names if name not in consts}
    aligned = [name for name in signature if name not in ("H", "eps")]
    return compile_for(kernel, signature, consts, arch, divisible=aligned, num_warps=warps, num_stages=stages)


def la_shared_memory(kernel, dtype: str, block_n: int, stages: int, warps: int, arch: int) -> int:
    """Bytes of shared memory per block a linear-attention kernel needs at head dim 112 (BLOCK_D 128)."""
    return la_compile(kernel, dtype, block_n, stages, warps, arch).metadata.shared


def shared_memory_table() -> dict:
    """The larger of the two kernels' shared memory (KB) per architecture, dtype and tiling, printed."""
    tuned, out = tla.LinearAttentionConfig(), {}
    kernels = ((tla._chunk_state_kernel, tuned.state_warps), (tla._chunk_output_kernel, tuned.out_warps))
    for arch, limit in SHARED_MEMORY.items():
        for dtype in ("bf16", "fp32"):
            for block_n, stages in TILINGS:
                nbytes = [la_shared_memory(k, dtype, block_n, stages, w, arch) for k, w in kernels]
                kb = [n / 1024 for n in nbytes]
                out[f"sm_{arch} {dtype} {block_n}x{stages}"] = kb
                print(f"sm_{arch} {dtype}, {block_n} tokens, {stages} stage{'s' * (stages > 1)}: state {kb[0]:g} KB, "
                      f"output {kb[1]:g} KB ({'fits' if max(nbytes) <= limit else 'over'} the {limit // 1024} KB "
                      "per block)")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="tune the kernels' tiling first")
    parser.add_argument("--gemms", action="store_true", help="also time a block's GEMMs in bf16 and FP8")
    parser.add_argument("--shared-memory", action="store_true",
                        help="only the linear-attention kernels' shared memory per GPU architecture (no GPU needed)")
    args = parser.parse_args()
    if args.shared_memory:
        print(json.dumps(dict(triton=triton.__version__, shared_memory_kb=shared_memory_table())))
        return
    if not torch.cuda.is_available():
        raise SystemExit("longsana.benchmarks.kernels needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  shape=dict(B=B, N=N, H=H, d=d))
    la = la_cost()
    print(f"linear attention (B={B}, N={N}, H={H}, d={d}, bf16): {la['flops'] / 1e9:.1f} GFLOP, "
          f"{la['bytes'] / 1e6:.1f} MB -> floor {la['floor_us']:.1f} us "
          f"(compute {la['flops'] / PEAK_FLOPS * 1e6:.1f} us, memory {la['bytes'] / PEAK_BYTES * 1e6:.1f} us)")
    if args.sweep:  # leaves the best configs in place for the timings below
        result["sweep"] = sweep_all(g)
    result["linear_attention"] = dict(cost=la, **bench_linear_attention(g))
    r = result["linear_attention"]
    print("  rel. error vs fp64: " + ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items()))
    print_times(r["times_us"], la["bytes"])
    r = result["qk_norm"] = bench_qk_norm(g)
    print("the same from q and k's projections, with their RMSNorm + ReLU (reference: normed apart, then the "
          "kernels; triton: normed inside them); rel. error vs fp64: "
          + ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items()))
    print_times(r["times_us"], la["bytes"])
    for per_token in (False, True):
        key = "ln_modulate_" + ("per_token" if per_token else "per_sample")
        r = result[key] = bench_ln_modulate(g, per_token)
        print(f"{key} (1, {N}, {D}) bf16: {r['bytes'] / 1e6:.1f} MB -> floor {r['floor_us']:.1f} us; "
              "rel. error vs fp32: " + ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items()))
        print_times(r["times_us"], r["bytes"])
    r = result["glu_conv"] = bench_glu_conv(g)
    print(f"glu_conv (1, {N}, {2 * C}) bf16: {r['bytes'] / 1e6:.1f} MB -> floor {r['floor_us']:.1f} us; "
          "rel. error vs fp32: " + ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items()))
    print_times(r["times_us"], r["bytes"])
    for K in (D, C):
        r = result[f"quantize_rows_{K}"] = bench_quantize_rows(g, K)
        print(f"quantize_rows (1, {N}, {K}) bf16 -> e4m3: {r['bytes'] / 1e6:.1f} MB -> floor {r['floor_us']:.1f} us; "
              "against the reference: " + ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items()))
        print_times(r["times_us"], r["bytes"])
    for kept in KEPT:
        r = result[f"cross_attention_{kept}"] = bench_cross_attention(g, kept)
        print(f"cross_attention (1, {N}, {D}) to {kept} of {L} prompt tokens, bf16: {r['flops'] / 1e9:.1f} GFLOP, "
              f"{r['bytes'] / 1e6:.1f} MB -> floor {r['floor_us']:.1f} us; rel. error vs fp64: "
              + ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items()))
        print_times(r["times_us"], r["bytes"])
    if args.gemms:
        print(f"a block's GEMMs (fp8.GEMMS) at {B * N} tokens, compiled:")
        result["gemms"] = bench_gemms()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
