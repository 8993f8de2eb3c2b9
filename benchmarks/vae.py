"""Benchmark of the streaming VAE decoder: `python -m longsana.benchmarks.vae` (GPU), `... --tiny` (a smoke test at a
tiny size, any device).

Full size: the Wan 2.1 VAE (random weights, PyTorch's default init: never zeros) decoding 480x832. It prints
  - a cost card: decoder FLOPs and unfused op traffic per video frame (counted on meta tensors), weight and
    cache bytes, and the ceilings they imply at the matmul throughput and copy bandwidth measured in this run;
  - ours: StreamingDecoder with the fast path (`fast_vae.accelerate`, compiled on a GPU, where its pieces replay
    CUDA graphs as a stream's do: GraphedDecoder; --plain: without),
    per dtype, per layout (--channels-last: channels-last and PyTorch's default, both by default) and per
    `max_latent_frames_per_call` (the sub-piece size), the median time of a steady-state chunk of --chunk latent
    frames (4 x chunk video frames) and of a stream's first chunk of 1 + chunk latents (1 + 4 x chunk frames),
    after warm-up; peak GPU memory of each (all allocations: weights, cache, output, activations); then the two
    layouts side by side, the figures that set `fast_vae.CHANNELS_LAST`;
  - diffusers' AutoencoderKLWan.decode of the same 1 + chunk latents, same weights, same run, and the relative
    error between its video and ours (fp32 "errors" include TF32 convs when --tf32, PyTorch's default);
and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from longsana.config import VAEConfig, get_config
from longsana.engine import CUDNN_TRIALS, autotune_cudnn
from longsana.fast_vae import CHANNELS_LAST, GraphedDecoder, accelerate
from longsana.testing import rel_err
from longsana.vae import CausalCache, Decoder, StreamingDecoder, WanVAE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"both": [False, True], "on": [True], "off": [False]}  # --channels-last: accelerate's channels_last values


def gb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OpTraffic(TorchDispatchMode):
    """Bytes each non-view op reads and writes, as if nothing were fused or cached."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.bytes += sum(t.nbytes for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
        return out


def decoder_cost(vae: WanVAE, height: int, width: int, chunk: int, dtype: torch.dtype) -> dict:
    """FLOPs and op traffic of one steady-state chunk (not the stream's first), per video frame, on meta, of the
    decoder as vae.py writes it."""
    s = vae.cfg.spatial_stride
    with torch.device("meta"):
        dec = Decoder(vae.cfg).to(dtype)
    z = torch.empty(1, vae.cfg.z_dim, chunk, height // s, width // s, device="meta", dtype=dtype)
    cache = CausalCache()
    cache.t = 1  # past the first frame: every latent frame gives temporal_stride video frames
    with FlopCounterMode(display=False) as flops, OpTraffic() as traffic:
        dec(z, cache)
    frames = chunk * vae.cfg.temporal_stride
    return dict(flops_per_frame=flops.get_total_flops() / frames, bytes_per_frame=traffic.bytes / frames)


def ceilings(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    """Measured matmul throughput (TF32 stands for fp32 on a GPU, as cuDNN convs use it) and copy bandwidth."""
    n = 1024 if tiny or device.type != "cuda" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = timed(lambda: a @ b, device, warmup=2, reps=5)["median_s"]
    x = torch.empty(n * n * (4 if tiny else 16), device=device, dtype=torch.uint8)
    y = torch.empty_like(x)
    t_copy = timed(lambda: y.copy_(x), device, warmup=2, reps=5)["median_s"]
    return dict(matmul_flops_per_s=2 * n**3 / t, copy_bytes_per_s=2 * x.nbytes / t_copy)


def timed(fn, device: torch.device, warmup: int, reps: int, before=None) -> dict:
    """Median wall time of fn() (synchronized), and the peak of allocated GPU memory over the timed runs."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if before:
            before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return dict(median_s=statistics.median(times), peak_bytes=peak)


def bench_ours(vae: WanVAE, height: int, width: int, chunk: int, pieces: int, warmup: int, reps: int,
               z_first: torch.Tensor, graphs: bool = False) -> dict:
    """Our decoder's first and steady chunks; with `graphs`, its pieces replayed as CUDA graphs (GraphedDecoder)."""
    dec = (GraphedDecoder if graphs else StreamingDecoder)(vae, height, width, max_latent_frames_per_call=pieces)
    ts = vae.cfg.temporal_stride
    first = timed(lambda: dec.decode(z_first), vae.device, warmup, reps, before=dec.reset)
    dec.reset()
    dec.decode(z_first)
    z = torch.randn(1, vae.cfg.z_dim, chunk, *z_first.shape[3:], device=vae.device)
    steady = timed(lambda: dec.decode(z), vae.device, warmup, reps)
    return dict(max_latent_frames_per_call=pieces, graphs=graphs, cache_bytes=dec.nbytes,
                steady_fps=ts * chunk / steady["median_s"], steady_s=steady["median_s"],
                steady_peak_bytes=steady["peak_bytes"],
                first_fps=(1 + ts * chunk) / first["median_s"], first_s=first["median_s"],
                first_peak_bytes=first["peak_bytes"])


def bench_diffusers(vae: WanVAE, z_first: torch.Tensor, warmup: int, reps: int) -> tuple[dict, torch.Tensor]:
    """diffusers' whole-clip decode (one latent frame per decoder call, its own loop) with our weights."""
    from diffusers import AutoencoderKLWan

    kw = {k: v for k, v in vae.cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = AutoencoderKLWan(**kw)
    ref.load_state_dict(vae.state_dict(), assign=True)  # same tensors, same dtype and device
    ref.eval().requires_grad_(False)
    z = vae.denormalize(z_first).to(vae.dtype)
    with torch.no_grad():
        r = timed(lambda: ref.decode(z), vae.device, warmup, reps)
        video = ref.decode(z).sample
    return dict(fps=video.shape[2] / r["median_s"], s=r["median_s"], peak_bytes=r["peak_bytes"]), video


def bench_dtype(vae: WanVAE, name: str, a: argparse.Namespace, z_first: torch.Tensor) -> dict:
    """Cost card, our decoder per sub-piece size, and diffusers, all in one dtype; prints as it goes."""
    vae.to(DTYPES[name])
    ts, n_params = vae.cfg.temporal_stride, sum(p.numel() for p in vae.parameters())
    c = decoder_cost(vae, a.height, a.width, a.chunk, vae.dtype) | ceilings(vae.device, vae.dtype, a.tiny)
    c |= dict(weight_bytes=n_params * vae.dtype.itemsize, output_bytes_per_frame=a.height * a.width * 3,
              compute_ceiling_fps=c["matmul_flops_per_s"] / c["flops_per_frame"],
              bandwidth_ceiling_fps=c["copy_bytes_per_s"] / c["bytes_per_frame"])
    print(f"## {name} cost card: {c['flops_per_frame'] / 1e12:.3f} TFLOP/frame, unfused op traffic "
          f"{c['bytes_per_frame'] / 1e9:.2f} GB/frame, weights {c['weight_bytes'] / 1e6:.0f} MB, output "
          f"{c['output_bytes_per_frame'] / 1e6:.2f} MB/frame; measured {c['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s "
          f"matmul, {c['copy_bytes_per_s'] / 1e9:.0f} GB/s copy -> ceilings {c['compute_ceiling_fps']:.1f} FPS "
          f"(compute), {c['bandwidth_ceiling_fps']:.1f} FPS (unfused traffic)")
    out = dict(cost=c, ours=[], diffusers=None)
    for channels_last in [None] if a.plain else LAYOUTS[a.channels_last]:  # None: vae.py as it is
        if channels_last is not None:
            torch._dynamo.reset()  # one (dtype, layout)'s graphs at a time: all of them pass the recompile limit
            accelerate(vae.decoder, compile=a.compile, channels_last=channels_last)
        for m in (int(x) for x in a.pieces.split(",")):
            r = bench_ours(vae, a.height, a.width, a.chunk, m, a.warmup, a.reps, z_first, graphs=a.graphs)
            out["ours"].append(r | dict(channels_last=channels_last))
            print(f"ours {name} {layout_name(channels_last)} max_latent_frames_per_call={m}: steady "
                  f"{r['steady_fps']:.1f} FPS ({r['steady_s']:.3f} s / {ts * a.chunk} frames, peak "
                  f"{gb(r['steady_peak_bytes'])}); first chunk {r['first_fps']:.1f} FPS ({r['first_s']:.3f} s / "
                  f"{1 + ts * a.chunk} frames, peak {gb(r['first_peak_bytes'])}); cache {gb(r['cache_bytes'])}")
    if not a.plain:
        accelerate(vae.decoder, compile=a.compile)  # the default layout again, for what follows
        out["channels_last_vs_default"] = compare_layouts(out["ours"], name)
    if a.no_diffusers or importlib.util.find_spec("diffusers") is None:
        print("no diffusers baseline (--no-diffusers, or diffusers not importable)")
        return out
    d, video = bench_diffusers(vae, z_first, a.warmup, a.reps)
    d["rel_err_vs_ours"] = rel_err(StreamingDecoder(vae, a.height, a.width).decode_float(z_first), video)
    out["diffusers"] = d
    print(f"diffusers {name} decode of {1 + a.chunk} latents: {d['fps']:.1f} FPS ({d['s']:.3f} s, peak "
          f"{gb(d['peak_bytes'])}); relative error ours vs diffusers {d['rel_err_vs_ours']:.2e}")
    return out


def layout_name(channels_last: bool | None) -> str:
    return {None: "plain", False: "default layout", True: "channels-last"}[channels_last]


def compare_layouts(rows: list[dict], name: str) -> dict:
    """Per sub-piece size measured in both layouts: channels-last's FPS over the default layout's (steady and
    first chunk) and both peaks; printed side by side."""
    by = {(r["channels_last"], r["max_latent_frames_per_call"]): r for r in rows}
    out = {}
    for (channels_last, m), cl in by.items():
        default = by.get((False, m))
        if not channels_last or default is None:
            continue
        out[m] = dict(steady_speedup=cl["steady_fps"] / default["steady_fps"],
                      first_speedup=cl["first_fps"] / default["first_fps"],
                      steady_peak_bytes=(default["steady_peak_bytes"], cl["steady_peak_bytes"]))
        print(f"{name} max_latent_frames_per_call={m}: default layout -> channels-last: steady "
              f"{default['steady_fps']:.1f} -> {cl['steady_fps']:.1f} FPS (x{out[m]['steady_speedup']:.2f}), "
              f"first chunk x{out[m]['first_speedup']:.2f}, steady peak {gb(default['steady_peak_bytes'])} -> "
              f"{gb(cl['steady_peak_bytes'])}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config and size: a smoke test for any machine")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunk", type=int, default=10, help="latent frames per steady-state chunk")
    p.add_argument("--pieces", default="1,2,5", help="max_latent_frames_per_call values to sweep")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--plain", action="store_true", help="our decoder as vae.py writes it, without fast_vae")
    p.add_argument("--channels-last", choices=sorted(LAYOUTS), default="both",
                   help=f"the fast path's layouts to time (default: both; fast_vae's default: "
                        f"{'on' if CHANNELS_LAST else 'off'} on GPUs, off on CPUs)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 for fp32 convs and matmuls (PyTorch's default for convs: on)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cudnn-trials", type=int, default=CUDNN_TRIALS,
                   help=f"algorithms cuDNN's benchmark times at a new shape, 0: all (the stream's: {CUDNN_TRIALS}; "
                        "PyTorch's default: 10)")
    a = p.parse_args(argv)
    if a.tiny:
        a.height, a.width, a.chunk, a.pieces, a.warmup, a.reps = 32, 48, 2, "1,2", 1, 2
    cfg = get_config("tiny").vae if a.tiny else VAEConfig()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = a.tf32
    if a.cudnn_benchmark:
        autotune_cudnn(a.cudnn_trials)  # as the stream sets it, by default
    torch.manual_seed(0)
    with torch.device(device):
        vae = WanVAE(cfg).eval().requires_grad_(False)
    a.compile = a.graphs = device.type == "cuda"  # as a stream runs the decoder
    s = cfg.spatial_stride
    z_first = torch.randn(1, cfg.z_dim, 1 + a.chunk, a.height // s, a.width // s, device=device)
    print(f"# VAE decode benchmark on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}: "
          f"{a.height}x{a.width}, chunks of {a.chunk} latent frames, {'tiny' if a.tiny else 'Wan 2.1'} VAE "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M params), tf32={a.tf32}, "
          f"cudnn.benchmark={a.cudnn_benchmark} (trials {a.cudnn_trials}), {'plain' if a.plain else 'fast path'}")
    result = dict(bench="vae", device=str(device), height=a.height, width=a.width, chunk=a.chunk, tiny=a.tiny,
                  plain=a.plain, graphs=a.graphs, tf32=a.tf32, cudnn_benchmark=a.cudnn_benchmark,
                  cudnn_trials=a.cudnn_trials, channels_last=a.channels_last, channels_last_default=CHANNELS_LAST)
    result |= {name: bench_dtype(vae, name, a, z_first) for name in a.dtypes.split(",")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
