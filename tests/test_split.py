"""One stream split across two devices: the transformer and the text encoder on one, the VAE on another
(`Pipeline.vae_device`), each chunk's latents handed over to the decoder (step.SideStream). The frames must be those
of one device: bitwise in fp32 on the CPU, where the second device is emulated (testing.SecondCPU: an op that mixes
the two devices fails, as across two GPUs), through a prompt switch and a rewind that land inside chunks; within
bf16 tolerance on two GPUs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longsana.engine import ChunkEngine
from longsana.step import EagerStep, SideStream
from longsana.testing import SecondCPU, needs_gpus, rel_err, second_cpu, switch_schedule, tiny_pipeline, uncompiled
from longsana.vae import StreamingDecoder

SECOND = SecondCPU.device


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "engine"])
def test_split_stream_equals_one_device_bitwise(monkeypatch, compile):
    uncompiled(monkeypatch)
    one, two = tiny_pipeline(), tiny_pipeline()
    _, want = switch_schedule(one, compile)
    seen = []  # the devices of the latents the decoder is given
    decode = StreamingDecoder.decode
    monkeypatch.setattr(StreamingDecoder, "decode", lambda self, z: seen.append(z.device) or decode(self, z))
    with second_cpu(two):
        assert (two.device, two.vae_device) == (torch.device("cpu"), SECOND)
        stream, got = switch_schedule(two, compile)
        assert isinstance(stream.step, ChunkEngine if compile else EagerStep)
        assert stream.step.side.device == SECOND
        assert {b.device for b in stream.decoder.cache.frames.values()} == {SECOND}  # its buffers never move
        assert stream.pending[0].device == torch.device("cpu")  # x0 stays with the transformer
        points = [p.copy for p in stream.ring.points if p.copy is not None]
        assert points and all(b.device == torch.device("cpu") for c in points for b in c.vae.frames.values())
        assert seen and set(seen) == {SECOND}  # handed over before the decode (the decoder would move them itself)
    assert [(c.index, c.start_frame, c.prompt, c.request) for c in got] == \
           [(c.index, c.start_frame, c.prompt, c.request) for c in want]
    assert [c.start_frame for c in got] == [0, 9, 17, 21, 29, 25, 33, 41, 45]  # the switch and the rewind cut chunks
    for a, b in zip(got, want):
        assert np.array_equal(a.frames, b.frames)
    stream.close()


def test_the_second_cpu_fails_where_two_gpus_would():
    """The emulation catches what the test above relies on: latents left on the transformer's device."""
    vae = tiny_pipeline().vae
    with SecondCPU():
        SecondCPU.place(vae)
        z = torch.randn(1, vae.cfg.z_dim, 1, 4, 4)
        with pytest.raises(RuntimeError, match="same device"):
            vae.post_quant_conv(z)
        assert vae.post_quant_conv(z.to(SECOND)).device == SECOND
        with pytest.raises(TypeError):
            z.to(SECOND).numpy()


def test_one_device_takes_no_copy():
    z = torch.randn(1, 16, 2, 4, 4)
    assert SideStream(torch.device("cpu")).take(z) is z
    with SecondCPU():
        moved = SideStream(SECOND, torch.device("cpu")).take(z)
        assert moved is not z and moved.device == SECOND and torch.equal(moved.cpu(), z)


def gpu_pipeline(vae_device: str):
    pipe = tiny_pipeline()
    pipe.model.to("cuda:0", torch.bfloat16)
    pipe.text.model.to("cuda:0", torch.bfloat16)
    pipe.vae.to(vae_device, torch.bfloat16)
    pipe.device = torch.device("cuda", 0)  # read from the weights when they were on the CPU
    return pipe


@needs_gpus(2)
def test_split_over_two_gpus_matches_one_gpu():
    """The fast engine with the decoder on cuda:1: the latents cross over to its own CUDA stream there."""
    torch._dynamo.reset()
    _, want = switch_schedule(gpu_pipeline("cuda:0"), True)
    two = gpu_pipeline("cuda:1")
    assert two.vae_device == torch.device("cuda", 1)
    stream, got = switch_schedule(two, True)
    assert stream.step.side.stream.device == torch.device("cuda", 1)
    assert {b.device for b in stream.decoder.cache.frames.values()} == {torch.device("cuda", 1)}
    assert [(c.index, c.start_frame, c.prompt) for c in got] == [(c.index, c.start_frame, c.prompt) for c in want]
    for a, b in zip(got, want):
        assert a.frames.shape == b.frames.shape
        assert rel_err(torch.from_numpy(a.frames).float(), torch.from_numpy(b.frames).float()) < 2e-2
    stream.close()
