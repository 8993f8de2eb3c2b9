"""The cross-attention to the prompt, PyTorch's SDPA (cuDNN) against the Triton kernel that reads only the prompt's
own keys: `python -m longsana.benchmarks.cross_attention` (a GPU).

  1. the op alone at a chunk's 15,600 tokens (20 heads of 112, bf16), by how many of the 300 prompt tokens are kept,
     with a few tilings at 18 and 120 kept tokens (`--default-only`: the default tiling only, and the kernel with
     q's norm inside); `triton.testing.do_bench` medians, rel. error against fp64;
  2. a compiled 4-block LongSANA 2B model, a prompt of `--kept` tokens, bf16 and FP8: the cross-attention through
     SDPA (q normed before it, as the model ran it before the kernel), the kernel (q normed before it), the kernel
     with q's norm inside (what the model runs now): forward medians in two rounds, error against the fp32 model,
     and each variant's top kernels (a profile of 5 forwards).

Cost card: the op reads q (15,600 x 2240 bf16, 70 MB) and writes the output once; k and v (2.7 MB) come from cache.
The last line is one JSON object with every number. (Run on an H100 on 2026-12-07 as a throwaway script of the same
code, `.gpu/xattn_ab.py`; benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import argparse
import copy
import json
import types

import torch
import triton

from longsana import fp8
from longsana.benchmarks.fps import profile
from longsana.benchmarks.kernels import D, L, N, bench_us, xa_inputs
from longsana.config import TransformerConfig
from longsana.kernels import triton_cross_attention as txa
from longsana.kernels.cross_attention import cross_attention, cross_attention_ref
from longsana.model import LongSANATransformer
from longsana.testing import randomize_, rel_err

KEPT = (18, 64, 120, 200, 300)
TILINGS = ((64, 64, 2, 8), (64, 64, 1, 4), (128, 64, 1, 8), (128, 32, 1, 8), (64, 32, 1, 4), (128, 64, 2, 8),
           (32, 64, 1, 4), (64, 16, 1, 4))  # (block_m, block_l, num_stages, num_warps)
SWEPT_AT = (18, 120)  # kept tokens at which TILINGS are timed


def bench_op(default_only: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    w = (1 + 0.5 * torch.randn(D, generator=g)).cuda().bfloat16()
    r = (torch.rand(1, N, generator=g) + 0.5).cuda()
    default, res = txa.CONFIG, {}
    for kept in KEPT:
        q, k, v, bias = xa_inputs(g, kept)
        exact = cross_attention_ref(q.double(), k.double(), v.double(), bias.double())
        row = res[kept] = dict(sdpa_us=bench_us(lambda: cross_attention_ref(q, k, v, bias)),
                               sdpa_err=rel_err(cross_attention_ref(q, k, v, bias), exact), kernel={})
        lines = [f"kept {kept:3d}: SDPA {row['sdpa_us']:7.1f} us (err {row['sdpa_err']:.2e})"]
        swept = kept in SWEPT_AT and not default_only
        for t in [txa.CrossAttentionConfig(*c) for c in TILINGS] if swept else [default]:
            txa.CONFIG, name = t, f"{t.block_m}x{t.block_l} s{t.num_stages} w{t.num_warps}"
            try:
                o = cross_attention(q, k, v, bias, backend="triton")
                us = bench_us(lambda: cross_attention(q, k, v, bias, backend="triton"))
                row["kernel"][name] = dict(us=us, err=rel_err(o, exact))
                lines.append(f"  {name}: {us:7.1f} us (err {rel_err(o, exact):.2e})")
            except Exception as e:  # noqa: BLE001 (a tiling that does not compile or fit: reported, the rest go on)
                lines.append(f"  {name}: {type(e).__name__} {str(e)[:80]}")
        txa.CONFIG = default
        row["kernel_norm_inside_us"] = bench_us(lambda: txa.cross_attention_triton(q, k, v, bias, w, r))
        lines.append(f"  default tiling, q normed inside (w, r given): {row['kernel_norm_inside_us']:7.1f} us")
        print("\n".join(lines), flush=True)
    return res


def with_backend(m, backend: str, inside: bool = False):
    """m with its blocks' cross-attention through `backend`, q's norm inside the kernel or before it."""
    def forward(self, x, k, v, bias):
        if inside:
            q_norm = (self.norm_q.weight, self.norm_q.eps)
            return self.to_out[0](cross_attention(self.to_q(x), k, v, bias, backend=backend, q_norm=q_norm))
        return self.to_out[0](cross_attention(self.norm_q(self.to_q(x)), k, v, bias, backend=backend))
    for blk in m.transformer_blocks:
        blk.attn2.forward = types.MethodType(forward, blk.attn2)
    return m


def bench_model(g, kept: int) -> dict:
    cfg = TransformerConfig(num_layers=4)
    ref = randomize_(LongSANATransformer(cfg).eval()).cuda()
    x = torch.randn(1, 16, 10, 60, 104, device="cuda", generator=g)
    y = torch.randn(1, L, cfg.caption_channels, device="cuda", generator=g)
    y_mask = (torch.arange(L, device="cuda") < kept)[None].float()
    t = torch.tensor([700.0], device="cuda")
    res = {}
    with torch.inference_mode():
        want = ref(x, y, t, y_mask).float()
        bf = copy.deepcopy(ref).bfloat16()
        m8 = fp8.to_fp8(copy.deepcopy(bf))
        del ref
        models = {"bf16 sdpa": with_backend(copy.deepcopy(bf), "torch"),
                  "bf16 kernel": with_backend(copy.deepcopy(bf), "triton"),
                  "bf16 kernel+norm": with_backend(bf, "triton", True),
                  "fp8 sdpa": with_backend(copy.deepcopy(m8), "torch"),
                  "fp8 kernel": with_backend(copy.deepcopy(m8), "triton"),
                  "fp8 kernel+norm": with_backend(m8, "triton", True)}
        fns, outs = {}, {}
        for name, m in models.items():
            fns[name] = torch.compile(lambda m=m: m(x, y, t, y_mask), dynamic=False)
            outs[name] = fns[name]().clone()
            res[name] = dict(err_vs_fp32=rel_err(outs[name], want), ms=[])
            print(f"{name:<16} compiled; rel. err vs fp32 {res[name]['err_vs_fp32']:.3e}", flush=True)
        for rnd in range(2):
            for name, f in fns.items():
                res[name]["ms"].append(bench_us(f) / 1e3)
                print(f"round {rnd}: {name:<16} {res[name]['ms'][-1]:8.3f} ms", flush=True)
        for p in ("bf16", "fp8"):
            print(f"{p}: kernel vs sdpa {rel_err(outs[f'{p} kernel'], outs[f'{p} sdpa']):.2e}, kernel+norm vs "
                  f"sdpa {rel_err(outs[f'{p} kernel+norm'], outs[f'{p} sdpa']):.2e}", flush=True)
        for name in models:
            if not name.endswith(" kernel"):
                res[name]["kernels"] = profile(fns[name], f"a forward of {name} (5 profiled)", 14, calls=5)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="op,model", help="comma-separated: op, model")
    p.add_argument("--kept", type=int, default=18, help="the 4-block model's prompt tokens (of 300)")
    p.add_argument("--default-only", action="store_true", help="the op at the default tiling only")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.cross_attention needs a CUDA GPU")
    print(f"## cost card: q and the output {2 * N * D * 2 / 1e6:.0f} MB from memory a block, on "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    result = dict(bench="cross_attention", device=torch.cuda.get_device_name(), config=vars(a))
    if "op" in a.parts:
        result["op"] = bench_op(a.default_only)
    if "model" in a.parts:
        result["model"] = bench_model(torch.Generator("cuda").manual_seed(0), a.kept)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
