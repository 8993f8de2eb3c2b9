"""FP8 as an option: the transformer blocks' per-step matrix products in W8A8 e4m3 with row-wise scales.

Most of a bf16 pass is GEMMs (69% on an H100), and FP8 tensor cores (Ada, Hopper) run GEMMs at up to twice bf16's
rate. `to_fp8(model)` swaps the layers that run on every chunk's tokens: self-attention q, k, v and out, cross-attention
q and out, the FFN's 1x1 up and down projections (`Fp8Linear`), and the temporal conv's three taps, as one product
(`Fp8TemporalConv`): all the block's per-token GEMMs. Embeddings, modulation, the prompt's cross-attention K/V (once
per prompt) and the final layer stay bf16; the norms compute in fp32, as before, and write e4m3.

Each product is y = (x_q * s_x) (W_q * s_W)^T + b: W_q, s_W quantized once, one scale per output row; x quantized per
token row (kernels/quantize.py), one scale per row, so one outlier token does not cost the others their precision. Where
the input is made matters: quantized by separate eager kernels, every activation is read and written once more, which
can cost more than FP8 saves. So the norms that feed q, k, v and the FFN's up-projection write FP8 themselves
(`Fp8LnModulate`: the LayerNorm-modulate kernel quantizes the rows it holds), and the other inputs (the attention
outputs, the residual stream for the cross-attention's q, the FFN's gated middle, z) are quantized by `quantize_rows`,
on GPUs a kernel that reads each row once (inductor's own code for it read each row twice). On a GPU `torch._scaled_mm`
runs the product (PyTorch's row-wise FP8 GEMM, compute capability 8.9 and up) with fast accumulation (FAST_ACCUM); on
the CPU, which has no FP8 units, the same product runs in fp32 on the quantized operands.
"""

from __future__ import annotations

import torch
from torch import nn

from longsana.kernels.ln_modulate import add_ln_modulate_fp8, ln_modulate_fp8
from longsana.kernels.quantize import QuantizedRows, quantize_rows

from .model import LnModulate, LongSANATransformer, TemporalConv, shifted_sum

MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores
ALIGN = 16  # the GPU's FP8 products need both weight dimensions to be multiples of 16
# The layers swapped, per block (a name path under the block); all run on every token of every pass. The norms
# feed only swapped layers (self-attention q, k, v; the FFN's up-projection): they write FP8.
GEMMS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
         "ff.conv_inverted", "ff.conv_point", "ff.conv_temp")
NORMS = ("norm1", "norm2")
# Hopper's FP8 tensor cores accumulate in fewer bits than fp32 unless the GEMM adds their partial sums into fp32
# registers every few steps. Without those steps (H100, 15,600 tokens): 136 instead of 159 us for 2240 -> 2240, 874
# instead of 920 for 2240 -> 13440; the error against fp64 on the same quantized operands went from 1.7e-3 to 1.9e-3
# (2.5e-3 at K = 6720), against the 3.7e-2 that quantizing the operands costs at all.
FAST_ACCUM = True


class Fp8Linear(nn.Module):
    """y = x W^T + b with W and x in e4m3, row-wise scales, output in `out_dtype` (bf16: the GPU's row-wise FP8
    products write bf16). x: (..., in) in any float dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_dtype = out_dtype
        w_q, w_s = quantize_rows(weight.detach().flatten(1))  # a 1x1 conv's (out, in, 1, 1) is (out, in)
        self.register_buffer("weight", w_q)  # (out, in) e4m3
        self.register_buffer("weight_scale", w_s.t().contiguous())  # (1, out): one scale per output channel
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))

    @classmethod
    def of(cls, layer: nn.Module) -> Fp8Linear:
        """The FP8 version of an nn.Linear or a 1x1 convolution (model.Pointwise), in the layer's dtype."""
        return cls(layer.weight, layer.bias, layer.weight.dtype)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """x: (..., in) in any float dtype, quantized here, or already quantized by the kernel that made it."""
        return scaled_product(x, self.weight, self.weight_scale, self.bias, self.out_dtype)

    def dequantized(self) -> torch.Tensor:
        """W as the product sees it, (out, in) fp32: for tests and error reports."""
        return self.weight.float() * self.weight_scale.t()

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}"


def scaled_product(x: torch.Tensor | QuantizedRows, w_q: torch.Tensor, w_s: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """(x_q * s_x) (w_q * w_s)^T + bias in out_dtype. x: (..., in), quantized here unless given quantized; w_q
    (out, in) e4m3, rows contiguous; w_s (1, out) fp32."""
    x_q, x_s = x if isinstance(x, QuantizedRows) else quantize_rows(x)
    lead = x_q.shape[:-1]
    # row-major: cuBLASLt's FP8 product takes no transposed left operand (a (B, N, D) view of (B, D, N) memory)
    x_q, x_s = x_q.reshape(-1, x_q.shape[-1]).contiguous(), x_s.reshape(-1, 1)
    if x_q.is_cuda:
        y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s, bias=bias, out_dtype=out_dtype,
                             use_fast_accum=FAST_ACCUM)
    else:  # no FP8 units: the same product in fp32 (torch's CPU _scaled_mm takes row-wise scales only from 2.13)
        y = (x_q.float() @ w_q.float().t()) * x_s * w_s
        y = (y if bias is None else y + bias).to(out_dtype)
    return y.view(*lead, -1)


class Fp8LnModulate(LnModulate):
    """LayerNorm-modulate whose output is the FP8 products' input, quantized by the kernel that computes it
    (`ln_modulate_fp8`): every consumer of a block's norm1 and norm2 is an Fp8Linear."""

    def forward(self, x, shift, scale) -> QuantizedRows:
        return ln_modulate_fp8(x, shift, scale, self.eps)

    def add(self, x, a, shift, scale) -> tuple[torch.Tensor, QuantizedRows]:
        return add_ln_modulate_fp8(x, a, shift, scale, self.eps)


class Fp8TemporalConv(nn.Module):
    """model.TemporalConv in FP8: z's product with the three taps stacked, [W0; W1; W2] (3 D_out, D_in), one per-row
    scale per output channel of each tap, shifted along frames as there (`shifted_sum`); the tail's product with W0
    reads the first D_out rows of the same weight."""

    def __init__(self, conv: TemporalConv):
        super().__init__()
        W = conv.weight[..., 0].permute(2, 0, 1)  # (3, D_out, D_in)
        self.taps = Fp8Linear(W.flatten(0, 1), None, W.dtype)

    def forward(self, z, tail=None, chunk_ends=None):
        before, now, after = self.taps(z).chunk(3, dim=-1)
        first = None
        if tail is not None:
            d = before.shape[-1]
            first = scaled_product(tail, self.taps.weight[:d], self.taps.weight_scale[:, :d], None,
                                   self.taps.out_dtype)
        return shifted_sum(before, now, after, first, chunk_ends)


def check_fp8(model: LongSANATransformer) -> None:
    """ValueError unless the model can run its blocks in FP8 here: bf16 weights (the products write bf16), on the
    CPU or a GPU with FP8 tensor cores, every swapped layer's dimensions multiples of ALIGN."""
    weight = model.proj_out.weight
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"FP8 needs the model in bf16 (its products write bf16), not {weight.dtype}")
    if weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device) < MIN_CAPABILITY:
        name, has = torch.cuda.get_device_name(weight.device), torch.cuda.get_device_capability(weight.device)
        raise ValueError(f"FP8 needs a GPU of compute capability {'.'.join(map(str, MIN_CAPABILITY))} or newer "
                         f"(Ada, Hopper); {name} has {'.'.join(map(str, has))}")
    cfg = model.cfg
    if cfg.dim % ALIGN or cfg.ffn_dim % ALIGN:
        raise ValueError(f"FP8 needs the hidden size ({cfg.dim}) and FFN width ({cfg.ffn_dim}) to be multiples of "
                         f"{ALIGN}")


def to_fp8(model: LongSANATransformer) -> LongSANATransformer:
    """Swap every block's GEMMS for FP8 products and its NORMS for Fp8LnModulate, in place (the bf16 weights they
    replace are freed); returns model. Idempotent."""
    check_fp8(model)
    for blk in model.transformer_blocks:
        for name in NORMS:
            norm = blk.get_submodule(name)
            if not isinstance(norm, Fp8LnModulate):
                setattr(blk, name, Fp8LnModulate(norm.eps))
        for path in GEMMS:
            parent_path, name = path.rsplit(".", 1)
            parent = blk.get_submodule(parent_path)
            layer = parent.get_submodule(name)
            if isinstance(layer, TemporalConv):
                setattr(parent, name, Fp8TemporalConv(layer))
            elif not isinstance(layer, (Fp8Linear, Fp8TemporalConv)):
                setattr(parent, name, Fp8Linear.of(layer))
    return model


def is_fp8(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())

