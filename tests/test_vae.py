"""The Wan 2.1 VAE: parity with diffusers' AutoencoderKLWan (decode, encode), streaming decode equal to the
whole-clip decode for every chunking, constant cache memory, snapshot / restore, both checkpoint layouts; the
decoder's fast path (fast_vae), channels-last included: the same decode, and no layout change inside the decoder.

diffusers decodes one latent frame per call (its first-frame rule lives in a "Rep" cache marker); ours decodes
any piece. Agreement for chunkings whose first chunk is 1, 3, 7 or 11 latent frames shows that the first-frame
rule is right wherever the first frame falls inside a call.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from longsana.config import VAEConfig, get_config
from longsana.fast_vae import GraphedDecoder, _upsample_conv, accelerate, default_layout
from longsana.loading import CheckpointError
from longsana.rewind import _host_buffers
from longsana.testing import diffusers_vae, needs_cuda, rel_err
from longsana.vae import (CausalCache, ResBlock, StreamingDecoder, WanVAE, load_vae, original_to_diffusers,
                          to_uint8)

CFG = get_config("tiny").vae  # base 8, dim_mult (1, 2, 2, 2), 1 res block: shortcuts in 2 decoder blocks
B, H, W = 2, 16, 24  # batch 2 also exercises the batch dimension (and CPU convs are faster at B > 1)
h, w = H // 8, W // 8


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_vae(CFG)
    ours = WanVAE(CFG).eval()
    ours.load_state_dict(ref.state_dict())  # strict: same names, same shapes
    return ref, ours


@pytest.fixture(scope="module")
def vaes(pair):
    """Our VAE as vae.py writes it, and with the fast path channels-last (eager: per-tap convs on the CPU)."""
    fast = copy.deepcopy(pair[1])
    accelerate(fast.decoder, compile=False, channels_last=True)
    return {"plain": pair[1], "channels-last": fast}


def channels_last(t: torch.Tensor) -> bool:
    """t is dense channels-last (NDHWC / NHWC) and not also in the default layout (which tiny dims allow)."""
    layout = torch.channels_last_3d if t.dim() == 5 else torch.channels_last
    return t.is_contiguous(memory_format=layout) and not t.is_contiguous()


@pytest.fixture(scope="module")
def clips(pair):
    """Normalized latents of 7 and 21 frames and diffusers' whole-clip decode of each."""
    ref, ours = pair
    g = torch.Generator().manual_seed(1)
    out = {}
    for f in (7, 21):
        z_norm = torch.randn(B, CFG.z_dim, f, h, w, generator=g)
        with torch.no_grad():
            video = ref.decode(ours.denormalize(z_norm)).sample
        assert video.shape == (B, 3, 1 + 4 * (f - 1), H, W)
        # non-degenerate: mostly inside (-1, 1), where clamping hides nothing, and far from constant
        assert (video.abs() < 1).float().mean() > 0.6 and video.std() > 0.2
        out[f] = z_norm, video
    return out


def test_architecture_matches_diffusers():
    for cfg in (VAEConfig(), CFG):
        with torch.device("meta"):
            ours, ref = WanVAE(cfg), diffusers_vae(cfg, seed=None)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        if cfg == VAEConfig():
            assert sum(p.numel() for p in ours.parameters()) == 126_892_531  # the published Wan 2.1 VAE: 126.9 M


def test_whole_clip_decode(pair, clips):
    z_norm, video = clips[7]
    assert rel_err(pair[1].decode(z_norm), video) <= 1e-5  # all 7 latents in one pass


@pytest.mark.parametrize("which", ["plain", "channels-last"])
@pytest.mark.parametrize("frames,chunks,max_latent_frames_per_call", [
    (7, [1] * 7, 2), (7, [1, 3, 3], 2), (7, [1, 6], 2), (7, [1, 6], 6), (7, [7], 3), (7, [3, 4], 1),
    (21, [11, 10], 3), (21, [11, 10], 10),  # LongSANA: 11-latent first chunk, then 10
])
def test_streaming_equals_whole_clip(vaes, clips, frames, chunks, max_latent_frames_per_call, which):
    z_norm, video = clips[frames]
    dec = StreamingDecoder(vaes[which], H, W, batch=B, max_latent_frames_per_call=max_latent_frames_per_call)
    assert all(channels_last(b) == (which == "channels-last") for b in dec.cache.frames.values())
    outs, s = [], 0
    for c in chunks:
        assert dec.frames_out(c) == (1 + 4 * (c - 1) if s == 0 else 4 * c)
        outs.append(dec.decode_float(z_norm[:, :, s:s + c]))
        s += c
        assert outs[-1].shape[2] == (1 + 4 * (c - 1) if s == c else 4 * c) and dec.latent_frames == s
    assert rel_err(torch.cat(outs, dim=2), video) <= 1e-5


def test_sub_pieces_bound_the_work_per_call(pair, clips):
    z_norm, _ = clips[21]
    dec = StreamingDecoder(pair[1], H, W, batch=B, max_latent_frames_per_call=3)
    calls = []
    hook = pair[1].decoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[2]))
    try:
        dec.decode(z_norm[:, :, :11])
        assert calls == [1, 3, 3, 3, 1]  # the stream's first latent frame alone, then at most 3
        calls.clear()
        dec.decode(z_norm[:, :, 11:])
        assert calls == [3, 3, 3, 1]
    finally:
        hook.remove()


def test_uint8_frames(pair, clips):
    z_norm, _ = clips[7]
    a = StreamingDecoder(pair[1], H, W, batch=B)
    frames = a.decode(z_norm[:, :, :3])
    b = StreamingDecoder(pair[1], H, W, batch=B)
    assert frames.dtype == torch.uint8 and frames.shape == (B, 9, H, W, 3)
    assert torch.equal(frames, to_uint8(b.decode_float(z_norm[:, :, :3])))
    one = StreamingDecoder(pair[1], H, W, batch=1).decode(z_norm[:1, :, :3])
    assert one.shape == (9, H, W, 3)  # batch 1 runs other conv kernels: rounding may differ by one level
    assert (one.int() - frames[0].int()).abs().max() <= 1 and (one == frames[0]).float().mean() > 0.99
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0]).view(1, 1, 1, 1, 7).expand(1, 3, 1, 1, 7)
    assert to_uint8(x)[0, 0, 0, :, 0].tolist() == [0, 0, 64, 128, 166, 255, 255]  # round(127.5 x + 127.5)


def test_cache_is_preallocated_and_constant(pair):
    dec = StreamingDecoder(pair[1], H, W, batch=B)
    layout = lambda: {id(k): (b.data_ptr(), b.shape, b.dtype) for k, b in dec.cache.frames.items()}  # noqa: E731
    at_start, nbytes = layout(), dec.nbytes
    assert nbytes > 0 and len(at_start) == sum(1 for _ in _causal_layers(pair[1].decoder))
    g = torch.Generator().manual_seed(2)
    for i in range(50):
        dec.decode(torch.randn(B, CFG.z_dim, 1 if i == 0 else 2, h, w, generator=g))
        if i == 4:
            after_5 = layout()
    assert after_5 == layout() == at_start and dec.nbytes == nbytes and dec.latent_frames == 99


def _causal_layers(decoder):
    """Layers with temporal context: 3-frame causal convs (3x3x3 and the upsamplers' time convs)."""
    return (m for m in decoder.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size[0] == 3)


@pytest.mark.parametrize("which", ["plain", "channels-last"])
def test_snapshot_restore_and_reset(vaes, clips, which):
    """Snapshots, and the rewind ring's host buffers (rewind._host_buffers), keep the cache's layout (a copy either
    way is a plain copy, not a transpose); restoring from each gives the same decode."""
    z_norm, _ = clips[7]
    dec = StreamingDecoder(vaes[which], H, W, batch=B, max_latent_frames_per_call=2)
    first = dec.decode(z_norm[:, :, :1])
    dec.decode(z_norm[:, :, 1:3])
    snap, snap_cpu = dec.snapshot(), dec.snapshot("cpu")
    host = CausalCache()
    host.frames = dict(zip(dec.cache.frames, _host_buffers(list(dec.cache.frames.values()))))
    host.copy_(dec.cache)  # as HostCopy.take does
    assert snap.nbytes == dec.nbytes and snap.t == 3
    for snapshot in (snap_cpu, host):
        assert all(a.stride() == b.stride() for a, b in zip(snapshot.frames.values(), dec.cache.frames.values()))
    nxt = dec.decode(z_norm[:, :, 3:6])
    for restore_from in (snap, snap_cpu, host):
        dec.decode(z_norm[:, :, 6:])
        dec.restore(restore_from)
        assert torch.equal(dec.decode(z_norm[:, :, 3:6]), nxt)
    dec.reset()
    assert dec.latent_frames == 0 and torch.equal(dec.decode(z_norm[:, :, :1]), first)
    with pytest.raises(ValueError, match="different decoder"):
        dec.restore(StreamingDecoder(vaes[which], 2 * H, W, batch=B).snapshot())


def test_bad_inputs(pair):
    dec = StreamingDecoder(pair[1], H, W, batch=B)
    good = torch.randn(B, CFG.z_dim, 2, h, w)
    for bad in (good[:, :15], good[:1], good[..., :-1], good[:, :, 0], good[:, :, :0], good.long()):
        with pytest.raises(ValueError, match="latent chunk must be"):
            dec.decode(bad)
    assert dec.latent_frames == 0  # nothing consumed by a refused chunk
    assert dec.decode(good).shape == (B, 5, H, W, 3)  # the first chunk's split is automatic
    with pytest.raises(ValueError, match="multiples of 8"):
        StreamingDecoder(pair[1], 20, W)
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        pair[1].encode(torch.zeros(1, 3, 6, H, W))


@pytest.mark.parametrize("latent_frames_per_call", [1, 2])
def test_encoder_parity(pair, latent_frames_per_call):
    ref, ours = pair
    video = torch.rand(B, 3, 9, H, W, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(video).latent_dist.mean
    z = ours.encode(video, latent_frames_per_call)
    assert z.shape == (B, CFG.z_dim, 3, h, w) and mean.std() > 0.1
    assert rel_err(z, mean) <= 1e-5
    assert rel_err(ours.encode_normalized(video, latent_frames_per_call), ours.normalize(mean)) <= 1e-5
    assert rel_err(ours.denormalize(ours.normalize(mean)), mean) <= 1e-6


def test_bf16_stream_as_close_to_fp32_as_diffusers_bf16(pair, clips):
    z_norm, video = clips[7]
    ref = copy.deepcopy(pair[0]).to(torch.bfloat16)
    with torch.no_grad():
        ref_err = rel_err(ref.decode(pair[1].denormalize(z_norm).bfloat16()).sample, video)
    vae = copy.deepcopy(pair[1]).to(torch.bfloat16)
    dec = StreamingDecoder(vae, H, W, batch=B)
    assert all(b.dtype == torch.bfloat16 for b in dec.cache.frames.values())
    out = torch.cat([dec.decode_float(z_norm[:, :, s:e]) for s, e in ((0, 3), (3, 7))], dim=2)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, video) <= min(1.25 * ref_err, 3e-2)  # bf16 rounding only (diffusers' bf16: ~1.3e-2 here)


# -- checkpoints ---------------------------------------------------------------------------------------------------

_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}


def to_original(sd: dict, cfg: VAEConfig) -> dict:
    """diffusers names -> the original Wan repo's (`Wan2.1_VAE.pth`), written from the original module tree."""
    flat, i = {}, 0  # decoder.up_blocks.{b}.(resnets.{j}|upsamplers.0) -> decoder.upsamples.{i}
    for b in range(len(cfg.dim_mult)):
        for j in range(cfg.num_res_blocks + 1):
            flat[f"{b}.resnets.{j}"], i = i, i + 1
        if b < len(cfg.dim_mult) - 1:
            flat[f"{b}.upsamplers.0"], i = i, i + 1
    out = {}
    for key, v in sd.items():
        k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)", lambda m: f"{m[1]}.middle.{2 * int(m[2])}", key)
        k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0", r"\1.middle.1", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+\.(resnets\.\d+|upsamplers\.0))",
                   lambda m: f"decoder.upsamples.{flat[m[1]]}", k)
        k = k.replace("encoder.down_blocks.", "encoder.downsamples.")
        k = re.sub(r"\.(norm1|conv1|norm2|conv2|conv_shortcut)\.", lambda m: f".{_RESNET[m[1]]}.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", k)
        k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", k)
        k = re.sub(r"^quant_conv\.", "conv1.", k)
        k = re.sub(r"^post_quant_conv\.", "conv2.", k)
        out[k] = v
    return out


def test_original_key_layout_matches_diffusers_converter():
    """Our test-side inverse, checked against diffusers' own converter on the layout it hard-codes (dim_mult
    [1, 2, 4, 4], 2 res blocks); then our loader's mapping inverts it, for that and the tiny layout."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    standard = VAEConfig(base_dim=4, num_res_blocks=2)
    with torch.device("meta"):
        sd = WanVAE(standard).state_dict()
    orig = to_original(sd, standard)
    assert "decoder.upsamples.14.residual.6.weight" in orig and "decoder.upsamples.4.shortcut.weight" in orig
    assert set(convert_wan_vae_to_diffusers(dict(orig))) == set(sd)
    for cfg in (standard, CFG):
        with torch.device("meta"):
            sd = WanVAE(cfg).state_dict()
        assert set(original_to_diffusers(to_original(sd, cfg), cfg)) == set(sd)


def test_checkpoints_load_and_agree(pair, clips, tmp_path):
    ref, ours = pair
    ref.save_pretrained(tmp_path / "model" / "vae")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    torch.save(to_original(ref.state_dict(), CFG), tmp_path / "Wan2.1_VAE.pth")
    loaded = [load_vae(tmp_path / "model" / "vae"), load_vae(tmp_path / "model"), load_vae(tmp_path / "sharded"),
              load_vae(tmp_path / "Wan2.1_VAE.pth", cfg=CFG)]
    z_norm, video = clips[7]
    expect = ours.decode(z_norm[:, :, :3])
    for vae in loaded:
        assert vae.cfg == CFG
        assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), ours.state_dict().values()))
        assert torch.equal(vae.decode(z_norm[:, :, :3]), expect)
    assert load_vae(tmp_path / "Wan2.1_VAE.pth", dtype=torch.bfloat16, cfg=CFG).dtype == torch.bfloat16
    assert load_vae(tmp_path / "sharded", cfg=CFG).cfg == CFG
    with pytest.raises(CheckpointError, match="disagrees with the given config"):
        load_vae(tmp_path / "sharded", cfg=VAEConfig())


def test_checkpoint_errors(pair, tmp_path):
    ref, _ = pair
    ref.save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").rename(tmp_path / "config.moved")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(tmp_path / "vae")
    orig = to_original(ref.state_dict(), CFG)
    del orig["decoder.head.2.bias"]
    torch.save(orig, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken\.pth.*\n.*missing keys: decoder\.conv_out\.bias"):
        load_vae(tmp_path / "broken.pth", cfg=CFG)
    with pytest.raises(CheckpointError, match="shape mismatches"):  # the default (full) architecture
        load_vae(tmp_path / "broken.pth")


def test_accelerated_decoder_equals_plain(pair):
    """fast_vae's eager path (per-tap convs on the CPU, fused norm + SiLU + padding) decodes, in pieces and at an
    awkward size, what the plain reference decodes in one pass; installing it twice changes nothing."""
    Ha, Wa = 40, 56  # 5 x 7 latents
    z_norm = torch.randn(1, CFG.z_dim, 6, Ha // 8, Wa // 8, generator=torch.Generator().manual_seed(4))
    plain = pair[1].decode(z_norm)
    vae = copy.deepcopy(pair[1])
    dec = StreamingDecoder(vae, Ha, Wa, max_latent_frames_per_call=2)  # its cache made before the install
    accelerate(vae.decoder, compile=False)
    accelerate(vae.decoder, compile=False)
    got = torch.cat([dec.decode_float(z_norm[:, :, s:e]) for s, e in ((0, 1), (1, 4), (4, 6))], dim=2)
    assert rel_err(got, plain) <= 1e-5 and vae.state_dict().keys() == pair[1].state_dict().keys()
    assert not torch.equal(got, plain)  # the per-tap sums: rounding differs, so the fast path did run


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsampling_conv_is_one_transposed_conv(layout):
    """The upsamplers' nearest 2x + 3x3 conv as fast_vae runs it, one 4x4 transposed conv at stride 2, against the
    two steps in fp64, on frames as small as 1 x 1 (the zero padding at every edge), in either layout."""
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(6, 3, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(3, generator=g))
    conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
    for h, w in ((1, 1), (5, 7), (2, 9)):
        x = torch.randn(2, 6, h, w, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
        want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
        got = _upsample_conv(conv, x)
        assert got.shape == want.shape and rel_err(got, want) < 1e-12
        assert got.is_contiguous(memory_format=layout) or h * w == 1  # (1 x 1 frames are in both layouts at once)


def test_resblock_convs_leave_their_bias_to_their_readers(vaes, clips):
    """On the fast path a ResBlock's convs run without bias (cuDNN has none: ATen adds it in a generic elementwise
    pass of its own), conv2's prologue adding conv1's and the residual add conv2's; every other conv keeps its own.
    The decode is the same (test_streaming_equals_whole_clip)."""
    vae = vaes["channels-last"]
    blocks = [m for m in vae.decoder.modules() if isinstance(m, ResBlock)]
    deferred = {c.bias.data_ptr() for b in blocks for c in (b.conv1, b.conv2)}
    others = {m.bias.data_ptr() for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))}
    others -= deferred
    used = []

    class BiasLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default and args[2] is not None:
                used.append(args[2].data_ptr())
            return func(*args, **(kwargs or {}))

    dec = StreamingDecoder(vae, H, W, batch=B)
    with BiasLog():
        dec.decode(clips[7][0][:, :, :3])
    assert not deferred & set(used) and others <= set(used)


class LayoutLog(TorchDispatchMode):
    """What runs inside `decoder`'s forward: whether each conv's input, weight and output are channels-last, and
    the shape of every copy that changes the order of the elements (a clone, copy_ or _to_copy whose source and
    result order their dims differently by stride)."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder, self.inside, self.calls = decoder, False, 0
        self.convs: list[tuple[bool, bool, bool]] = []
        self.conversions: list[tuple[int, ...]] = []

    def __enter__(self):
        self.hooks = [self.decoder.register_forward_pre_hook(lambda m, a: self._inside(True)),
                      self.decoder.register_forward_hook(lambda m, a, out: self._inside(False))]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return super().__exit__(*exc)

    def _inside(self, inside: bool) -> None:
        self.inside, self.calls = inside, self.calls + inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aten = torch.ops.aten
        if self.inside and func is aten.convolution.default:
            # a weight's channels innermost: the CPU path's per-tap weights are time slices of a 3D one
            self.convs.append((channels_last(args[0]), args[1].stride(1) == 1, channels_last(out)))
        if self.inside and func in (aten.clone.default, aten._to_copy.default, aten.copy_.default):
            src, dst = (args[1], args[0]) if func is aten.copy_.default else (args[0], out)
            if _order(src) != _order(dst):
                self.conversions.append(tuple(dst.shape))
        return out


def _order(t: torch.Tensor) -> list[int]:
    """t's dims from the innermost out, size-1 dims left out: two dense tensors of one shape with the same order
    hold their elements in the same sequence."""
    return [d for d in sorted(range(t.dim()), key=t.stride) if t.shape[d] > 1]


def test_channels_last_from_entry_to_exit(vaes, clips):
    """With channels_last, every conv of a streaming decode (the stream's first frame alone, then pieces, a batch
    of 2: slices in time are not views there) reads channels-last weights and input and writes channels-last
    output, and the only copy inside the decoder that changes a video tensor's layout is the latents' on entry,
    one per call (the 6D copies are upsample3d's interleaving of each time-conv output's two frames, a copy in
    any layout; the 4D ones of 4 x 4, the upsamplers' transposed kernels made from their weights). The reference,
    in PyTorch's default layout, transposes around every per-frame op."""
    z_norm, _ = clips[7]
    logs, frames = {}, {}
    for which, vae in vaes.items():
        dec = StreamingDecoder(vae, H, W, batch=B, max_latent_frames_per_call=2)
        with LayoutLog(vae.decoder) as log:
            frames[which] = torch.cat([dec.decode(z_norm[:, :, s:e]) for s, e in ((0, 3), (3, 7))], dim=1)
        logs[which] = log
    log = logs["channels-last"]
    assert log.calls == 4 and len(log.convs) > 100 and all(all(c) for c in log.convs)  # pieces: 1, 2 | 2, 2
    # not video: upsample3d's 6D interleave, and the upsamplers' transposed 4x4 kernels, made from their weights
    video = [s for s in log.conversions if len(s) != 6 and s[-2:] != (4, 4)]
    assert len(video) == log.calls and all(s[1] == CFG.z_dim for s in video)  # the latents, on entry
    plain = logs["plain"]  # the upsamplers' 2D convs alone: a transpose in and one out, after the first frame
    assert sum(len(s) == 5 for s in plain.conversions) >= 6 * (plain.calls - 1) and not all(map(all, plain.convs))
    levels = (frames["channels-last"].int() - frames["plain"].int()).abs()
    assert levels.max() <= 1 and (levels == 0).float().mean() > 0.99  # the same frames, to rounding


def test_channels_last_is_an_option(pair, clips):
    """accelerate's channels_last sets the weights' layout and the decoder's both ways; a StreamingDecoder whose
    cache was made in the other layout still decodes right (its convs then read mixed layouts); the encoder has
    no channels-last path."""
    vae = copy.deepcopy(pair[1])
    accelerate(vae.decoder, compile=False, channels_last=True)
    convs = [m for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert all(c.weight.stride(1) == 1 for c in convs) and vae.decoder.memory_format == torch.channels_last_3d
    assert sum(channels_last(c.weight) for c in convs) > len(convs) / 2  # 1x1 weights are the same in both layouts
    dec = StreamingDecoder(vae, H, W, batch=B)
    accelerate(vae.decoder, compile=False, channels_last=False)
    assert all(c.weight.is_contiguous() for c in convs) and vae.decoder.memory_format == torch.contiguous_format
    z_norm, video = clips[7]
    assert rel_err(torch.cat([dec.decode_float(z_norm[:, :, :3]), dec.decode_float(z_norm[:, :, 3:])], 2),
                   video) <= 1e-5
    with pytest.raises(ValueError, match="channels_last is for the VAE's Decoder"):
        accelerate(vae.encoder, compile=False, channels_last=True)
    accelerate(vae.encoder, compile=False)  # unless told: the default layout (channels-last is a GPU decoder's)
    accelerate(vae.decoder, compile=False)
    assert vae.decoder.memory_format == torch.contiguous_format and not default_layout(vae.decoder)


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_accelerated_decoder_decodes_as_eager(pair, clips, monkeypatch, channels_last):
    """accelerate(compile=True) traces norm + SiLU + causal padding as one region, and a ResBlock's bias + residual
    add as another (inductor on a GPU; aot_eager here, which runs the traced graph): a streaming decode through it
    equals diffusers' whole-clip decode, in either layout; the modules share the graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from longsana import engine, fast_vae

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setitem(engine.COMPILE_OPTIONS, "backend", counter)
    calls = []  # one per call of a compiled function
    compile_ = fast_vae.compiled
    monkeypatch.setattr(fast_vae, "compiled", lambda fn: lambda *a: calls.append(fn) or compile_(fn)(*a))
    vae = copy.deepcopy(pair[1])
    accelerate(vae.decoder, compile=True, channels_last=channels_last)
    z_norm, video = clips[7]
    dec = StreamingDecoder(vae, H, W, batch=B, max_latent_frames_per_call=2)
    got = torch.cat([dec.decode_float(z_norm[:, :, :3]), dec.decode_float(z_norm[:, :, 3:])], dim=2)
    assert rel_err(got, video) <= 1e-5
    graphs = counter.frame_count  # one per input shape (and bias or none), not per module
    assert 0 < graphs < 2 * len(calls) / 4  # 4 decoder calls: pieces of 1, then 2 frames
    accelerate(vae.decoder, compile=True, channels_last=channels_last)  # idempotent: the same function, no new graph
    dec.reset()
    assert torch.equal(dec.decode_float(z_norm[:, :, :3]), got[:, :, :9]) and counter.frame_count == graphs
    torch._dynamo.reset()


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_accelerated_decoder_on_cuda(monkeypatch, channels_last):
    """The fast path as a GPU stream runs it (cuDNN convs, inductor's fused norm + SiLU + padding): fp32 in pieces
    equals the plain whole-clip decode; bf16 is as close to it as the plain bf16 decode is; in either layout."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs, not TF32: a 1e-5 comparison
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = WanVAE(CFG).eval().cuda()
    z_norm = torch.randn(B, CFG.z_dim, 7, h, w, device="cuda")
    want = plain.decode(z_norm)
    bf16_err = rel_err(copy.deepcopy(plain).to(torch.bfloat16).decode(z_norm), want)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.25 * bf16_err)):
        vae = copy.deepcopy(plain).to(dtype)
        accelerate(vae.decoder, compile=True, channels_last=channels_last)
        dec = StreamingDecoder(vae, H, W, batch=B, max_latent_frames_per_call=2)
        got = torch.cat([dec.decode_float(z_norm[:, :, s:e]) for s, e in ((0, 3), (3, 4), (4, 7))], dim=2)
        assert got.dtype == dtype and rel_err(got, want) <= tol
    torch._dynamo.reset()


@needs_cuda
def test_channels_last_bf16_decode_at_a_moderate_size(monkeypatch):
    """The Wan 2.1 VAE (random weights) at 192x320, compiled and channels-last in bf16 as a stream would run it
    (first latent frame, then pieces of 2): within bf16 tolerance of the fp32 reference (the plain decoder, whole
    clip, TF32 off), i.e. as close to it as the plain decoder in bf16; every cache buffer channels-last."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    Hm, Wm = 192, 320
    plain = WanVAE(VAEConfig()).eval().requires_grad_(False).cuda()
    z_norm = torch.randn(1, plain.cfg.z_dim, 6, Hm // 8, Wm // 8, device="cuda")
    want = plain.decode(z_norm)
    vae = plain.to(torch.bfloat16)  # the fp32 weights are no longer needed
    bf16_err = rel_err(vae.decode(z_norm), want)
    accelerate(vae.decoder, compile=True, channels_last=True)
    dec = StreamingDecoder(vae, Hm, Wm, max_latent_frames_per_call=2)
    assert all(channels_last(b) for b in dec.cache.frames.values())
    got = torch.cat([dec.decode_float(z_norm[:, :, s:e]) for s, e in ((0, 3), (3, 6))], dim=2)
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    assert rel_err(got, want) <= min(1.25 * bf16_err, 3e-2)
    dec.reset()
    frames = torch.cat([dec.decode(z_norm[:, :, s:e]) for s, e in ((0, 3), (3, 6))], dim=0)
    assert torch.equal(frames, to_uint8(got)[0])
    torch._dynamo.reset()


@needs_cuda
def test_graphed_decoder_replays_the_decode_launched_op_by_op(monkeypatch):
    """GraphedDecoder (fast_vae), as a stream's decodes run (compiled, channels-last, on a side stream): chunk after
    chunk, across a reset and a restore, its frames, cache and frame count equal those of the same decoder launched
    op by op, bitwise (cuDNN's deterministic algorithms: both run the same kernels); one graph per piece length,
    captured at its second steady use. A replay that read a stale piece or cache, or left the cache behind, would
    differ."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    vae = WanVAE(CFG).eval().requires_grad_(False).cuda()
    accelerate(vae.decoder, compile=True, channels_last=True)
    z_norm = torch.randn(B, CFG.z_dim, 16, h, w, device="cuda")
    eager = StreamingDecoder(vae, H, W, batch=B, max_latent_frames_per_call=2)
    graphed = GraphedDecoder(vae, H, W, batch=B, max_latent_frames_per_call=2)
    side = torch.cuda.Stream()

    def both(s, e):
        with torch.cuda.stream(side):
            frames = eager.decode(z_norm[:, :, s:e]), graphed.decode(z_norm[:, :, s:e])
        side.synchronize()
        assert torch.equal(*frames) and eager.latent_frames == graphed.latent_frames == e
        assert all(torch.equal(b, graphed.cache.frames[k]) for k, b in eager.cache.frames.items())
        return frames[1]

    # pieces: 1 (the first latent frame) + 2 | 2 + 1 | 2 + 1 | 2 + 2 | 2 + 1: the 2's captured in the second chunk,
    # the 1's in the third, replayed from then on
    chunks = [(0, 3), (3, 6), (6, 9), (9, 13), (13, 16)]
    out = [both(s, e) for s, e in chunks[:2]]
    snap = graphed.snapshot()
    out += [both(s, e) for s, e in chunks[2:]]
    assert sorted(graphed.graphs) == [1, 2] and graphed._uses == {1: 2, 2: 2}
    graphed.restore(snap)
    with torch.cuda.stream(side):
        again = graphed.decode(z_norm[:, :, 6:9])
    side.synchronize()
    assert torch.equal(again, out[2])
    eager.reset()
    graphed.reset()
    assert all(torch.equal(both(s, e), want) for (s, e), want in zip(chunks[:3], out))
    torch._dynamo.reset()
