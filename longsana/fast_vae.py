"""The VAE decoder's fast path: `accelerate(vae.decoder, compile, channels_last)`, installed on that module tree only.

vae.py is the plain reference; this file changes how the same maths runs, never what it computes:
  - causal convs (and the 1x1x1 shortcuts) on CPU inputs run as one 2D conv per time tap, summed: PyTorch runs
    small 3D convs on CPUs in a slow generic kernel (`slow_conv3d`), and this is about 3x faster there;
  - every norm -> SiLU -> causal conv of the decoder (ResBlock's two, the output head) runs its prologue as one
    function, cat([past, silu(norm(x))]): the conv computes it from its input, and its norm and SiLU pass their
    input through. Compiled (compile=True), that is one fused pass over the activation instead of the eager
    form's ~8 (fp32 copy, norm, divide, cast, scale, SiLU, cat): the streaming decode at 480x832 in bf16 goes from
    52 to 77 FPS on an H100. The other layers are convolutions and layout changes that compiling does not help;
  - channels_last=True keeps the decoder channels-last (NDHWC) from end to end: its conv weights are converted
    once, its input once on entry (`Decoder.memory_format`), and a StreamingDecoder made after the install
    allocates its causal cache channels-last, so every activation, every cat of cache frames and input, and every
    conv input stays in that layout. cuDNN runs the decoder's 3x3x3 convs 1.3-1.5x faster so (H200), and the
    per-frame ops (the upsamplers' 2D convs, the attention) read the frames as views instead of transposed
    copies, which were ~93 ms of a chunk's decode on an H100. The uint8 frames (n, H, W, 3) are channels-last
    anyway: to_uint8 writes them with a plain copy. On by default on GPUs (CHANNELS_LAST): on the H200 a steady
    10-latent chunk decoded at 99.8 FPS so against 83.0 in the default layout (benchmarks/RESULTS.md, 2026-12-05);
    CPUs keep the default layout, which is what the CPU figures were measured with;
  - an upsampler's nearest 2x upsampling and 3x3 conv run as one transposed conv of the small frames
    (`_upsample_conv`): 4 taps per output pixel instead of 9, and no upsampled copy, whose kernel alone took 32.6
    ms of a steady chunk's 386 ms decode on the H200.
In eager mode the accelerated decoder computes what the reference computes, to rounding (the per-tap sums, the
norm written as a sum of squares).

Biases: cuDNN convolves without one, and ATen then adds it in a pass of its own, a broadcast add, which
TensorIterator runs as a generic (non-vectorized) elementwise kernel: one per conv, 39 per 2-frame decode call. By
their count (195 in 5 calls) and bytes, traced on a CPU, these are the 52.9 ms of generic elementwise kernels in a
steady 10-latent chunk's 386 ms at 480p on the H200 (bf16, compiled; not yet timed without them). So a ResBlock's
two convs (28 of the 39, 83% of those bytes) run without theirs: conv1's is added by conv2's prologue, which reads
conv1's output anyway, and conv2's by the residual add, with the shortcut (`bias_residual`, compiled like the
prologues: one pass). On a GPU in eager mode these are the same bf16 additions in the same order (on CPUs the
per-tap sums add the bias last instead of first); compiled, the sums stay in fp32 inside the fused pass, as the
norm's do. The other convs keep theirs: no single fused pass reads their outputs (an upsampler's output is both a
prologue's input and a residual).

The causal padding stays a cat of the cache frames and the input (the issue's "read the cache in place" is not
done): compiled, the cat is written by the prologue's one fused pass, which has to write the conv's padded input
anyway; a per-conv preallocated [past | new] buffer would hold ~0.8 GB per full-resolution conv at 480p (2 latent
frames a call, bf16), and for a batch of streams a time prefix of it is not a dense tensor, which cuDNN copies.

It swaps `forward` on the module instances: modules, parameters and state-dict keys stay as they are, so a
`CausalCache` keyed by the modules, made before or after, stays valid.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine import compiled
from .vae import (CausalCache, CausalConv3d, ChannelRMSNorm, Decoder, Encoder, Resample, ResBlock, StreamingDecoder,
                  WanVAE, memory_format_of, per_frame, per_video)

NORMALIZE_EPS = 1e-12  # F.normalize's default, which ChannelRMSNorm uses
CHANNELS_LAST = True  # accelerate's default layout on GPUs, the faster of the two on the H200 (benchmarks/fps.py)


def accelerate(decoder: nn.Module, compile: bool, channels_last: bool | None = None) -> None:
    """Install the fast path on every causal conv, norm, SiLU and ResBlock inside `decoder` (vae.decoder;
    vae.encoder works too, without channels_last), in place; differentiable. channels_last=None: CHANNELS_LAST for a
    Decoder on a GPU, where it was measured, else the default layout. Idempotent; a second call installs its own
    choices over the first's (a StreamingDecoder keeps the cache layout of its construction: correct either way, but
    make it after this call)."""
    set_layout(decoder, default_layout(decoder) if channels_last is None else channels_last)
    prologue, residual = (compiled(f) if compile else f for f in (norm_silu_pad, bias_residual))
    fused = {}
    for parent in decoder.modules():
        for norm, act, conv, bias_of in _prologues(parent):
            fused[conv] = partial(prologue, norm, bias_of)
            norm.forward = act.forward = _pass_through
    unbiased = {c for b in decoder.modules() if isinstance(b, ResBlock) for c in (b.conv1, b.conv2)}
    for m in decoder.modules():
        if isinstance(m, CausalConv3d):
            m.forward = partial(_causal_conv, m, fused.get(m), m not in unbiased)
        elif isinstance(m, ResBlock):
            m.forward = partial(_res_block, m, residual)
            if m.conv_shortcut is not None:
                m.conv_shortcut.forward = partial(_conv, m.conv_shortcut)
        elif isinstance(m, Resample) and m.mode.startswith("up"):
            m.resample.forward = partial(_upsample_conv, m.resample[1])


class GraphedDecoder(StreamingDecoder):
    """A StreamingDecoder on a GPU whose pieces replay CUDA graphs once the stream has started: one launch per piece
    instead of some 105 kernels and copies launched from Python one by one, with the compiled prologues' guards
    checked at each. The GPU's work is the same, and so is its time: a steady 10-latent chunk at 480p decoded in
    340 ms on an H100 either way (the GPU sets the pace, not the host). What changes is the host: the launch of a
    chunk's decode returns after 2 ms, and the device worker, the one thread that launches every stream's work, is
    free at once for the next chunk's transformer work or another stream's (benchmarks/RESULTS.md, 2026-12-07).

    A graph per piece length (`max_latent_frames_per_call`, and shorter last pieces): its first use runs eagerly,
    which compiles the prologues for its shapes and lets cuDNN pick its algorithms; its second is captured, then
    replayed; later ones replay. The stream's first piece (one frame out, the cache still empty) always runs
    eagerly: it takes other paths through the decoder. Graphs read the piece from a static input and write its
    frames to a static output that `decode` copies out; the cache's buffers never move (StreamingDecoder), so reset,
    snapshot and restore work as before. All graphs of a decoder share one memory pool (they run one at a time, in
    stream order); the capture returns the eager runs' cached activations to the GPU first (torch.cuda.graph empties
    the allocator's cache), so the pool takes their place."""

    def __init__(self, vae: WanVAE, height: int, width: int, batch: int = 1, max_latent_frames_per_call: int = 2):
        if vae.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the VAE on a CUDA device, not {vae.device}")
        super().__init__(vae, height, width, batch, max_latent_frames_per_call)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}  # by latent frames: graph, in, out
        self._uses: dict[int, int] = {}
        self._pool = None
        self._capture_stream = torch.cuda.Stream(vae.device)

    def _frames(self, z_norm: Tensor) -> Tensor:
        f = z_norm.shape[2]
        if not self.cache.started:
            return super()._frames(z_norm)
        if f not in self.graphs:
            self._uses[f] = self._uses.get(f, 0) + 1
            if self._uses[f] == 1:
                return super()._frames(z_norm)
            self.graphs[f] = self._capture(z_norm)
        graph, z_in, frames = self.graphs[f]
        z_in.copy_(z_norm)
        graph.replay()
        self.cache.t += f  # what Decoder.forward counts, which a replay does not run
        return frames

    def _capture(self, z_norm: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        """A piece like z_norm recorded (not run): the graph, its static input and output."""
        graph, t = torch.cuda.CUDAGraph(), self.cache.t
        with torch.cuda.device(self.vae.device):
            z_in = torch.empty(z_norm.shape, dtype=z_norm.dtype, device=self.vae.device)
            with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream,
                                  capture_error_mode="thread_local"):
                frames = super()._frames(z_in)
        self.cache.t = t  # the capture ran the Python code, not the kernels: the replay is the piece's work
        self._pool = graph.pool()
        return graph, z_in, frames


def default_layout(decoder: nn.Module) -> bool:
    """Whether `accelerate` makes `decoder` channels-last unless told: CHANNELS_LAST for a Decoder on a GPU."""
    return CHANNELS_LAST and isinstance(decoder, Decoder) and any(p.is_cuda for p in decoder.parameters())


def set_layout(decoder: nn.Module, channels_last: bool) -> None:
    """The decoder's conv weights (5D: channels_last_3d, the resampling and attention 2D convs: channels_last) and
    its activations (Decoder.memory_format) in one layout, or back in PyTorch's default."""
    if channels_last and not isinstance(decoder, Decoder):
        raise ValueError(f"channels_last is for the VAE's Decoder, got a {type(decoder).__name__}")
    layouts = {4: torch.channels_last, 5: torch.channels_last_3d} if channels_last else {}
    for conv in decoder.modules():
        if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
            w = conv.weight.data
            conv.weight.data = w.contiguous(memory_format=layouts.get(w.dim(), torch.contiguous_format))
    if isinstance(decoder, Decoder):
        decoder.memory_format = layouts.get(5, torch.contiguous_format)


def norm_silu_pad(norm: ChannelRMSNorm, bias_of: nn.Conv3d | None, x: Tensor, past: Tensor) -> Tensor:
    """cat([past, silu(norm(x))]) along time: what a causal conv behind a norm and a SiLU convolves; x is first
    completed by the bias of `bias_of`, the conv that computed it without. The norm is ChannelRMSNorm's, F.normalize's
    x / max(||x||, eps) written as x * rsqrt(max(sum x^2, eps^2)): the same to rounding, and a plain sum over
    channels, which CPUs run ~10x faster than the vector norm."""
    if bias_of is not None:
        x = x + _per_channel(bias_of.bias, x)
    xf = x.float()
    y = (xf * xf.square().sum(1, keepdim=True).clamp_min_(NORMALIZE_EPS**2).rsqrt_()).to(x.dtype)
    return torch.cat([past, F.silu(y * (norm.gamma * norm.scale), inplace=True)], dim=2)


def bias_residual(x: Tensor, bias: Tensor, h: Tensor) -> Tensor:
    """x + bias + h in place: a conv's output without its bias, completed by it and the shortcut h."""
    return x.add_(_per_channel(bias, x)).add_(h)


def _per_channel(bias: Tensor, x: Tensor) -> Tensor:
    """A conv's (C,) bias shaped to broadcast over x's channels (dim 1)."""
    return bias.view(-1, *(1,) * (x.dim() - 2))


def _prologues(module: nn.Module) -> list[tuple[ChannelRMSNorm, nn.SiLU, CausalConv3d, CausalConv3d | None]]:
    """The (norm, SiLU, conv, conv whose bias the prologue adds) chains of one module of the VAE, as its forward
    runs them."""
    if isinstance(module, ResBlock):
        return [(module.norm1, module.nonlinearity, module.conv1, None),
                (module.norm2, module.nonlinearity, module.conv2, module.conv1)]
    if isinstance(module, (Encoder, Decoder)):
        return [(module.norm_out, module.nonlinearity, module.conv_out, None)]
    return []


def _pass_through(x: Tensor) -> Tensor:
    return x


def _res_block(block: ResBlock, residual, x: Tensor, cache: CausalCache) -> Tensor:
    """ResBlock.forward, its convs without their biases: conv2's prologue adds conv1's, `residual` conv2's."""
    h = x if block.conv_shortcut is None else block.conv_shortcut(x)
    x = block.conv2(block.conv1(x, cache), cache)  # the norms and the SiLU: the convs' prologues
    return residual(x, block.conv2.bias, h)


def _causal_conv(conv: CausalConv3d, prologue, biased: bool, x: Tensor, cache: CausalCache) -> Tensor:
    """CausalConv3d.forward, the padding done by `prologue(x, past)` when given, per tap on CPU inputs; without the
    bias unless `biased` (the reader of the output adds it)."""
    n = conv.kernel_size[0] - 1
    past = cache.left(conv, x, n)
    x = torch.cat([past, x], dim=2) if prologue is None else prologue(x, past)
    past.copy_(x[:, :, -n:])
    return _conv(conv, x, biased)


def _conv(conv: nn.Conv3d, x: Tensor, biased: bool = True) -> Tensor:
    """A stride-1 conv unpadded in time: cuDNN on a GPU, per tap on CPUs (also for the 1x1x1 shortcuts: a
    single-threaded CPU conv3d returns them in the default layout whatever the input's)."""
    bias = conv.bias if biased else None
    return F.conv3d(x, conv.weight, bias, padding=conv.padding) if x.is_cuda else _per_tap(conv, x, bias)


def _upsample_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Resample's nearest 2x upsampling of frames x (N, C, H, W), then `conv` (3x3, padding 1), as one transposed
    conv of the small frames, 4x4 at stride 2: output row 2a + p sees input rows a - 1 + p and a + p only, with the
    3x3 kernel's rows 0 | 1 + 2 (p = 0) or 0 + 1 | 2 (p = 1) summed onto them, and columns alike. 4 taps per output
    pixel instead of 9, and no upsampled copy of x; the same up to rounding (the summed taps, rounded once to the
    weight's dtype). The kernel is made from the conv's weight at each call: stays differentiable and current."""
    w = conv.weight.to(torch.promote_types(conv.weight.dtype, torch.float32))  # the sums in fp32 at least
    w = _transposed_taps(_transposed_taps(w, 2), 3).transpose(0, 1).to(conv.weight.dtype)
    return F.conv_transpose2d(x, w.contiguous(memory_format=memory_format_of(x)), conv.bias, stride=2, padding=1)


def _transposed_taps(w: Tensor, dim: int) -> Tensor:
    """A 3x3 kernel's 3 taps along `dim` -> the 4 of `_upsample_conv`'s transposed kernel: conv_transpose2d (stride 2,
    padding 1) takes tap k of input row i to output row 2i - 1 + k, so row 2a reads row a through tap 1 and row a - 1
    through tap 3, and row 2a + 1 row a through tap 2 and row a + 1 through tap 0."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


def _per_tap(conv: nn.Conv3d, x: Tensor, bias: Tensor | None) -> Tensor:
    """The conv (stride 1, unpadded or already padded in time) as one 2D conv per time tap, summed."""
    T_out = x.shape[2] - conv.kernel_size[0] + 1
    out = None
    for k in range(conv.kernel_size[0]):
        y = F.conv2d(per_frame(x[:, :, k:k + T_out]), conv.weight[:, :, k], bias if k == 0 else None,
                     padding=conv.padding[1:])
        out = y if out is None else out.add_(y)
    return per_video(out, x.shape[0])
