"""What the tests and the benchmarks share: the error metric, random weights, tiny models and diffusers references.

Speed does not depend on weight values, but a comparison or a timing on zeros proves nothing, so both use
non-degenerate random weights: no branch of the network is silently inert. diffusers and pytest are test
dependencies only, each imported inside the function that uses it: the benchmarks import this module without them.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .config import TransformerConfig


def nearly_zero(ref: torch.Tensor) -> bool:
    """True when `ref` is too small (RMS under 1e-6) for a relative error to mean anything."""
    return not ref.double().norm() > 1e-6 * ref.numel() ** 0.5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp64, refusing a (nearly) zero reference: a comparison on zeros proves nothing."""
    if nearly_zero(ref):
        raise ValueError(f"reference is (nearly) zero: norm {ref.double().norm().item():.3g} over {ref.numel()} values")
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def needs_cuda(test):
    """Mark `test` a GPU test (pytest marker `gpu`, which `make test-fast` leaves out) and skip it without a CUDA GPU
    or under Triton's interpreter (TRITON_INTERPRET=1), where no kernel would be compiled for the GPU."""
    import pytest

    compiled_cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    skip = pytest.mark.skipif(not compiled_cuda, reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


def needs_gpus(n: int):
    """`needs_cuda`, and a skip where fewer than `n` CUDA GPUs are present (a stream split across GPUs)."""
    import pytest

    def mark(test):
        return needs_cuda(pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPUs")(test))
    return mark


def skip_without_fp8():
    """A pytest skip mark for a GPU without FP8 tensor cores (compute capability below fp8.MIN_CAPABILITY)."""
    import pytest

    from .fp8 import MIN_CAPABILITY

    old = torch.cuda.is_available() and torch.cuda.get_device_capability() < MIN_CAPABILITY
    return pytest.mark.skipif(old, reason="needs a GPU with FP8 (compute capability 8.9+)")


def needs_fp8_gpu(test):
    """`needs_cuda`, and `skip_without_fp8`."""
    return needs_cuda(skip_without_fp8()(test))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter, on its own device: weights ~ N(0, 1/fan_in), norm weights around 1, biases and
    modulation tables small but non-zero."""
    g = None
    for name, p in module.named_parameters():
        g = g or torch.Generator(p.device).manual_seed(seed)
        r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
        if "norm" in owner:
            r = 1 + 0.2 * r
        elif p.ndim <= 1 or "scale_shift_table" in name:
            r = 0.2 * r
        else:
            r = r / p[0].numel() ** 0.5
        p.copy_(r)
    return module


def diffusers_transformer(cfg: TransformerConfig, seed: int = 0):
    """diffusers' SanaVideoTransformer3DModel for `cfg`, with random weights."""
    from diffusers import SanaVideoTransformer3DModel

    kw = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    return randomize_(SanaVideoTransformer3DModel(**kw).eval(), seed)


def diffusers_vae(cfg, seed: int | None = 0):
    """diffusers' AutoencoderKLWan for `cfg` (a VAEConfig), with random weights (seed None: its own init)."""
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}).eval()
    return ref if seed is None else randomize_(ref, seed)


PROMPT_WORDS = ("a an the one two three red green blue yellow white black purple orange circle circles square "
                "squares triangle triangles star moving left right up down bouncing still spinning on background "
                "motion score : . 10 30")


def tiny_text_encoder(dim: int, seed: int = 0):
    """A small Gemma2 with a word-level tokenizer over the CHI and a few prompt words."""
    from longsana.text import CHI_SANA, TextEncoder, build_gemma2, build_word_tokenizer

    tok = build_word_tokenizer(["\n".join(CHI_SANA), PROMPT_WORDS])
    return TextEncoder(tok, build_gemma2(len(tok), hidden_size=dim, seed=seed))


def tiny_pipeline(seed: int = 0):
    """The streaming pipeline of the "tiny" config with random weights, on the CPU in fp32."""
    from longsana.config import get_config
    from longsana.model import LongSANATransformer
    from longsana.stream import Pipeline
    from longsana.vae import WanVAE

    spec = get_config("tiny")
    model = randomize_(LongSANATransformer(spec.transformer).eval(), seed)
    vae = randomize_(WanVAE(spec.vae).eval(), seed + 1)
    return Pipeline(model, vae, tiny_text_encoder(spec.transformer.caption_channels, seed), spec)


def save_pipeline(pipe, folder):
    """Write `pipe` as a diffusers-layout model folder."""
    pipe.save_pretrained(folder)
    return folder


# -- streams through switches and rewinds --------------------------------------------------------------------------
SWITCH_PROMPTS = ("a red circle moving left", "two yellow squares bouncing")


def switch_schedule(pipe, compile: bool, **settings):
    """9 chunks of a tiny-model stream through a switch inside a made chunk, a rewind inside a chunk, and a switch
    known ahead that cuts a chunk as it is made (with a transition); the engine speculates the chunk after each one
    that is not cut. Returns the stream and its chunks, for comparisons of two ways of running it. settings: more
    StreamSettings."""
    P, Q = SWITCH_PROMPTS
    stream = pipe.stream(P, seed=5, compile=compile, early_first_frame=False, switch_lead=0, **settings)
    it, out = iter(stream), []
    for i in range(9):
        out.append(next(it))
        if i == 2:
            stream.set_prompt(Q, at_frame=18)  # latent 6, inside chunk 2 = [5, 7)
        if i == 4:
            stream.rewind(0.3, at_frame=32)  # latent 7, inside chunk 3 = [6, 8)
        if i == 6:
            stream.set_prompt(P, at_frame=out[-1].start_frame + 10, transition_frames=12)  # inside the next chunk
    return stream, out


def uncompiled(monkeypatch) -> None:
    """The fast engine's code path without torch.compile (compiling is a GPU run's, and slow on a CPU)."""
    monkeypatch.setattr("longsana.engine.compile_block", lambda: None)
    monkeypatch.setattr("longsana.stream.accelerate", lambda module, compile: None)


# -- a second device on a machine with one CPU --------------------------------------------------------------------
_ON_SECOND = "_longsana_on_second_cpu"  # the attribute that marks a tensor as one of the second CPU's


def _on_second(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _ON_SECOND, False)


def _mark(tree, on: bool):
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            setattr(t, _ON_SECOND, on)
    return tree


class SecondCPU(TorchFunctionMode):
    """An emulated second device, "cpu:1", for tests of a stream split across two devices on a CPU-only machine
    (torch drops the index of "cpu:1": every tensor is on "cpu"). Tensors placed there (`place`, a factory given
    device="cpu:1", `.to("cpu:1")`, and whatever an op makes from them) report `device` cpu:1; an op that mixes them
    with tensors of the real CPU raises, as across two GPUs (0-dim tensors aside, as CPU scalars join CUDA ops), and
    so does `.numpy()` of one; `copy_`, item assignment, `.to` and `.cpu()` cross between the two. So code that
    forgets to move a tensor between the devices fails here as it would on two GPUs. A mode is active on the
    thread that enters it only: `second_cpu(pipe)` enters one on this thread and on the pipeline's device worker."""

    device = torch.device("cpu", 1)
    CROSSING = (torch.Tensor.copy_, torch.Tensor.__setitem__)  # ops that take their inputs from either device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return self.device if _on_second(args[0]) else func(*args)
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            return self._to(func, args, kwargs)
        if func == torch.Tensor.numpy and _on_second(args[0]):
            raise TypeError(f"can't convert {self.device} device type tensor to numpy: copy it to the host first")
        device = kwargs.get("device")
        if device is not None and torch.device(device) == self.device:  # a factory
            return _mark(func(*args, **{**kwargs, "device": "cpu"}), True)
        if func in self.CROSSING:
            return func(*args, **kwargs)
        where = {_on_second(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.ndim > 0}
        if len(where) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{self.device} and cpu! ({func})")
        out = func(*args, **kwargs)
        return _mark(out, True) if True in where else out

    def _to(self, func, args, kwargs):
        """`.to` / `.cpu()`: a copy when the tensor changes device, as between GPUs."""
        src = args[0]
        device, dtype, copy = torch.device("cpu"), None, False
        if func == torch.Tensor.to:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
            copy = kwargs.get("copy", False)
        on = _on_second(src) if device is None else device == self.device
        out = src.to(dtype=dtype or src.dtype, copy=copy or on != _on_second(src))
        return out if out is src else _mark(out, on)

    @staticmethod
    def place(module: torch.nn.Module, on: bool = True) -> torch.nn.Module:
        """Put `module`'s parameters and buffers on the second CPU (on=False: back)."""
        _mark(list(itertools.chain(module.parameters(), module.buffers())), on)
        return module


@contextlib.contextmanager
def second_cpu(pipe):
    """`pipe`'s VAE on the emulated second CPU (`SecondCPU`) for the duration, the emulation active on this thread
    and on the pipeline's device worker, where its streams run."""
    here, worker = SecondCPU(), SecondCPU()
    SecondCPU.place(pipe.vae)
    try:
        with here:
            pipe.worker.run(worker.__enter__)
            try:
                yield pipe
            finally:
                pipe.worker.run(worker.__exit__, None, None, None)
    finally:
        SecondCPU.place(pipe.vae, on=False)
