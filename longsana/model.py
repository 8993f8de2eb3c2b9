"""The SANA-Video / LongSANA transformer: pure architecture, nothing about sampling or speed tricks.

Parameter names and shapes follow diffusers' `SanaVideoTransformer3DModel`, so a diffusers state dict loads with
`load_state_dict` as it is (the original `.pth` layout is mapped in `loading.py`). The attention math is in
kernels/linear_attention.py.

Two ways to run it:
  forward(x, y, t, y_mask)               whole clip, bidirectional (the base model; diffusers' call signature)
  forward_chunk(x, t, text, state, s)    one chunk of latent frames starting at absolute latent frame s, reading a
                                         constant-size block-causal `State`; with update_state=True (the
                                         clean-context pass) the chunk's contribution is added to the state in place.

Block-causal state per layer: S = sum v (R k)^T, z = sum k over all past tokens, and `tail`, the
FFN's last latent frame before the temporal conv, which is the left padding of the next chunk's temporal conv.
Inside a chunk everything is bidirectional; the right side of a chunk's temporal conv sees zeros.

Layouts: tokens are ordered (frame, row, col), so a (B, N, D) activation is also (B, F, H*W, D) channels-last.

Kernels: linear attention, LayerNorm-modulate, the FFN's SiLU + depthwise conv + gate and the cross-attention come
from kernels/ (each kernel's entry point picks Triton or its PyTorch reference).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longsana.kernels.cross_attention import cross_attention
from longsana.kernels.glu_conv import glu_conv
from longsana.kernels.linear_attention import QKNorm, apply_rope, linear_attention, rms_norm
from longsana.kernels.ln_modulate import add_ln_modulate, ln_modulate

from .config import TransformerConfig


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight; the mean square is taken in fp32 (as diffusers and the original do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP2(nn.Module):
    """Linear -> activation -> Linear, named linear_1/linear_2 as diffusers names its embedders."""

    def __init__(self, d_in: int, d: int, act: nn.Module):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(d_in, d), act, nn.Linear(d, d)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class TimestepEmbed(nn.Module):
    """adaLN-single: t -> sinusoid(256) -> MLP = temb; SiLU(temb) -> Linear(D, 6D) = t0."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.Module()
        self.emb.timestep_embedder = MLP2(256, dim, nn.SiLU())
        self.linear = nn.Linear(dim, 6 * dim)

    @staticmethod
    def sinusoid(t: torch.Tensor, channels: int = 256, max_period: float = 10000.0) -> torch.Tensor:
        half = channels // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[..., None] * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype):
        temb = self.emb.timestep_embedder(self.sinusoid(t).to(dtype))
        return self.linear(F.silu(temb)), temb


class SelfAttention(nn.Module):
    """ReLU linear attention, RoPE on the numerator only; q and k RMS-normed over all heads' channels first (the
    maths, those norms included, is in kernels/linear_attention.py)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D = cfg.dim
        self.heads, self.eps = cfg.num_heads, cfg.linear_attn_eps
        self.to_q, self.to_k, self.to_v = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(D, cfg.qk_norm_eps), RMSNorm(D, cfg.qk_norm_eps)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])

    def forward(self, x, rope, S=None, z=None, update_state=False, chunk_tokens=None):
        """x: (B, N, D). S: (B, H, d, d), z: (B, H, d) fp32 running sums of earlier chunks, updated in place.
        chunk_tokens: token counts of consecutive chunks for a block-causal pass over a whole sequence."""
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)) for p in (self.to_q, self.to_k, self.to_v))  # (B, N, H, d)
        norm = QKNorm(self.norm_q.weight, self.norm_k.weight, self.norm_q.eps)  # relu(norm(q)), relu(norm(k))
        if chunk_tokens is not None:
            o = self.block_causal(q, k, v, rope, norm, chunk_tokens)
        elif update_state:
            o, (S_c, z_c) = linear_attention(q, k, v, *rope, S, z, eps=self.eps, return_state=True, qk_norm=norm)
            S.add_(S_c)
            z.add_(z_c)
        else:
            o = linear_attention(q, k, v, *rope, S, z, eps=self.eps, qk_norm=norm)
        return self.to_out[0](o.flatten(-2))

    def block_causal(self, q, k, v, rope, norm, chunk_tokens):
        """The streaming recurrence over the chunks of one sequence, without in-place updates (differentiable)."""
        outs, S, z = [], None, None
        for sl in _slices(chunk_tokens):
            o, (S_c, z_c) = linear_attention(q[:, sl], k[:, sl], v[:, sl], rope[0][sl], rope[1][sl], S, z,
                                             eps=self.eps, return_state=True, qk_norm=norm)
            S, z = (S_c, z_c) if S is None else (S + S_c, z + z_c)
            outs.append(o)
        return torch.cat(outs, dim=1)


class CrossAttention(nn.Module):
    """Softmax attention from video tokens to the prompt; the prompt's K/V come precomputed (`TextKV`)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D = cfg.dim
        self.heads = cfg.cross_num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(D, D) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(D, cfg.cross_qk_norm_eps), RMSNorm(D, cfg.cross_qk_norm_eps)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])

    def text_kv(self, y):
        """y: (B, L, D) -> k, v: (B, heads, L, d)."""
        k = self.norm_k(self.to_k(y)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.to_v(y).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return k, v

    def forward(self, x, k, v, bias):
        q_norm = (self.norm_q.weight, self.norm_q.eps)  # norm_q's, applied inside (kernels/cross_attention.py)
        return self.to_out[0](cross_attention(self.to_q(x), k, v, bias, q_norm=q_norm))


class Pointwise(nn.Conv2d):
    """A 1x1 convolution (diffusers' weight shape (out, in, 1, 1)) on channels-last tokens (..., in): a matmul."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__(d_in, d_out, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


def shifted_sum(before, now, after, first=None, chunk_ends=None) -> torch.Tensor:
    """out[f] = before[f-1] + now[f] + after[f+1] for the frames f of (B, F, HW, D) tensors: a kernel-3 convolution
    along frames whose taps' products are already taken. before[-1] = first (B, HW, D) (None: zeros), after[F] = 0, and
    after[f+1] = 0 where chunk_ends[f] (the next chunk is in the future). Pads, not cats: inductor fuses them into one
    elementwise kernel with the additions around."""
    next_frame = F.pad(after[:, 1:], (0, 0, 0, 0, 0, 1))
    if chunk_ends is not None:
        next_frame = next_frame * ~chunk_ends[None, :, None, None]
    out = now + F.pad(before[:, :-1], (0, 0, 0, 0, 1, 0)) + next_frame
    return out if first is None else out + F.pad(first[:, None], (0, 0, 0, 0, 0, now.shape[1] - 1))


class TemporalConv(nn.Conv2d):
    """The FFN's convolution along frames (kernel 3, diffusers' weight shape (D, D, 3, 1)), on channels-last tokens
    (B, F, HW, D): out[f] = W0 z[f-1] + W1 z[f] + W2 z[f+1], with z[-1] = tail and the right neighbour cut as
    `shifted_sum` says. Computed as one product of z with the taps stacked, [W0; W1; W2] (a GEMM three times as wide
    as each tap's), whose three parts are then shifted along frames: no shifted copies of z."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, (3, 1), padding=(1, 0), bias=False)

    def forward(self, z, tail=None, chunk_ends=None):
        W = self.weight[..., 0].permute(2, 0, 1).flatten(0, 1)  # (3 D_out, D_in): the taps stacked, W0 first
        before, now, after = F.linear(z, W).chunk(3, dim=-1)
        first = None if tail is None else F.linear(tail.to(z.dtype), W[: self.out_channels])
        return shifted_sum(before, now, after, first, chunk_ends)


class MixFFN(nn.Module):
    """GLU inverted-bottleneck conv FFN with a full temporal conv: 1x1 up, SiLU, depthwise 3x3, gate, 1x1 down,
    then out = z + TConv(z) along frames. Weights keep diffusers' conv shapes; 1x1 convs run as matmuls."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D, C = cfg.dim, cfg.ffn_dim
        self.conv_inverted = Pointwise(D, 2 * C)
        self.conv_depth = nn.Conv2d(2 * C, 2 * C, 3, padding=1, groups=2 * C)
        self.conv_point = Pointwise(C, D, bias=False)
        self.conv_temp = TemporalConv(D)

    def forward(self, x, frames: int, height: int, width: int, tail=None, update_state=False, chunk_ends=None):
        """x: (B, N, D) with N = frames * height * width. tail: (B, H*W, D), the previous chunk's last frame of z
        (None: zeros, as at the start of a video or in a whole-clip pass); written in place when update_state.
        chunk_ends: (frames,) bool, True on the last frame of each chunk of a block-causal sequence, whose right
        neighbour (the next chunk, in the future) the temporal conv must not see."""
        h = self.conv_inverted(x)  # (B, N, 2C)
        h = glu_conv(h, self.conv_depth.weight, self.conv_depth.bias, height, width)  # SiLU, 3x3, gate: (B, N, C)
        z = self.conv_point(h).unflatten(1, (frames, height * width))  # (B, F, HW, D)
        out = z + self.conv_temp(z, tail, chunk_ends)
        if update_state:
            tail.copy_(z[:, -1])
        return out.flatten(1, 2)


class LnModulate(nn.Module):
    """LayerNorm without affine (no parameters, as diffusers' norm1/norm2), then x * (1 + scale) + shift."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x, shift, scale):
        return ln_modulate(x, shift, scale, self.eps)

    def add(self, x, a, shift, scale):
        """(x + a, forward(x + a)): a residual add and this norm of its result, in one pass over the rows."""
        return add_ln_modulate(x, a, shift, scale, self.eps)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1, self.norm2 = LnModulate(cfg.norm_eps), LnModulate(cfg.norm_eps)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, cfg.dim))
        self.attn1 = SelfAttention(cfg)
        self.attn2 = CrossAttention(cfg)
        self.ff = MixFFN(cfg)

    def forward(self, x, t0, k, v, bias, rope, grid, S=None, z=None, tail=None, update_state=False, chunks=None,
                state_only=False):
        """x: (B, N, D); t0: (B, 1 or N, 6D); grid: (frames, height, width) of the tokens; chunks: latent frames
        per chunk for a block-causal pass over a whole sequence. state_only (with update_state): only the state's
        update is wanted (the last block of a clean-context pass): after the self-attention, which adds every token
        to (S, z), only the last frame goes on, far enough to give the FFN's tail; the output is not the block's."""
        hw = grid[1] * grid[2]
        chunk_tokens = None if chunks is None else [n * hw for n in chunks]
        chunk_ends = None if chunks is None else _chunk_ends(chunks, x.device)
        mods = self.scale_shift_table + t0.unflatten(-1, (6, -1))  # (B, 1 or N, 6, D)
        h = self.norm1(x, mods[:, :, 0], mods[:, :, 1])
        x = x + mods[:, :, 2] * self.attn1(h, rope, S, z, update_state, chunk_tokens)
        if state_only:  # the tail is the FFN's z at the last frame, which the FFN computes frame by frame
            x, mods, grid = x[:, -hw:], mods[:, -hw:], (1, *grid[1:])  # mods: per sample, or per token
        shift_mlp, scale_mlp, gate_mlp = mods[:, :, 3:].unbind(2)
        x, h = self.norm2.add(x, self.attn2(x, k, v, bias), shift_mlp, scale_mlp)  # x + attn2, and its norm
        return x + gate_mlp * self.ff(h, *grid, tail=tail, update_state=update_state, chunk_ends=chunk_ends)


def _slices(sizes):
    bounds = [0, *itertools.accumulate(sizes)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _chunk_ends(chunks, device) -> torch.Tensor:
    ends = torch.zeros(sum(chunks), dtype=torch.bool, device=device)
    ends[torch.tensor(list(itertools.accumulate(chunks)), device=device) - 1] = True
    return ends


@dataclass
class TextKV:
    """A prompt prepared for the network: per-layer cross-attention K/V (B, heads, L, d) and the padding bias
    (B, 1, 1, L). Depends only on the prompt, so it is computed once per prompt, not per step."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    bias: torch.Tensor | None


@dataclass
class State:
    """Block-causal state of a stream, preallocated once; every update is in place, so its size never changes.

    S: (L, B, H, d, d) fp32, z: (L, B, H, d) fp32, tail: (L, B, h*w, D) in the model's dtype.
    """

    S: torch.Tensor
    z: torch.Tensor
    tail: torch.Tensor

    def tensors(self):
        return self.S, self.z, self.tail

    def reset(self) -> None:
        for a in self.tensors():
            a.zero_()

    def forget(self) -> None:
        """Drop the attention's memory of every frame so far (S, z); the temporal conv's last frame (tail), which
        the next frames continue from, stays."""
        self.S.zero_()
        self.z.zero_()

    def snapshot(self, device=None) -> State:
        """A copy (optionally on another device)."""
        return State(*(a.to(device=device, copy=True) for a in self.tensors()))

    def copy_(self, other: State, non_blocking: bool = False) -> None:
        """Take `other`'s contents into our own buffers (their storage never changes)."""
        for a, b in zip(self.tensors(), other.tensors()):
            a.copy_(b, non_blocking=non_blocking)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors())


class LongSANATransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.dim, cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.time_embed = TimestepEmbed(D)
        self.caption_projection = MLP2(cfg.caption_channels, D, nn.GELU(approximate="tanh"))
        self.caption_norm = RMSNorm(D, cfg.caption_norm_eps)
        self.transformer_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, D))
        self.proj_out = nn.Linear(D, math.prod(p) * cfg.out_channels)

    # -- conditioning ------------------------------------------------------------------------------------------
    def prepare_text(self, y: torch.Tensor, y_mask: torch.Tensor | None = None) -> TextKV:
        """y: (B, L, caption_channels) text-encoder states; y_mask: (B, L), 1 = keep."""
        dtype = self.proj_out.weight.dtype
        y = self.caption_norm(self.caption_projection(y.to(dtype)))
        bias = None if y_mask is None else ((1 - y_mask.to(dtype)) * -10000.0)[:, None, None, :]
        return TextKV([blk.attn2.text_kv(y) for blk in self.transformer_blocks], bias)

    def timestep(self, t: torch.Tensor, batch: int):
        """t: (B,) per sample or (B, N) / (B, ...) per token -> t0 (B, 1|N, 6D), temb (B, 1|N, D)."""
        if self.cfg.floor_timestep:
            t = t.floor()  # the original network casts t to an integer
        t = t.reshape(batch, -1)
        return self.time_embed(t, self.proj_out.weight.dtype)

    def rope(self, frame0: int, frames: int, height: int, width: int, device=None):
        """cos, sin (N, d/2) fp32 for the token grid starting at latent frame `frame0` (absolute position).

        Angles are formed in fp64 and rounded once, as diffusers' table is."""
        cfg = self.cfg
        if frame0 < 0 or frame0 + frames > cfg.rope_max_len or max(height, width) > cfg.rope_max_len:
            raise ValueError(f"positions [{frame0}, {frame0 + frames}) x {height} x {width} exceed the RoPE table "
                             f"({cfg.rope_max_len}); rebase the stream's positions first")
        axes = []
        for dim, pos, n_axis in zip(cfg.rope_split, (frame0, 0, 0), (frames, height, width)):
            freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
            axes.append(torch.arange(pos, pos + n_axis, dtype=torch.float64, device=device)[:, None] * freqs)
        tf, th, tw = axes
        grid = (frames, height, width)
        angles = torch.cat([tf[:, None, None].expand(*grid, -1), th[None, :, None].expand(*grid, -1),
                            tw[None, None, :].expand(*grid, -1)], dim=-1).reshape(-1, cfg.head_dim // 2)
        return angles.cos().float(), angles.sin().float()

    # -- the network ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, y_mask: torch.Tensor | None = None,
                chunks: list[int] | None = None):
        """Whole clip. x: (B, C, F, H, W) latents; y: (B, L, caption_channels); t: (B,) or per token (B, N).
        Bidirectional, or with `chunks` (latent frames per chunk, summing to F) block-causal: exactly what
        streaming the chunks one by one computes, in one differentiable pass (for training).
        Returns the flow velocity, shaped like x."""
        return self.run(x, t, self.prepare_text(y, y_mask), chunks=chunks)

    def forward_chunk(self, x, t, text: TextKV, state: State, frame0: int, update_state: bool = False,
                      output: bool = True):
        """One chunk x: (B, C, f, H, W) at absolute latent frame `frame0`, attending to the state of all earlier
        chunks. update_state=True (the clean-context pass) adds this chunk to the state; output=False skips the
        final projection (the clean-context pass needs only the state) and returns None."""
        return self.run(x, t, text, state, frame0, update_state, output)

    def run(self, x, t, text: TextKV, state: State | None = None, frame0: int = 0, update_state=False, output=True,
            chunks: list[int] | None = None):
        B, _, frames, H, W = x.shape
        if chunks is not None and (state is not None or sum(chunks) != frames or min(chunks) < 1):
            raise ValueError(f"chunks {chunks} must be positive and sum to the {frames} frames, with no state")
        rope = self.rope(frame0 // self.cfg.patch_size[0], *self.token_grid(frames, H, W), device=x.device)
        return self.run_prepared(x, self.timestep(t, B), text, rope, state, update_state, output, chunks)

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(frames, rows, cols) of the tokens of a latent (frames, height, width)."""
        pt, ph, pw = self.cfg.patch_size
        return frames // pt, height // ph, width // pw

    def run_prepared(self, x, temb: tuple[torch.Tensor, torch.Tensor], text: TextKV, rope, state: State | None = None,
                     update_state=False, output=True, chunks: list[int] | None = None, block=None):
        """`run` with the timestep embedding (t0, temb) = `timestep(t)` and the RoPE table (cos, sin) = `rope(...)`
        given, so that a static-shape compiled graph of it (engine.py) sees no Python number that changes from
        chunk to chunk. `block(blk, *args)` runs one transformer block (default: blk(*args); e.g. a compiled one).
        Without `output`, a pass that updates the state runs its last block `state_only` (Block.forward)."""
        B, _, frames, H, W = x.shape
        grid = self.token_grid(frames, H, W)
        t0, temb = temb
        block = block or Block.__call__
        # (B, N, D) made row-major: elementwise ops keep their input's layout, so a transposed view would make every
        # block's residual stream channel-major (strided norms, and FP8 products that refuse it)
        h = self.patch_embedding(x.to(self.proj_out.weight.dtype)).flatten(2).transpose(1, 2).contiguous()
        last = len(self.transformer_blocks) - 1
        for i, blk in enumerate(self.transformer_blocks):
            S, z, tail = (None, None, None) if state is None else (state.S[i], state.z[i], state.tail[i])
            state_only = i == last and update_state and not output and chunks is None
            h = block(blk, h, t0, *text.kv[i], text.bias, rope, grid, S, z, tail, update_state, chunks, state_only)
        if not output:
            return None
        pt, ph, pw = self.cfg.patch_size
        shift, scale = (self.scale_shift_table + temb[:, :, None]).unbind(2)
        h = self.proj_out(F.layer_norm(h, h.shape[-1:], eps=self.cfg.norm_eps) * (1 + scale) + shift)
        # unpatchify: (B, f, h, w, pt, ph, pw, C) -> (B, C, f*pt, h*ph, w*pw)
        h = h.reshape(B, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.reshape(B, -1, frames, H, W)

    # -- streaming state ----------------------------------------------------------------------------------------
    def new_state(self, batch: int, height: int, width: int, device=None) -> State:
        """Zeroed state for latents of spatial size height x width."""
        cfg = self.cfg
        L, Hh, d = cfg.num_layers, cfg.num_heads, cfg.head_dim
        hw = (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])
        f32 = dict(device=device, dtype=torch.float32)
        return State(torch.zeros(L, batch, Hh, d, d, **f32), torch.zeros(L, batch, Hh, d, **f32),
                     torch.zeros(L, batch, hw, cfg.dim, device=device, dtype=self.proj_out.weight.dtype))

    def rebase_state(self, state: State, delta: int) -> None:
        """Shift every stored position by -delta (exact): S' = S R_delta, i.e. each row of S, a vector in key
        space, is rotated by -delta frames on the time channels. New chunks must then use positions - delta."""
        t_dim = self.cfg.rope_split[0]  # the time channels lead each head's channels (`rope`: time, rows, columns)
        freqs = 1.0 / self.cfg.rope_theta ** (torch.arange(0, t_dim, 2, dtype=torch.float64) / t_dim)
        angles = (-delta * freqs)[None]  # (1, t_dim / 2)
        cos, sin = (a.float().to(state.S.device) for a in (angles.cos(), angles.sin()))
        # a layer and sample at a time: temporaries of ~0.2 MB at 480p, which the allocator's cached small blocks
        # take; the whole state's at once (~40 MB) made it reserve a new segment minutes into a stream
        for S in state.S.flatten(0, 1):  # (H, d_v, d_k): rows are key-space vectors
            t = S[..., :t_dim]
            t.copy_(apply_rope(t.reshape(-1, 1, 1, t_dim), cos, sin).view_as(t))  # rows as (tokens, 1, 1, t_dim)
