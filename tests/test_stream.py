"""The streaming generator on a tiny random model: chunk timing, prompt switching (re-cache), determinism,
constant memory, rewind, and the `longsana generate` CLI."""

from __future__ import annotations

import os
import threading

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from longsana.cli import CUDA_ALLOC_CONF
from longsana.cli import main as cli
from longsana.generate import read_timeline
from longsana.sampling import sample_chunk
from longsana.stream import Pipeline, latent_frames
from longsana.testing import save_pipeline, tiny_pipeline
from longsana.vae import StreamingDecoder

P, Q = "a red circle moving left", "two yellow squares bouncing"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline()


def take(stream, n):
    out = []
    for chunk in stream:
        out.append(chunk)
        if len(out) == n:
            break
    return out


def take_with_switch(stream, n, switch_after, prompt):
    """The first n chunks, calling set_prompt(prompt) once `switch_after` chunks have been yielded."""
    out = []
    for chunk in stream:
        out.append(chunk)
        if len(out) == switch_after:
            stream.set_prompt(prompt)
        if len(out) == n:
            break
    return out


def count_passes(pipe, monkeypatch):
    calls = []
    orig = pipe.model.forward_chunk

    def counted(*a, **kw):
        calls.append(kw.get("update_state", False))
        return orig(*a, **kw)

    monkeypatch.setattr(pipe.model, "forward_chunk", counted)
    return calls


def test_first_chunk_needs_only_its_denoising_passes(pipe, monkeypatch):
    calls = count_passes(pipe, monkeypatch)
    stream = pipe.stream(P, seed=0)
    first = next(iter(stream))
    assert calls == [False] * 4  # 4 denoising passes; its clean-context pass waits for the next chunk
    n_lat = pipe.spec.chunk_frames + 1
    assert first.frames.shape == (1 + 4 * (n_lat - 1), stream.height, stream.width, 3)
    assert first.frames.dtype == np.uint8 and first.frames.std() > 0
    take(stream, 1)
    assert calls == [False] * 4 + [True] + [False] * 4
    stream.close()


def test_early_first_frame_hands_out_the_same_frames_sooner(pipe):
    """early_first_frame: chunk 0 comes as its first frame alone, then the rest; every frame as without it."""
    want = take(pipe.stream(P, seed=8, early_first_frame=False), 2)
    got = take(pipe.stream(P, seed=8, early_first_frame=True), 3)
    assert [(c.index, c.start_frame, len(c.frames)) for c in got] == \
           [(0, 0, 1), (0, 1, len(want[0].frames) - 1), (1, want[1].start_frame, len(want[1].frames))]
    assert got[0].gen_seconds == 0 < got[1].gen_seconds  # the chunk's time goes with its last piece
    assert np.array_equal(np.concatenate([c.frames for c in got]), np.concatenate([c.frames for c in want]))


def test_same_seed_and_schedule_give_identical_videos(pipe):
    a, b = (take(pipe.stream(P, seed=7), 3) for _ in range(2))
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    c = take(pipe.stream(P, seed=8), 1)
    assert not np.array_equal(a[0].frames, c[0].frames)


def test_prompt_switch_changes_exactly_the_later_chunks(pipe):
    base = take(pipe.stream(P, seed=1), 4)
    got = take_with_switch(pipe.stream(P, seed=1), 4, switch_after=2, prompt=Q)
    for i in (0, 1):
        assert np.array_equal(got[i].frames, base[i].frames) and got[i].prompt == P
    for i in (2, 3):
        assert not np.array_equal(got[i].frames, base[i].frames)
        assert got[i].prompt == Q and got[i].prompt_seq == 1


@torch.no_grad()
def test_recache_matches_a_plain_reference(pipe):
    """Reference: run the chunks by hand; on the switch before chunk 2, restore the state from before chunk 1
    and re-run chunk 1's clean-context pass with the new prompt, then continue with the new prompt."""
    stream = pipe.stream(P, seed=2)
    got = take_with_switch(stream, 3, switch_after=2, prompt=Q)

    m, spec = pipe.model, pipe.spec
    text = {p: pipe.prompts.get(p, spec.motion_score).ctx for p in (P, Q)}
    h, w = 32 // 8, 32 // 8
    state = m.new_state(1, h, w)
    # the stream's pieces: a decode in other pieces is the same video within fp32 rounding, not bitwise
    decoder = StreamingDecoder(pipe.vae, 32, 32, max_latent_frames_per_call=stream.settings.vae_frames_per_call)
    zero = torch.zeros(1)
    frame0, frames, before, pending = 0, [], None, None
    for c, (n, prompt) in enumerate([(spec.chunk_frames + 1, P), (spec.chunk_frames, P), (spec.chunk_frames, Q)]):
        if c == 2:  # the re-cache
            state.copy_(before)
            m.forward_chunk(pending, zero, text[Q], state, frame0 - spec.chunk_frames, update_state=True)
        g = torch.Generator().manual_seed(2 * 1_000_003 + c)
        noise = lambda: torch.randn((1, 16, n, h, w), generator=g)  # noqa: E731
        velocity = lambda x, t: m.forward_chunk(x, torch.full((1,), t), text[prompt], state, frame0)  # noqa: E731
        x0 = sample_chunk(velocity, noise, spec_timesteps(pipe))
        frames.append(decoder.decode(x0).numpy())
        before = state.snapshot()
        m.forward_chunk(x0, zero, text[prompt], state, frame0, update_state=True)  # with the OLD prompt
        frame0, pending = frame0 + n, x0
    for a, b in zip(got, frames):
        assert np.array_equal(a.frames, b)


def spec_timesteps(pipe):
    return tuple(map(float, pipe.spec.denoise_timesteps))


def test_streams_in_threads_share_one_pipeline(pipe):
    """The server runs one producer thread per viewer over one pipeline: streams must not disturb each other
    (a stream's set-up once swapped the shared VAE's weights for meta tensors while another was decoding)."""
    seeds = (10, 11, 12)
    want = {s: take(pipe.stream(P, seed=s), 3) for s in seeds}
    got, errors = {}, []

    def run(s):
        try:
            got[s] = take(pipe.stream(P, seed=s), 3)
        except Exception as e:  # noqa: BLE001  (reported below, with the seed)
            errors.append((s, e))

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s in seeds:
        assert all(np.array_equal(a.frames, b.frames) for a, b in zip(got[s], want[s]))


def test_memory_is_constant(pipe):
    """Fixed from the second chunk on (the first is longer, and so is its pending x0): the rewind points' buffers
    are all allocated at the start, and reused."""
    stream = pipe.stream(P, seed=3, rewind_seconds=0, chunk_frames=1)
    it = iter(stream)
    buffers = lambda: {id(c) for c in [b.copy for b in stream.ring.points] + stream.ring.spare if c}  # noqa: E731
    sizes, ptrs = {}, None
    for i in range(1, 51):
        next(it)
        if i == 2:
            sizes[2], ptrs, copies = stream.memory_bytes(), [a.data_ptr() for a in stream.state.tensors()], buffers()
    sizes[50] = stream.memory_bytes()
    assert sizes[2] == sizes[50] > 0
    assert [a.data_ptr() for a in stream.state.tensors()] == ptrs
    assert buffers() == copies and len(copies) == stream.ring.capacity
    assert len(stream.ring.points) == stream.ring.capacity == 4  # 0 s of reach: the chunks at and ahead of the screen
    stream.close()


def test_a_short_video_allocates_only_the_rewind_points_it_keeps(pipe):
    """A video of given length, shorter than the ring, takes a point's buffers per chunk after the first (the first
    point is the zero state), not the whole ring's up front."""
    stream = pipe.stream(P, seed=3, num_frames=9, chunk_frames=1)
    chunks = list(stream)
    copies = [p.copy for p in stream.ring.points if p.copy is not None] + stream.ring.spare
    assert 1 < len(chunks) < stream.ring.capacity and len(copies) == len(chunks) - 1
    stream.close()


def test_rewind_then_original_prompt_replays_the_original(pipe):
    original = take(pipe.stream(P, seed=4), 5)
    stream = pipe.stream(P, seed=4)
    it = iter(stream)
    for _ in range(4):
        next(it)
    back = stream.rewind(len(original[3].frames) / 16)  # exactly to the start of the last chunk generated
    assert back == pytest.approx(len(original[3].frames) / 16)
    replay = [next(it), next(it)]
    assert replay[0].index == 3 and replay[0].start_frame == original[3].start_frame
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(replay, original[3:5]))

    back = stream.rewind(100)  # further than kept: goes to the oldest rewind point
    assert back > 0
    stream.set_prompt(Q)
    other = next(it)
    assert other.prompt == Q and not np.array_equal(other.frames, original[other.index].frames)
    with pytest.raises(ValueError):
        stream.rewind(-1)


def test_bad_prompts_and_sizes(pipe):
    with pytest.raises(ValueError, match="empty"):
        pipe.stream("   ")
    stream = pipe.stream(P)
    with pytest.raises(ValueError, match="too long"):
        stream.set_prompt("x" * 100_000)
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe.stream(P, height=48)


def test_rebase_keeps_streaming_past_the_rope_table(pipe, monkeypatch):
    """With a short RoPE table the stream re-bases positions and goes on; the frames equal those of a model
    with a long table (re-basing is exact)."""
    import dataclasses

    want = take(pipe.stream(P, seed=5), 6)
    monkeypatch.setattr(pipe.model, "cfg", dataclasses.replace(pipe.model.cfg, rope_max_len=8))
    stream = pipe.stream(P, seed=5)
    got = take(stream, 6)
    assert stream.origin > 0
    for a, b in zip(got, want):
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1


# -- the CLI -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    return save_pipeline(pipe, tmp_path_factory.mktemp("model"))


def read_video(path):
    with av.open(str(path)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    return np.stack(frames)


def test_generate_writes_an_mp4(model_dir, tmp_path):
    out = tmp_path / "a.mp4"
    r = CliRunner().invoke(cli, ["generate", "-m", str(model_dir), "--spec", "tiny", "-p", P, "--seconds", "2",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    video = read_video(out)
    n_lat = latent_frames(32)
    assert video.shape == (4 * n_lat - 3, 32, 32, 3)


def test_generate_timeline_and_batch(model_dir, tmp_path):
    tl = tmp_path / "tl.txt"
    tl.write_text(f"0 {P}\n# a comment\n\n1.0 {Q}\n1.3 ~0.5 {P}\n")  # the last with a transition
    assert read_timeline(tl) == [(0.0, P), (1.0, Q), (1.3, P, 0.5)]
    out = tmp_path / "tl.mp4"
    r = CliRunner().invoke(cli, ["generate", "-m", str(model_dir), "--spec", "tiny", "--timeline", str(tl),
                                 "--seconds", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert len(read_video(out)) == 4 * latent_frames(32) - 3

    batch = tmp_path / "batch.txt"
    batch.write_text(f"{P}\n\n{Q}\n")
    r = CliRunner().invoke(cli, ["generate", "-m", str(model_dir), "--spec", "tiny", "--txt-file", str(batch),
                                 "--seconds", "0.5", "--out-dir", str(tmp_path / "vids")])
    assert r.exit_code == 0, r.output
    assert "skipped empty line(s) 2" in r.output
    assert len(list((tmp_path / "vids").glob("*.mp4"))) == 2


@pytest.mark.parametrize("args, message", [
    (["-p", ""], "empty prompt"),
    (["-p", "x" * 5000], "too long"),
    (["-p", P, "--height", "50"], "multiples of 32"),
])
def test_generate_bad_input(model_dir, tmp_path, args, message):
    r = CliRunner().invoke(cli, ["generate", "-m", str(model_dir), "--spec", "tiny", *args,
                                 "-o", str(tmp_path / "x.mp4")])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_generate_bad_model_and_timeline(tmp_path):
    r = CliRunner().invoke(cli, ["generate", "-m", str(tmp_path / "nope"), "-p", P])
    assert r.exit_code != 0 and "nope" in r.output and "Traceback" not in r.output
    tl = tmp_path / "tl.txt"
    tl.write_text(f"0 {P}\nsoon {Q}\n")
    r = CliRunner().invoke(cli, ["generate", "--timeline", str(tl)])
    assert r.exit_code != 0 and "tl.txt:2" in r.output


def test_cli_sets_the_cuda_allocator_unless_the_user_did(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # so that teardown restores the variable as it was
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert CliRunner().invoke(cli, ["generate", "--help"]).exit_code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert CliRunner().invoke(cli, ["generate", "--help"]).exit_code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
