"""The transformer: parity with diffusers 0.42.1, and block-causal streaming equal to a whole-sequence reference.

The block-causal reference below is written plainly, in fp64, over the whole sequence at once: an explicit
token-by-token block mask on the linear attention and an explicit left-tail / right-zero temporal conv. The
streaming path (forward_chunk with running sums) must reproduce it chunk by chunk.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from longsana.config import DIFFUSERS_CONVENTIONS, TransformerConfig, get_config
from longsana.model import LongSANATransformer, TemporalConv
from longsana.testing import diffusers_transformer, randomize_, rel_err

TINY = get_config("tiny").transformer  # head_dim 40 -> RoPE split 16/12/12
CONFIGS = {
    "tiny-d40": TINY,
    "d24-3heads": TransformerConfig(num_heads=3, head_dim=24, num_layers=2, cross_num_heads=2, cross_head_dim=36,
                                    caption_channels=20, mlp_ratio=3.0, in_channels=4, out_channels=4),
    "d112-1head": TransformerConfig(num_heads=1, head_dim=112, num_layers=1, cross_num_heads=4, cross_head_dim=28,
                                    caption_channels=16, mlp_ratio=1.0),
}


def test_full_config_matches_the_published_model():
    with torch.device("meta"):
        model = LongSANATransformer(get_config("longsana-2b-480p").transformer)
    assert len(model.state_dict()) == 496
    assert sum(p.numel() for p in model.parameters()) == 2_056_862_144
    assert get_config("longsana-2b-480p").transformer.rope_split == (40, 36, 36)
    assert TINY.rope_split == (16, 12, 12)


def pair(cfg: TransformerConfig, seed=0):
    """diffusers' model and ours with the same random weights (diffusers' numerical conventions)."""
    cfg = dataclasses.replace(cfg, **DIFFUSERS_CONVENTIONS)
    ref = diffusers_transformer(cfg, seed)
    ours = LongSANATransformer(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("per_token", [False, True])
@torch.no_grad()
def test_parity_with_diffusers(name, per_token):
    cfg = CONFIGS[name]
    ref, ours = pair(cfg)
    g = torch.Generator().manual_seed(1)
    B, F_, H, W, L = 2, 3, 6, 10, 9  # odd latent sizes: a 3 x 3 x 5 token grid
    x = torch.randn(B, cfg.in_channels, F_, H, W, generator=g)
    y = torch.randn(B, L, cfg.caption_channels, generator=g)
    mask = torch.ones(B, L)
    mask[1, 5:] = 0  # right padding on the second prompt
    if per_token:  # image-to-video style: t = 0 on frame 0's tokens
        t = torch.tensor([937.25, 411.5])[:, None, None, None, None].expand(B, 1, F_, H // 2, W // 2).clone()
        t[:, :, 0] = 0
    else:
        t = torch.tensor([999.0, 250.5])
    want = ref(x, y, t, encoder_attention_mask=mask).sample
    got = ours(x, y, t, mask)
    assert rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_text_mask_matters():
    """The padding mask must change the output (or the parity test above could not catch a dropped mask)."""
    _, ours = pair(TINY)
    x, y = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 6, TINY.caption_channels)
    t = torch.tensor([500.0])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0.0]])
    assert rel_err(ours(x, y, t, mask), ours(x, y, t)) > 1e-3


def test_timestep_floor_follows_the_original():
    model = LongSANATransformer(TINY)
    t0_a, _ = model.timestep(torch.tensor([888.9]), 1)
    t0_b, _ = model.timestep(torch.tensor([888.0]), 1)
    assert torch.equal(t0_a, t0_b)


@pytest.mark.parametrize("frames", [1, 2, 5])
@torch.no_grad()
def test_temporal_conv_is_the_convolution_along_frames(frames):
    """TemporalConv (shifted products of the stacked taps) against F.conv2d over frames in fp64, zero-padded or with a
    tail on the left, and with chunk ends cutting the right neighbour."""
    torch.manual_seed(frames)
    conv = randomize_(TemporalConv(6), frames).double()
    z, tail = torch.randn(2, frames, 5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    ends = torch.rand(frames) < 0.5

    def reference(left, cut):  # channels-first (B, D, frames, HW) through a kernel-(3, 1) convolution, frame by frame
        zp = torch.cat([left[:, None], z, torch.zeros_like(z[:, :1])], 1)  # (B, frames + 2, HW, D)
        cols = [zp[:, f:f + 3].clone() for f in range(frames)]
        for f in range(frames):
            if cut[f]:
                cols[f][:, 2] = 0
        return torch.stack([F.conv2d(c.permute(0, 3, 1, 2), conv.weight)[:, :, 0].transpose(1, 2) for c in cols], 1)

    zeros, no_cut = torch.zeros_like(tail), torch.zeros(frames, dtype=torch.bool)
    assert rel_err(conv(z), reference(zeros, no_cut)) < 1e-12
    assert rel_err(conv(z, tail), reference(tail, no_cut)) < 1e-12
    assert rel_err(conv(z, tail, ends), reference(tail, ends)) < 1e-12


# --- block-causal streaming ---------------------------------------------------------------------------------

def block_causal_reference(model: LongSANATransformer, x, y, t, chunks: list[int]):
    """Whole sequence at once, in fp64, block-causal: tokens of chunk c attend (linear attention) to every token
    of chunks <= c; chunk c's temporal conv sees the previous chunk's last frame on the left and zeros on the right.
    x: (B, C, F, H, W); t: (B, F) one timestep per latent frame. Written without the model's forward."""
    m = copy.deepcopy(model).double()
    cfg = m.cfg
    B, _, Fr, H, W = x.shape
    h_, w_ = H // 2, W // 2
    hw, N, D, heads = h_ * w_, Fr * h_ * w_, cfg.dim, cfg.num_heads
    chunk_of_frame = torch.cat([torch.full((n,), i) for i, n in enumerate(chunks)])
    chunk_of_token = chunk_of_frame.repeat_interleave(hw)
    allowed = (chunk_of_token[None, :] <= chunk_of_token[:, None]).double()  # (N_query, N_key)
    cos, sin = (a.double() for a in m.rope(0, Fr, h_, w_))

    def rot(a):  # (B, N, heads, d)
        a1, a2 = a.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[:, None], sin[:, None]
        return torch.stack((a1 * c - a2 * s, a1 * s + a2 * c), -1).flatten(-2)

    text = m.prepare_text(y.double())
    h = m.patch_embedding(x.double()).flatten(2).transpose(1, 2)
    t_tok = t.double().repeat_interleave(hw, dim=1)  # (B, N)
    t0, temb = m.timestep(t_tok, B)
    for blk, (k_txt, v_txt) in zip(m.transformer_blocks, text.kv):
        mods = (blk.scale_shift_table + t0.unflatten(-1, (6, -1))).unbind(2)
        ln = lambda a, shift, scale: F.layer_norm(a, (D,), eps=cfg.norm_eps) * (1 + scale) + shift  # noqa: E731
        a = ln(h, mods[0], mods[1])
        at = blk.attn1
        q = F.relu(at.norm_q(at.to_q(a))).unflatten(-1, (heads, -1))
        k = F.relu(at.norm_k(at.to_k(a))).unflatten(-1, (heads, -1))
        v = at.to_v(a).unflatten(-1, (heads, -1))
        scores = torch.einsum("bihd,bjhd->bhij", rot(q), rot(k)) * allowed  # numerator weights, masked
        norms = torch.einsum("bihd,bjhd->bhij", q, k) * allowed
        o = torch.einsum("bhij,bjhd->bihd", scores, v) / (norms.sum(-1).transpose(1, 2)[..., None] + cfg.linear_attn_eps)
        h = h + mods[2] * at.to_out[0](o.flatten(-2))
        h = h + blk.attn2(h, k_txt, v_txt, text.bias)
        a = ln(h, mods[3], mods[4])
        # FFN, spatial part per frame, then the block-causal temporal conv
        ff = blk.ff
        a_nchw = a.view(B * Fr, h_, w_, D).permute(0, 3, 1, 2)
        u = F.silu(F.conv2d(a_nchw, ff.conv_inverted.weight, ff.conv_inverted.bias))
        u1, u2 = ff.conv_depth(u).chunk(2, dim=1)
        zf = F.conv2d(u1 * F.silu(u2), ff.conv_point.weight).view(B, Fr, D, hw)  # (B, F, D, hw)
        out, f0 = [], 0
        for n in chunks:
            left = zf[:, f0 - 1:f0] if f0 > 0 else torch.zeros_like(zf[:, :1])
            seg = torch.cat([left, zf[:, f0:f0 + n], torch.zeros_like(zf[:, :1])], 1).permute(0, 2, 1, 3)
            out.append(F.conv2d(seg, ff.conv_temp.weight).permute(0, 2, 1, 3))  # (B, n, D, hw)
            f0 += n
        zf = zf + torch.cat(out, 1)
        h = h + mods[5] * zf.permute(0, 1, 3, 2).reshape(B, N, D)
    shift, scale = (m.scale_shift_table + temb[:, :, None]).unbind(2)
    h = m.proj_out(F.layer_norm(h, (D,), eps=cfg.norm_eps) * (1 + scale) + shift)
    h = h.reshape(B, Fr, h_, w_, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return h.reshape(B, -1, Fr, H, W)


def random_chunks(rng: random.Random, n_chunks: int) -> list[int]:
    return [rng.randint(3, 5)] + [rng.randint(1, 4) for _ in range(n_chunks - 1)]  # first chunk larger


@pytest.mark.parametrize("seed", [0, 1, 2])
@torch.no_grad()
def test_streaming_equals_block_causal_reference(seed):
    """Clean-context passes chunk by chunk reproduce the whole-sequence block-causal computation; a denoising pass
    on a noisy chunk (state read, not written) equals the reference run on [clean past, noisy chunk]."""
    rng = random.Random(seed)
    cfg = dataclasses.replace(TINY, floor_timestep=False)
    model = randomize_(LongSANATransformer(cfg).eval(), seed)
    chunks = random_chunks(rng, 4)
    g = torch.Generator().manual_seed(seed)
    B, H, W = 1, 4, 6
    x = torch.randn(B, 16, sum(chunks), H, W, generator=g)
    y = torch.randn(B, 5, cfg.caption_channels, generator=g)
    t = torch.rand(B, sum(chunks), generator=g) * 1000  # a different timestep on every frame

    text = model.prepare_text(y)
    state = model.new_state(B, H, W)
    outs, f0 = [], 0
    for c, n in enumerate(chunks):
        xc, tc = x[:, :, f0:f0 + n], t[:, f0:f0 + n].repeat_interleave((H // 2) * (W // 2), dim=1)
        if c == len(chunks) - 1:  # a denoising pass first: must read the state without writing it
            before = state.snapshot()
            noisy = torch.randn(xc.shape, generator=g)
            got_noisy = model.forward_chunk(noisy, tc, text, state, f0)
            assert all(torch.equal(a, b) for a, b in zip(state.tensors(), before.tensors()))
        outs.append(model.forward_chunk(xc, tc, text, state, f0, update_state=True))
        f0 += n
    want = block_causal_reference(model, x, y, t, chunks)
    assert rel_err(torch.cat(outs, dim=2), want) <= 1e-5
    t_tok = t.repeat_interleave((H // 2) * (W // 2), dim=1)
    assert rel_err(model(x, y, t_tok, chunks=chunks), want) <= 1e-5  # the one-pass block-causal forward

    x_noisy = torch.cat([x[:, :, :-chunks[-1]], noisy], dim=2)
    want_noisy = block_causal_reference(model, x_noisy, y, t, chunks)[:, :, -chunks[-1]:]
    assert rel_err(got_noisy, want_noisy) <= 1e-5


@pytest.mark.parametrize("per_token", [False, True])
@torch.no_grad()
def test_clean_pass_without_output_leaves_the_same_state(per_token, monkeypatch):
    """Without output, the clean-context pass takes only the last frame past the last block's self-attention: it
    leaves the state a full pass leaves (S, z bitwise, the tail to fp32 rounding), over two chunks, and does the
    last block's cross-attention and FFN on one frame of 3 instead of all."""
    from torch.utils.flop_counter import FlopCounterMode

    from longsana.model import Block

    model = randomize_(LongSANATransformer(TINY).eval(), 3)
    g = torch.Generator().manual_seed(3)
    B, H, W, n = 1, 4, 6, 3
    text = model.prepare_text(torch.randn(B, 5, TINY.caption_channels, generator=g))
    states = {kind: model.new_state(B, H, W) for kind in ("output", "untrimmed", "trimmed")}
    whole = Block.forward
    flops = {}
    for c in range(2):
        x = torch.randn(B, 16, n, H, W, generator=g)
        t = torch.rand(B, n * (H // 2) * (W // 2), generator=g) * 100 if per_token else torch.zeros(B)
        model.forward_chunk(x, t, text, states["output"], c * n, update_state=True)
        for kind in ("untrimmed", "trimmed"):
            if kind == "untrimmed":  # every block whole, as before the trim
                monkeypatch.setattr(Block, "forward", lambda blk, *args: whole(blk, *args[:-1], False))
            with FlopCounterMode(display=False) as counter:
                assert model.forward_chunk(x, t, text, states[kind], c * n, update_state=True, output=False) is None
            monkeypatch.setattr(Block, "forward", whole)
            flops[kind] = counter.get_total_flops()
        want = states["output"]
        for got in (states["untrimmed"], states["trimmed"]):
            assert torch.equal(got.S, want.S) and torch.equal(got.z, want.z)
            assert rel_err(got.tail, want.tail) <= 1e-6
    # 2 blocks, the last one's FFN and cross-attention on 1 frame of 3: 23% less (18% with per-token timesteps,
    # whose embedding is the same work either way)
    assert flops["trimmed"] < 0.85 * flops["untrimmed"], flops


def test_block_causal_forward_is_differentiable_and_causal():
    model = randomize_(LongSANATransformer(TINY))
    x = torch.randn(1, 16, 5, 4, 4, requires_grad=True)
    y, t = torch.randn(1, 3, TINY.caption_channels), torch.tensor([500.0])
    out = model(x, y, t, chunks=[3, 2])
    out[:, :, :3].square().sum().backward()  # the first chunk's output
    assert x.grad[:, :, :3].abs().sum() > 0 and x.grad[:, :, 3:].abs().sum() == 0  # never sees the future
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def test_one_chunk_is_the_bidirectional_model():
    model = randomize_(LongSANATransformer(TINY).eval())
    x, y, t = torch.randn(1, 16, 3, 4, 6), torch.randn(1, 5, TINY.caption_channels), torch.tensor([640.0])
    state = model.new_state(1, 4, 6)
    got = model.forward_chunk(x, t, model.prepare_text(y), state, 0, update_state=True)
    assert rel_err(got, model(x, y, t)) <= 1e-6


@torch.no_grad()
def test_state_memory_is_constant_and_updated_in_place():
    model = randomize_(LongSANATransformer(TINY).eval())
    text = model.prepare_text(torch.randn(1, 4, TINY.caption_channels))
    state = model.new_state(1, 4, 4)
    ptrs, nbytes = [a.data_ptr() for a in state.tensors()], state.nbytes
    for c in range(30):
        model.forward_chunk(torch.randn(1, 16, 2, 4, 4), torch.tensor([0.0]), text, state, 2 * c,
                            update_state=True, output=False)
        if c == 2:
            after_3 = state.nbytes
    assert after_3 == state.nbytes == nbytes
    assert [a.data_ptr() for a in state.tensors()] == ptrs
    assert state.S.abs().sum() > 0 and state.tail.abs().sum() > 0


@torch.no_grad()
def test_rebase_positions_leaves_outputs_unchanged():
    model = randomize_(LongSANATransformer(TINY).eval())
    text = model.prepare_text(torch.randn(1, 4, TINY.caption_channels))
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 16, 2, 4, 4, generator=g) for _ in range(4)]
    t = torch.tensor([0.0])
    s1, s2 = model.new_state(1, 4, 4), model.new_state(1, 4, 4)
    start = 700  # a stream far into the video
    for i, xc in enumerate(xs[:3]):
        for s in (s1, s2):
            model.forward_chunk(xc, t, text, s, start + 2 * i, update_state=True)
    delta = 650
    model.rebase_state(s2, delta)
    t_noisy = torch.tensor([960.0])
    want = model.forward_chunk(xs[3], t_noisy, text, s1, start + 6)
    got = model.forward_chunk(xs[3], t_noisy, text, s2, start + 6 - delta)
    assert rel_err(got, want) <= 1e-5
    with pytest.raises(ValueError, match="rebase"):
        model.forward_chunk(xs[3], t, text, s1, TINY.rope_max_len - 1)


@torch.no_grad()
def test_snapshot_restore_reproduces_the_next_chunk():
    model = randomize_(LongSANATransformer(TINY).eval())
    text = model.prepare_text(torch.randn(1, 4, TINY.caption_channels))
    state = model.new_state(1, 4, 4)
    x0, x1, x2 = (torch.randn(1, 16, 2, 4, 4) for _ in range(3))
    t = torch.tensor([0.0])
    model.forward_chunk(x0, t, text, state, 0, update_state=True)
    snap = state.snapshot(device="cpu")
    want = model.forward_chunk(x1, t, text, state, 2, update_state=True)
    model.forward_chunk(x2, t, text, state, 4, update_state=True)  # wander off
    state.copy_(snap)
    got = model.forward_chunk(x1, t, text, state, 2, update_state=True)
    assert torch.equal(got, want)
