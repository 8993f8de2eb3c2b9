"""FP8 blocks (longsana/fp8.py): row-wise quantization, the scaled product against an fp64 product of the same
quantized operands, the swapped model against the fp32 model, and streaming against the block-causal pass.

On the CPU the product runs in fp32 on the quantized operands; the GPU tests run torch._scaled_mm at full size.
Tolerances: e4m3 keeps 3 mantissa bits, so one rounding is off by at most 2^-4 of the value and a product of two
quantized operands by about 3-4% (RMS) of its norm; bf16 outputs add about 4e-3.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import numpy as np
import pytest
import torch

from longsana import fp8
from longsana.config import TransformerConfig, get_config
from longsana.kernels.quantize import FP8, FP8_MAX, quantize_rows
from longsana.model import LongSANATransformer, TemporalConv
from longsana.stream import Pipeline
from longsana.testing import needs_fp8_gpu, randomize_, rel_err

TINY = get_config("tiny").transformer
E4M3_STEP = 2.0 ** -4  # the largest relative rounding error of a normal e4m3 number (half of 2^-3)
PRODUCT_TOL = 0.06  # one FP8 product against the exact one: ~3.5% measured at random inputs, bound with margin
BF16_TOL = 1e-2


def fp8_model(cfg: TransformerConfig = TINY, seed: int = 0) -> tuple[LongSANATransformer, LongSANATransformer]:
    """The fp32 model and its FP8 copy (bf16 elsewhere)."""
    ref = randomize_(LongSANATransformer(cfg).eval(), seed)
    return ref, fp8.to_fp8(copy.deepcopy(ref).bfloat16())


@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 48), (1, 1)])
def test_quantize_rows(shape):
    """x ~ x_q * s within half an e4m3 step per element; each row's largest magnitude lands on FP8_MAX exactly."""
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])  # a wide range inside every row
    rows = quantize_rows(x)
    q, s = rows
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (*shape[:-1], 1) and s.dtype == torch.float32
    back = rows.dequantized()
    tiny = s * 2.0 ** -9  # e4m3's subnormal step, in the row's units: small values are off by up to this much
    assert ((back - x).abs() <= E4M3_STEP * x.abs() + tiny).all()
    assert (q.float().abs().amax(-1) == FP8_MAX).all()


def test_quantize_rows_edge_rows():
    """A zero row quantizes to zeros with a finite scale; NaN or infinity make their own row NaN and no other."""
    x = torch.randn(4, 32)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    rows = quantize_rows(x)
    s, back = rows.scale, rows.dequantized()
    assert torch.equal(back[0], torch.zeros(32)) and torch.isfinite(s[0]).all()
    assert back[1].isnan().any() and back[2].isnan().any()
    assert torch.isfinite(back[3]).all() and rel_err(back[3], x[3]) < E4M3_STEP


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(37,), (2, 19)])  # row counts that are no multiple of a tile
def test_fp8_linear_against_the_product_of_its_quantized_operands(lead, bias):
    """The scaled product (scales the right way round, bias added once) equals an fp64 product of the dequantized
    operands to bf16 rounding; against the unquantized product it is within FP8's error."""
    layer = torch.nn.Linear(48, 80, bias=bias).bfloat16()
    torch.nn.init.normal_(layer.weight, std=0.1)
    if bias:
        torch.nn.init.normal_(layer.bias)
    f = fp8.Fp8Linear.of(layer)
    x = torch.randn(*lead, 48, dtype=torch.bfloat16) * torch.rand(*lead, 1) * 10  # rows of different sizes
    y = f(x)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, 80)
    x_q, x_s = quantize_rows(x)
    b = layer.bias.double() if bias else 0
    want = (x_q.double() * x_s.double()) @ f.dequantized().double().t() + b
    assert rel_err(y, want) <= BF16_TOL
    assert rel_err(y, x.double() @ layer.weight.double().t() + b) <= PRODUCT_TOL


def test_to_fp8_swaps_the_block_gemms_only():
    ref, model = fp8_model()
    swapped = {name for name, m in model.named_modules() if isinstance(m, (fp8.Fp8Linear, fp8.Fp8TemporalConv))}
    want = {f"transformer_blocks.{i}.{path}" for i in range(TINY.num_layers) for path in fp8.GEMMS}
    want |= {f"{name}.taps" for name in want if name.endswith("conv_temp")}  # Fp8TemporalConv's own Fp8Linear
    assert swapped == want
    assert model.proj_out.weight.dtype == torch.bfloat16 and model.transformer_blocks[0].attn2.to_k.weight.dtype \
        == torch.bfloat16  # the final layer and the prompt's K/V stay bf16
    assert fp8.is_fp8(model) and not fp8.is_fp8(ref)
    assert all(type(getattr(b, n)) is fp8.Fp8LnModulate for b in model.transformer_blocks for n in fp8.NORMS)
    for name in sorted(want)[:3]:
        w = ref.get_submodule(name).weight.flatten(1)
        assert rel_err(model.get_submodule(name).dequantized(), w) <= E4M3_STEP
    assert fp8.to_fp8(model) is model and {n for n, m in model.named_modules()
                                           if isinstance(m, (fp8.Fp8Linear, fp8.Fp8TemporalConv))} == want


@pytest.mark.parametrize("ends", [False, True])
@torch.no_grad()
def test_fp8_temporal_conv_against_its_quantized_operands(ends):
    """z's product with the three taps stacked, shifted along frames: against an fp64 convolution of the dequantized
    z, tail and taps, with a tail on the left and chunk ends cutting the right neighbour."""
    torch.manual_seed(0)
    conv = TemporalConv(32).bfloat16()
    f = fp8.Fp8TemporalConv(conv)
    z, tail = torch.randn(2, 5, 6, 32, dtype=torch.bfloat16), torch.randn(2, 6, 32, dtype=torch.bfloat16)
    chunk_ends = torch.tensor([False, True, False, False, True]) if ends else None
    got = f(z, tail, chunk_ends)
    on_quantized = TemporalConv(32).double()
    on_quantized.weight.copy_(f.taps.dequantized().view(3, 32, 32).permute(1, 2, 0)[..., None])
    want = on_quantized(*(quantize_rows(a).dequantized().double() for a in (z, tail)), chunk_ends)
    assert rel_err(got, want) <= BF16_TOL
    assert rel_err(got, conv.double()(z.double(), tail.double(), chunk_ends)) <= PRODUCT_TOL  # the exact conv
    if ends:  # the right neighbour of a chunk's last frame is cut: changing it changes nothing there
        z2 = z.clone()
        z2[:, 2] += 1
        assert torch.equal(f(z2, tail, chunk_ends)[:, 1], got[:, 1])


def test_fp8_refuses_what_it_cannot_run():
    ref = LongSANATransformer(TINY)
    with pytest.raises(ValueError, match="FP8 needs the model in bf16"):
        fp8.to_fp8(ref)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.to_fp8(LongSANATransformer(dataclasses.replace(TINY, mlp_ratio=2.5)).bfloat16())  # FFN width 200


@torch.no_grad()
def test_fp8_model_against_fp32():
    """The whole network in FP8 against fp32, beside bf16's error: FP8 adds error (it is really quantizing) but stays
    within an FP8 product's."""
    ref, model = fp8_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 3, 4, 6, generator=g), torch.randn(1, 5, TINY.caption_channels, generator=g)
    t = torch.tensor([700.0])
    want = ref(x, y, t).double()
    err_fp8 = rel_err(model(x, y, t), want)
    err_bf16 = rel_err(copy.deepcopy(ref).bfloat16()(x, y, t), want)
    print(f"tiny model against fp32: FP8 {err_fp8:.2e}, bf16 {err_bf16:.2e}")
    assert err_bf16 < err_fp8 <= PRODUCT_TOL, (err_bf16, err_fp8)


@torch.no_grad()
def test_fp8_streaming_equals_the_block_causal_pass():
    """Chunk by chunk through the state, FP8, equals the one-pass block-causal forward of the same FP8 model."""
    _, model = fp8_model(seed=1)
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    chunks = [rng.randint(2, 4) for _ in range(3)]
    B, H, W = 1, 4, 6
    x = torch.randn(B, 16, sum(chunks), H, W, generator=g)
    y = torch.randn(B, 5, TINY.caption_channels, generator=g)
    t = torch.rand(B, sum(chunks), generator=g) * 1000
    t_tok = t.repeat_interleave((H // 2) * (W // 2), dim=1)
    text, state, outs, f0 = model.prepare_text(y), model.new_state(B, H, W), [], 0
    for n in chunks:
        tc = t[:, f0:f0 + n].repeat_interleave((H // 2) * (W // 2), dim=1)
        outs.append(model.forward_chunk(x[:, :, f0:f0 + n], tc, text, state, f0, update_state=True))
        f0 += n
    assert rel_err(torch.cat(outs, dim=2), model(x, y, t_tok, chunks=chunks)) <= BF16_TOL


@needs_fp8_gpu
@torch.no_grad()
def test_fp8_at_full_size_on_the_gpu():
    """One block of the 2B model at a chunk's shape (10 latent frames at 480p: 15,600 tokens) in FP8 on the GPU,
    against the fp32 block; every swapped layer against the fp64 product of its own quantized operands."""
    cfg = TransformerConfig(num_layers=1)
    ref, model = (m.cuda() for m in fp8_model(cfg))
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, 10, 60, 104, device="cuda", generator=g)
    y = torch.randn(1, 300, cfg.caption_channels, device="cuda", generator=g)
    t = torch.tensor([700.0], device="cuda")
    want = ref(x, y, t).double()
    assert rel_err(model(x, y, t), want) <= PRODUCT_TOL
    for name, layer in model.named_modules():
        if isinstance(layer, fp8.Fp8Linear):
            a = torch.randn(15600, layer.weight.shape[1], device="cuda", generator=g, dtype=torch.bfloat16)
            a_q, a_s = quantize_rows(a)
            b = 0 if layer.bias is None else layer.bias.double()
            assert rel_err(layer(a), (a_q.double() * a_s) @ layer.dequantized().double().t() + b) <= BF16_TOL, name


def test_fp8_demo_pipeline(tmp_path):
    """`Pipeline.from_pretrained(fp8=True)` (what `longsana serve --dtype fp8` loads): the demo model's frames stay
    within a few levels of its fp32 frames (it prints them beside bf16's), and it refuses to be saved."""
    def frames(**kw):
        pipe = Pipeline.from_pretrained("demo", "cpu", **kw)
        return pipe, np.concatenate([c.frames for c in pipe.stream("a red fox in the snow", num_frames=20)])

    pipe, got = frames(fp8=True)
    assert fp8.is_fp8(pipe.model) and pipe.vae.dtype == torch.bfloat16
    _, want = frames()
    diff = np.abs(got.astype(float) - want)
    bf16 = np.abs(frames(dtype=torch.bfloat16)[1].astype(float) - want).mean()
    print(f"demo frames against fp32, mean |difference| in levels: FP8 {diff.mean():.2f}, bf16 {bf16:.2f}")
    assert got.shape == want.shape and 0 < diff.mean() < 3, diff.mean()
    with pytest.raises(ValueError, match="FP8 model cannot be saved"):
        pipe.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
