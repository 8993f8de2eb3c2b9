"""The Wan 2.1 causal video VAE and a streaming decoder for endless videos.

Parameter names and shapes follow diffusers' `AutoencoderKLWan`, so a diffusers `vae/` folder loads as it is;
the original `Wan2.1_VAE.pth` names are mapped (`original_to_diffusers`).

Every temporal conv is causal: output frame t sees input frames t-2..t, the frames before the start being zeros.
A `CausalCache` holds, per causal layer, the last input frames of the previous call, so a video cut into pieces
of any sizes decodes to exactly the whole-clip result. Two layers are not plain convs in time:
  - decoder `upsample3d`: a time conv with 2C output channels turns each frame into 2. The FIRST frame of a
    stream is not upsampled (it stays 1 frame) and is not part of the time conv's input either: the time conv
    runs over frames 1, 2, ... with zeros before frame 1. Hence 1 latent frame -> 1 video frame, then 4 each.
  - encoder `downsample3d`: frame 0 passes through; after it, stride-2 windows (0,1,2), (2,3,4), ... give one
    frame each, so 1 + 4k video frames -> 1 + k latent frames.
Both rules key on `cache.started` (has the stream seen its first frame), so they hold for a first piece of any
length, e.g. the 11-latent first chunk LongSANA emits.

Latents: the network's latent is z; the diffusion model sees z_norm = (z - mean) / std (per channel, from the VAE
config).

This file is the plain reference. The fast path of the same decoder (per-tap convs on CPUs, norm + SiLU + causal
padding fused and compiled, activations channels-last) is installed by `fast_vae.accelerate(vae.decoder, compile)`.
The layout is not maths: the reference keeps whichever one it is given (`Decoder.memory_format`, `memory_format_of`),
so that the fast path's channels-last activations run through the same code without a transpose.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VAEConfig
from .loading import CheckpointError, assign_load, read_json_object, read_state_dict

# -- layout --------------------------------------------------------------------------------------------------------


def memory_format_of(x: Tensor) -> torch.memory_format:
    """x's layout: channels-last (each pixel's channels adjacent, NDHWC / NHWC: fast_vae's channels-last path) or
    PyTorch's default. Read from the channel stride, so a slice (in time, say) of a channels-last tensor is one too."""
    if x.dim() in (4, 5) and x.stride(1) == 1 and x.shape[1] > 1:
        return torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return torch.contiguous_format


def per_frame(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), frames for a 2D op, in x's layout: a view, or for a slice in time of a
    batch a copy (which .reshape would make in PyTorch's default layout whatever x's)."""
    if memory_format_of(x) == torch.channels_last_3d:
        return x.movedim(1, -1).contiguous().flatten(0, 1).movedim(-1, 1)
    return x.transpose(1, 2).flatten(0, 1)


def per_video(x: Tensor, batch: int) -> Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W), a view. By way of (B, T, H, W, C), so that a channels-last x gives a
    channels-last video, a 1-frame T's stride included (a .view gives it one that PyTorch's layout rules, which
    read the strides of size-1 dims too, take for another layout: cat and conv outputs then come out in the
    default layout)."""
    return x.movedim(1, -1).unflatten(0, (batch, -1)).movedim(-1, 1)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
          memory_format: torch.memory_format) -> Tensor:
    """torch.zeros in a given layout (torch.zeros takes none)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format).zero_()


# -- causal state --------------------------------------------------------------------------------------------------


class CausalCache:
    """What a causal pass carries from one call to the next: per layer its last input frames (zeros before the
    stream starts), and `t`, the number of input frames consumed so far."""

    def __init__(self):
        self.frames: dict[nn.Module, Tensor] = {}
        self.t = 0

    @property
    def started(self) -> bool:
        return self.t > 0

    def left(self, layer: nn.Module, x: Tensor, n: int) -> Tensor:
        """`layer`'s buffer of its last n input frames, (B, C, n, H, W) shaped and laid out like x; made (zeros) on
        first use."""
        buf = self.frames.get(layer)
        if buf is None:
            shape = (*x.shape[:2], n, *x.shape[3:])
            buf = self.frames[layer] = zeros(shape, x.dtype, x.device, memory_format_of(x))
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.frames.values())

    def clone(self, device: torch.device | str | None = None) -> CausalCache:
        other = CausalCache()
        other.frames = {k: b.to(device or b.device, copy=True) for k, b in self.frames.items()}
        other.t = self.t
        return other

    def copy_(self, other: CausalCache, non_blocking: bool = False) -> None:
        """Take `other`'s contents into our own buffers (their storage never changes)."""
        if other.frames.keys() != self.frames.keys() or any(
                b.shape != other.frames[k].shape for k, b in self.frames.items()):
            raise ValueError("cannot restore a VAE cache snapshot taken from a different decoder (model or size)")
        for k, b in self.frames.items():
            b.copy_(other.frames[k], non_blocking=non_blocking)
        self.t = other.t

    def zero_(self) -> None:
        for b in self.frames.values():
            b.zero_()
        self.t = 0


# -- layers --------------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """A (k_t, k, k) conv, causal in time: its left context is the cache's last k_t - 1 input frames."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int, int], padding: int = 0):
        super().__init__(c_in, c_out, kernel, padding=(0, padding, padding))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        n = self.kernel_size[0] - 1
        past = cache.left(self, x, n)
        x = torch.cat([past, x], dim=2)
        past.copy_(x[:, :, -n:])
        return super().forward(x)


class ChannelRMSNorm(nn.Module):
    """x / ||x|| * sqrt(C) * gamma over the channels (dim 1), not the last dim as model.RMSNorm; F.normalize's eps,
    computed in fp32 for bf16 inputs. gamma is (C, 1, 1, 1) for video tensors, (C, 1, 1) for per-frame images (the
    attention block)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.float(), dim=1).to(x.dtype) * (self.gamma * self.scale)




class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = ChannelRMSNorm(c_in), CausalConv3d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = ChannelRMSNorm(c_out), CausalConv3d(c_out, c_out, 3, padding=1)
        self.nonlinearity = nn.SiLU(inplace=True)  # on the norm's fresh output
        self.conv_shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(self.nonlinearity(self.norm1(x)), cache)
        x = self.conv2(self.nonlinearity(self.norm2(x)), cache)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame; frames do not mix."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, T, H, W = x.shape
        y = x.transpose(1, 2).reshape(B * T, C, H, W)
        qkv = self.to_qkv(self.norm(y)).flatten(2).transpose(1, 2)  # (BT, HW, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # (BT, 1, HW, C) each
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B * T, C, H, W)
        return x + self.proj(o).view(B, T, C, H, W).transpose(1, 2)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Resample(nn.Module):
    """2x spatial up/down sampling of each frame ('upsample2d', 'downsample2d'), the '3d' modes adding the
    temporal step described at the top of the file. Upsampling also halves the channels (Wan 2.1)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        layout = memory_format_of(x)
        x = per_video(self.resample(per_frame(x)), x.shape[0]).contiguous(memory_format=layout)  # channels-last: a view
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: Tensor, cache: CausalCache) -> Tensor:
        first = None
        if not cache.started:  # the stream's first frame: kept as one frame, outside the time conv
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            B, C, T, H, W = x.shape
            y = self.time_conv(x, cache).view(B, 2, C, T, H, W)
            # channel halves are the two output frames of each input frame: (B, 2, C, T) -> (B, C, T, 2), copied
            # into a video laid out as x is
            x = torch.empty(B, C, 2 * T, H, W, dtype=y.dtype, device=y.device, memory_format=memory_format_of(x))
            x.view(B, C, T, 2, H, W).copy_(y.permute(0, 2, 3, 1, 4, 5))
        if first is None:
            return x
        return torch.cat([first, x], dim=2) if x.shape[2] else first  # (a cat with no frames loses the layout)

    def _halve_frames(self, x: Tensor, cache: CausalCache) -> Tensor:
        first = None
        prev = cache.left(self, x, 1)  # the last frame of the previous call: the next window's first
        if cache.started:
            x = torch.cat([prev, x], dim=2)
        else:  # frame 0 passes through and opens the first window
            first = x[:, :, :1]
        if x.shape[2] % 2 == 0:
            raise ValueError(f"temporal downsampling needs an even number of new frames, got {x.shape[2] - 1}")
        prev.copy_(x[:, :, -1:])
        x = self.time_conv(x) if x.shape[2] > 1 else x[:, :, :0]
        return x if first is None else torch.cat([first, x], dim=2)


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_resnets: int, mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(c_in if i == 0 else c_out, c_out) for i in range(num_resnets)])
        self.upsamplers = nn.ModuleList([Resample(c_out, mode)]) if mode else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsamplers is None else self.upsamplers[0](x, cache)


class Encoder(nn.Module):
    """(B, 3, T, H, W) video -> (B, 2 z_dim, 1 + (T - 1) / 4, H / 8, W / 8) posterior mean and log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            blocks += [ResBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(c_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out, self.nonlinearity = ChannelRMSNorm(dims[-1]), nn.SiLU(inplace=True)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        t = x.shape[2]
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.conv_out(self.nonlinearity(self.norm_out(self.mid_block(x, cache))), cache)
        cache.t += t
        return x


class Decoder(nn.Module):
    """(B, z_dim, f, h, w) latents -> (B, 3, n, 8h, 8w) video, n = 4f, or 1 + 4(f - 1) at the stream start.

    `memory_format` is the layout its activations and a StreamingDecoder's cache are kept in, the input converted
    to it on entry: PyTorch's default here, channels-last on fast_vae's channels-last path."""

    memory_format = torch.contiguous_format

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None if i == len(cfg.dim_mult) - 1 else "upsample3d" if temporal_upsample[i] else "upsample2d"
            # after the first block, the input comes from an upsampler, which halved the channels
            blocks.append(UpBlock(c_in // 2 if i else c_in, c_out, cfg.num_res_blocks + 1, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out, self.nonlinearity = ChannelRMSNorm(dims[-1]), nn.SiLU(inplace=True)
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1)

    def forward(self, z: Tensor, cache: CausalCache) -> Tensor:
        t = z.shape[2]
        x = self.mid_block(self.conv_in(z.contiguous(memory_format=self.memory_format), cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        x = self.conv_out(self.nonlinearity(self.norm_out(x)), cache)
        cache.t += t
        return x


# -- the model -----------------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Whole-clip encode / decode. For a stream, use StreamingDecoder (bounded memory, state across calls)."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def latent_stats(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Per-channel (mean, std) of z, fp32, shaped (1, C, 1, 1, 1)."""
        mean, std = (torch.tensor(v, dtype=torch.float32, device=device or self.device).view(1, -1, 1, 1, 1)
                     for v in (self.cfg.latents_mean, self.cfg.latents_std))
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        mean, std = self.latent_stats(z.device)
        return (z.float() - mean) / std

    def denormalize(self, z_norm: Tensor) -> Tensor:
        mean, std = self.latent_stats(z_norm.device)
        return z_norm.float() * std + mean

    @torch.no_grad()
    def encode(self, video: Tensor, latent_frames_per_call: int = 1) -> Tensor:
        """video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k -> posterior mean z (B, z_dim, 1 + k, H/8, W/8), fp32.
        The video goes through the encoder in pieces of `latent_frames_per_call` latent frames (memory)."""
        cfg = self.cfg
        B, C, T, H, W = video.shape
        if C != 3 or (T - 1) % cfg.temporal_stride or H % cfg.spatial_stride or W % cfg.spatial_stride:
            raise ValueError(f"video must be (B, 3, 1 + {cfg.temporal_stride}k, H, W) with H, W multiples of "
                             f"{cfg.spatial_stride}, got {tuple(video.shape)}")
        video, cache = video.to(self.device, self.dtype), CausalCache()
        step = cfg.temporal_stride * latent_frames_per_call
        pieces = [video[:, :, :1]] + [video[:, :, s:s + step] for s in range(1, T, step)]
        h = self.quant_conv(torch.cat([self.encoder(p, cache) for p in pieces], dim=2))
        return h[:, :cfg.z_dim].float()  # the mean; the other half is the log-variance

    def encode_normalized(self, video: Tensor, latent_frames_per_call: int = 1) -> Tensor:
        """The latents the diffusion model sees (e.g. the first frame of image-to-video)."""
        return self.normalize(self.encode(video, latent_frames_per_call))

    @torch.no_grad()
    def decode(self, z_norm: Tensor) -> Tensor:
        """Normalized latents (B, z_dim, f, h, w) -> video (B, 3, 1 + 4(f - 1), 8h, 8w) in [-1, 1], in one pass."""
        z = self.post_quant_conv(self.denormalize(z_norm.to(self.device)).to(self.dtype))
        return self.decoder(z, CausalCache()).clamp_(-1, 1).contiguous()


def to_uint8(video: Tensor) -> Tensor:
    """(B, 3, n, H, W) in [-1, 1] -> (B, n, H, W, 3) uint8 = round(127.5 x + 127.5), on the video's device.
    The arithmetic is fp32: bf16 cannot hold 127.5 x + 127.5 exactly."""
    return video.float().clamp(-1, 1).mul_(127.5).add_(127.5).round_().to(torch.uint8).permute(0, 2, 3, 4, 1)


# -- streaming -----------------------------------------------------------------------------------------------------


class StreamingDecoder:
    """Decodes a stream of latent chunks into frames, keeping the causal cache between calls.

    `decode(chunk)` takes normalized latents (B, z_dim, f, h, w) with B = batch and (h, w) = (height, width) / 8,
    and returns uint8 frames on the VAE's device: (n, H, W, 3) when batch == 1, else (B, n, H, W, 3); n = 4f, or
    1 + 4(f - 1) for the stream's first chunk. Chunks may have any length >= 1: the stream's first latent frame is
    decoded on its own and the rest in pieces of at most `max_latent_frames_per_call`, which bounds the activation
    memory. Output equals a whole-clip decode of the concatenated chunks for every chunking.

    The cache (each causal conv's last 2 input frames) is allocated once, at construction, in the VAE's dtype
    (choose fp32 or bf16 with load_vae / vae.to) and the decoder's layout (`Decoder.memory_format`: install
    fast_vae's path before making a StreamingDecoder); its buffers never change storage: reset() zeros them,
    restore() copies into them (from a snapshot in any layout).
    """

    def __init__(self, vae: WanVAE, height: int, width: int, batch: int = 1, max_latent_frames_per_call: int = 2):
        s = vae.cfg.spatial_stride
        if height % s or width % s or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {s}, got {height}x{width}")
        if max_latent_frames_per_call < 1:
            raise ValueError(f"max_latent_frames_per_call must be >= 1, got {max_latent_frames_per_call}")
        self.vae, self.height, self.width, self.batch = vae, height, width, batch
        self.max_latent_frames_per_call = max_latent_frames_per_call
        self.latent_shape = (batch, vae.cfg.z_dim, height // s, width // s)  # (B, C, h, w) of a chunk
        self.mean, self.std = vae.latent_stats()
        self.cache = self._allocate_cache()

    def _allocate_cache(self) -> CausalCache:
        """Zero buffers of every causal layer, shapes found by running a twin decoder on the meta device (never
        the shared one: other streams may be decoding with it in other threads)."""
        with torch.device("meta"):
            twin = Decoder(self.vae.cfg).to(self.vae.dtype)
        shapes = CausalCache()
        B, C, h, w = self.latent_shape
        twin(torch.empty(B, C, 2, h, w, device="meta", dtype=self.vae.dtype), shapes)  # 2 frames: every layer runs
        name = {m: n for n, m in twin.named_modules()}
        ours = dict(self.vae.decoder.named_modules())
        cache, layout = CausalCache(), self.vae.decoder.memory_format
        cache.frames = {ours[name[k]]: zeros(b.shape, b.dtype, self.vae.device, layout)
                        for k, b in shapes.frames.items()}
        return cache

    @property
    def nbytes(self) -> int:
        """Bytes of the cache: the state of one stream."""
        return self.cache.nbytes

    @property
    def latent_frames(self) -> int:
        """Latent frames decoded since the stream (re)started."""
        return self.cache.t

    def reset(self) -> None:
        """Start a new stream."""
        self.cache.zero_()

    def snapshot(self, device: torch.device | str | None = None) -> CausalCache:
        """A copy of the stream state (on `device`, default the VAE's: pass "cpu" to keep GPU memory free)."""
        return self.cache.clone(device)

    def restore(self, snapshot: CausalCache) -> None:
        """Continue from a snapshot: the next chunk decodes as it did after the snapshot was taken."""
        self.cache.copy_(snapshot)

    def frames_out(self, f: int) -> int:
        """Video frames that the next chunk of f latent frames gives."""
        ts = self.vae.cfg.temporal_stride
        return ts * f - (0 if self.cache.started else ts - 1)

    @torch.no_grad()
    def decode(self, z_norm: Tensor) -> Tensor:
        """Normalized latents (B, z_dim, f, h, w) -> uint8 frames (see the class doc)."""
        B, n = self.batch, self.frames_out(self._check(z_norm))
        out = torch.empty(B, n, self.height, self.width, 3, dtype=torch.uint8, device=self.vae.device)
        t = 0
        for z in self._pieces(z_norm):
            frames = self._frames(z)
            out[:, t:t + frames.shape[1]] = frames
            t += frames.shape[1]
        return out[0] if B == 1 else out

    @torch.no_grad()
    def decode_float(self, z_norm: Tensor) -> Tensor:
        """Like decode, but the video itself: (B, 3, n, H, W) in [-1, 1], in the VAE's dtype (PyTorch's default
        layout: decode writes the uint8 frames straight from the decoder's)."""
        self._check(z_norm)
        return torch.cat([self._video(z) for z in self._pieces(z_norm)], dim=2).contiguous()

    def _pieces(self, z_norm: Tensor):
        """The chunk's latents in the pieces the decoder takes, each decoded before the next is cut: the stream's
        first latent frame alone, then at most `max_latent_frames_per_call` at a time."""
        s, f = 0, z_norm.shape[2]
        while s < f:
            e = s + (self.max_latent_frames_per_call if self.cache.started else 1)
            yield z_norm[:, :, s:e]
            s = e

    def _video(self, z_norm: Tensor) -> Tensor:
        """One piece's video (B, 3, n, H, W), clamped to [-1, 1]; the cache moves past the piece."""
        z = z_norm.to(self.mean.device, torch.float32) * self.std + self.mean
        return self.vae.decoder(self.vae.post_quant_conv(z.to(self.vae.dtype)), self.cache).clamp_(-1, 1)

    def _frames(self, z_norm: Tensor) -> Tensor:
        """One piece's uint8 frames (B, n, H, W, 3): all the device work of a piece (fast_vae.GraphedDecoder
        replays it as a CUDA graph)."""
        return to_uint8(self._video(z_norm))

    def _check(self, z_norm: Tensor) -> int:
        B, C, h, w = self.latent_shape
        if z_norm.ndim != 5 or z_norm.shape[:2] != (B, C) or z_norm.shape[3:] != (h, w):
            raise ValueError(f"latent chunk must be (B={B}, C={C}, frames, h={h}, w={w}) for this "
                             f"{self.height}x{self.width} decoder, got {tuple(z_norm.shape)}")
        if not z_norm.is_floating_point() or z_norm.shape[2] == 0:
            raise ValueError(f"latent chunk must be floating point with at least one frame, got {z_norm.dtype} "
                             f"{tuple(z_norm.shape)}")
        return z_norm.shape[2]


# -- loading -------------------------------------------------------------------------------------------------------

_RESNET_ORIGINAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
                    "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}


def _original_prefixes(cfg: VAEConfig) -> dict[str, str]:
    """Module prefixes of the original Wan code -> diffusers'. The original keeps the blocks of the encoder and
    of the decoder in one flat nn.Sequential each; diffusers groups the decoder's into up_blocks."""
    m = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        m |= {f"{part}.conv1.": f"{part}.conv_in.", f"{part}.head.0.": f"{part}.norm_out.",
              f"{part}.head.2.": f"{part}.conv_out.", f"{part}.middle.0.": f"{part}.mid_block.resnets.0.",
              f"{part}.middle.1.": f"{part}.mid_block.attentions.0.",
              f"{part}.middle.2.": f"{part}.mid_block.resnets.1."}
    levels, r = len(cfg.dim_mult), cfg.num_res_blocks
    for i in range(levels * r + levels - 1):  # encoder: the same flat list under another name
        m[f"encoder.downsamples.{i}."] = f"encoder.down_blocks.{i}."
    i = 0
    for b in range(levels):  # decoder: r + 1 resnets per block, then an upsampler except after the last
        for j in range(r + 1):
            m[f"decoder.upsamples.{i}."] = f"decoder.up_blocks.{b}.resnets.{j}."
            i += 1
        if b < levels - 1:
            m[f"decoder.upsamples.{i}."] = f"decoder.up_blocks.{b}.upsamplers.0."
            i += 1
    return m


def original_to_diffusers(sd: dict[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """Rename an original Wan 2.1 VAE state dict (`Wan2.1_VAE.pth`) to diffusers' names. Unknown keys are kept
    as they are, for the strict load to report."""
    prefixes = _original_prefixes(cfg)
    out = {}
    for key, v in sd.items():
        head = next((p for p in prefixes if key.startswith(p)), None)
        if head is None:
            out[key] = v
            continue
        rest = key[len(head):]
        old = next((o for o in _RESNET_ORIGINAL if rest.startswith(o)), None)  # inside a residual block
        if old is not None:
            rest = _RESNET_ORIGINAL[old] + rest[len(old):]
        out[prefixes[head] + rest] = v
    return out


def load_vae(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
             cfg: VAEConfig | None = None) -> WanVAE:
    """Load the VAE from a diffusers `vae/` folder (config.json + safetensors, sharded or not), a diffusers model
    folder containing `vae/`, or a weights file in either layout (`Wan2.1_VAE.pth`: original names). `cfg` is the
    architecture for a file, which carries none (default: Wan 2.1); a folder's config.json must agree with it."""
    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    if path.is_dir():
        cfg = _folder_config(path, cfg)
    cfg = cfg or VAEConfig()
    sd = read_state_dict(path)
    if set(sd) == {"state_dict"}:
        sd = sd["state_dict"]
    if "decoder.conv1.weight" in sd:  # diffusers calls it decoder.conv_in
        sd = original_to_diffusers(sd, cfg)
    with torch.device("meta"):
        vae = WanVAE(cfg)
    return assign_load(vae, sd, path, device=device, dtype=dtype).eval().requires_grad_(False)


def _folder_config(folder: Path, cfg: VAEConfig | None) -> VAEConfig:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no config.json (a diffusers vae/ folder has one)")
    fields = read_json_object(file)
    try:
        from_file = VAEConfig.from_diffusers(fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from e
    if cfg is not None and cfg != from_file:
        raise CheckpointError(f"{file}: disagrees with the given config ({from_file} != {cfg})")
    return from_file
