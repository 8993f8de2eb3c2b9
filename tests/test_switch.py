"""Switches and rewinds that land inside a chunk (stream.py): exact against a by-hand block-causal reference with the
chunk split there, the same video whether the switch was known before or after the chunk was made, no gap and no
repeat for a consumer, frames before the switch never changed; transitions; the ring's reach in seconds."""

from __future__ import annotations

import itertools
import statistics
import threading
import time

import numpy as np
import pytest
import torch

from longsana.model import TextKV
from longsana.rewind import points_for
from longsana.sampling import sample_chunk
from longsana.stream import LEAD_MARGIN, Cue, blend_text, latent_at_or_after, latent_at_or_before, ramp, video_frame
from longsana.testing import tiny_pipeline
from longsana.vae import StreamingDecoder

P, Q, R = "a red circle moving left", "two yellow squares bouncing", "one blue star spinning"
SEED = 3


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@torch.no_grad()
def reference(pipe, plan, seed=SEED, vae_frames_per_call=1, forget=False):
    """The block-causal stream by hand. plan: [(n, prompt, keep)], one entry per chunk: chunk i is denoised with n
    latent frames at the latent frame where the previous one's kept part ends, with noise seeded (seed, i), after
    the previous chunk's clean-context pass with this chunk's prompt; only its first `keep` latent frames are kept (a
    split: they are the pending chunk and the only ones the VAE decodes). forget: where the prompt changes, the
    attention state (S, z) is zeroed before that clean-context pass. Returns the video."""
    m = pipe.model
    text = {p: pipe.prompts.get(p, pipe.spec.motion_score).ctx for p in (P, Q, R)}
    h = w = 32 // 8
    state = m.new_state(1, h, w)
    decoder = StreamingDecoder(pipe.vae, 32, 32, max_latent_frames_per_call=vae_frames_per_call)
    frame0, pending, video = 0, None, []
    for i, (n, prompt, keep) in enumerate(plan):
        if forget and i and prompt != plan[i - 1][1]:
            state.S.zero_()
            state.z.zero_()
        if pending is not None:
            m.forward_chunk(pending[0], torch.zeros(1), text[prompt], state, pending[1], update_state=True)
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)

        def noise(g=g, n=n):
            return torch.randn((1, 16, n, h, w), generator=g)

        def velocity(x, t, kv=text[prompt], frame0=frame0):
            return m.forward_chunk(x, torch.full((1,), t), kv, state, frame0)

        x0 = sample_chunk(velocity, noise, tuple(map(float, pipe.spec.denoise_timesteps)))[:, :, :keep]
        video.append(decoder.decode(x0).numpy())
        pending, frame0 = (x0, frame0), frame0 + keep
    return np.concatenate(video)


def watch(chunks):
    """What a consumer shows: each chunk replaces what it holds from the chunk's start_frame on. Checks that a
    chunk never leaves a gap and that the frames before its start are never touched."""
    video = np.zeros((0, 32, 32, 3), np.uint8)
    for c in chunks:
        assert c.start_frame <= len(video), f"gap before chunk {c.index}"
        video = np.concatenate([video[:c.start_frame], c.frames])
    return video


def run(stream, n, actions):
    """The first n chunks; actions[i](stream, chunks) runs once i chunks were handed out."""
    out, it = [], iter(stream)
    while len(out) < n:
        if len(out) in actions:
            actions.pop(len(out))(stream, out)
        out.append(next(it))
    return out


CF = 2  # the tiny spec's chunk_frames: chunks [0, 3), [3, 5), [5, 7), ...
SWITCHED = [(CF + 1, P, CF + 1), (CF, P, CF), (CF, P, 1), (CF, Q, CF), (CF, Q, CF)]  # Q from latent 6, in [5, 7)


def test_latent_frames_of_video_frames():
    for f in range(40):
        after, before = latent_at_or_after(f), latent_at_or_before(f)
        assert video_frame(after) >= f and (after == 0 or video_frame(after - 1) < f)
        assert video_frame(before) <= f and video_frame(before + 1) > f
    assert latent_at_or_after(-3) == latent_at_or_before(-3) == 0


def test_switch_inside_a_made_chunk_is_the_split_reference(pipe):
    """Chunk 2 (latents [5, 7), video frames 17..24) is made and handed out; a switch on screen at frame 18 lands at
    latent 6 (frame 21): chunk 2 is split there, the next chunk starts at frame 21 with the new prompt."""
    stream = pipe.stream(P, seed=SEED, switch_lead=0)
    ids = []
    got = run(stream, 5, {3: lambda s, out: ids.append(s.set_prompt(Q, at_frame=18))})
    assert [(c.index, c.start_frame, c.prompt, c.request) for c in got] == \
           [(0, 0, P, 0), (1, 9, P, 0), (2, 17, P, 0), (3, 21, Q, ids[0]), (4, 29, Q, ids[0])]
    assert stream.landing(ids[0]) == 21 and stream.landing(ids[0] + 1) is None  # as told to the server's encoder
    want = reference(pipe, SWITCHED)
    video = watch(got)
    assert np.array_equal(video, want)
    base = watch(run(pipe.stream(P, seed=SEED), 3, {}))
    assert np.array_equal(video[:21], base[:21]) and not np.array_equal(video[21:25], base[21:25])


def test_set_prompt_does_not_wait_for_the_device(pipe):
    """set_prompt checks the prompt and returns while the device worker is held (a chunk's work holds it for up to a
    second at full size, which the switch's lead would add); the prompt is encoded once the worker is free, and the
    switch is the split reference's."""
    stream = pipe.stream(P, seed=SEED, switch_lead=0)
    gate, ids = threading.Event(), []

    def switch_while_the_worker_is_held(s, out):
        pipe.prompts.clear()
        held = pipe.worker.submit(gate.wait)
        caller = threading.Thread(target=lambda: ids.append(s.set_prompt(Q, at_frame=18)))
        caller.start()
        caller.join(timeout=10)
        try:
            assert ids and not held.done.is_set() and len(pipe.prompts) == 0  # answered, nothing encoded yet
            with pytest.raises(ValueError, match="too long"):
                s.set_prompt("x" * 100_000)
        finally:
            gate.set()

    got = run(stream, 5, {3: switch_while_the_worker_is_held})
    assert [(c.start_frame, c.prompt, c.request) for c in got[3:]] == [(21, Q, ids[0]), (29, Q, ids[0])]
    assert np.array_equal(watch(got), reference(pipe, SWITCHED))


def test_a_switch_that_forgets_keeps_only_the_recached_frames(pipe):
    """forget_on_switch: the switch above, the state's memory of the frames before the re-cached ones (latents 5 to
    6) dropped where it lands: the by-hand reference doing the same; the frames before it unchanged, those after it
    not those of the switch that remembers."""
    stream = pipe.stream(P, seed=SEED, switch_lead=0, forget_on_switch=True)
    video = watch(run(stream, 5, {3: lambda s, out: s.set_prompt(Q, at_frame=18)}))
    assert np.array_equal(video, reference(pipe, SWITCHED, forget=True))
    kept = reference(pipe, SWITCHED)
    assert np.array_equal(video[:21], kept[:21]) and not np.array_equal(video[21:], kept[21:])


def test_a_short_chunk_starts_a_switch(pipe):
    """switch_chunk_frames=1: the switch above is made as a 1-latent chunk (latent 6, frames 21..24), then chunks of
    the usual length: the by-hand reference with those lengths; a rewind to the switch makes it short again."""
    stream = pipe.stream(P, seed=SEED, switch_lead=0, switch_chunk_frames=1)
    got = run(stream, 6, {3: lambda s, out: s.set_prompt(Q, at_frame=18),
                          5: lambda s, out: s.rewind((out[-1].start_frame - 21) / s.fps, at_frame=out[-1].start_frame)})
    assert [(c.index, c.start_frame, len(c.frames), c.prompt) for c in got] == \
           [(0, 0, 9, P), (1, 9, 8, P), (2, 17, 8, P), (3, 21, 4, Q), (4, 25, 8, Q), (3, 21, 4, Q)]
    plan = [(CF + 1, P, CF + 1), (CF, P, CF), (CF, P, 1), (1, Q, 1), (CF, Q, CF)]
    assert np.array_equal(watch(got[:5]), reference(pipe, plan))
    assert np.array_equal(got[5].frames, got[3].frames)
    assert (len(stream._chunk_seconds), len(stream._switch_seconds)) == (4, 2)  # the lead times switch chunks apart


def test_the_chunks_after_a_short_switch_chunk_double_up_to_the_usual_length(pipe):
    """chunk_frames=4, switch_chunk_frames=1: the switch on screen at frame 18 lands at latent 6 inside chunk 1
    ([5, 9)); then chunks of 1, 2 and 4 latent frames (each made while the shorter ones before it play), then 4: the
    by-hand reference with those lengths. A rewind inside the ramp (to latent 8) goes on with its lengths from there,
    and an endless stream prepares every length of the ramp before its first frame."""
    assert ramp(3, 10) == [3, 6, 10] and ramp(1, 4) == [1, 2, 4] and ramp(4, 4) == ramp(None, 4) == [4]
    stream = pipe.stream(P, seed=SEED, switch_lead=0, chunk_frames=4, switch_chunk_frames=1)
    got = run(stream, 8, {2: lambda s, out: s.set_prompt(Q, at_frame=18),
                          6: lambda s, out: s.rewind((57 - 29) / s.fps, at_frame=57)})
    assert [(c.start_frame, len(c.frames), c.prompt) for c in got] == \
           [(0, 17, P), (17, 16, P), (21, 4, Q), (25, 8, Q), (33, 16, Q), (49, 16, Q), (29, 8, Q), (37, 16, Q)]
    plan = [(5, P, 5), (4, P, 1), (1, Q, 1), (2, Q, 2), (4, Q, 4), (4, Q, 4)]
    assert np.array_equal(watch(got[:6]), reference(pipe, plan))
    plan = [(5, P, 5), (4, P, 1), (1, Q, 1), (2, Q, 1), (2, Q, 2), (4, Q, 4)]  # the rewind cuts [7, 9) at 8
    assert np.array_equal(watch(got), reference(pipe, plan))
    prepared = []
    endless = pipe.stream(P, chunk_frames=4, switch_chunk_frames=1)
    endless.step.prepare = lambda text, n: prepared.append(n)
    next(iter(endless))
    assert sorted(prepared) == [1, 2, 4, 5]
    endless.close()


def test_a_switch_known_ahead_cuts_the_chunk_as_it_is_made(pipe):
    """The same switch asked before chunk 2 is made: chunk 2 is handed out up to the switch only, and the video is
    the same as when the switch came after it (the frames depend on where a switch lands, not on when it came)."""
    stream = pipe.stream(P, seed=SEED, switch_lead=0)
    got = run(stream, 5, {2: lambda s, out: s.set_prompt(Q, at_frame=18)})
    assert [(c.index, c.start_frame, len(c.frames)) for c in got] == \
           [(0, 0, 9), (1, 9, 8), (2, 17, 4), (3, 21, 8), (4, 29, 8)]  # never back: nothing to drop
    assert np.array_equal(watch(got), reference(pipe, SWITCHED))


def test_a_switch_past_the_decoded_pieces_cuts_with_nothing_decoded_twice(pipe):
    """piece_frames=1: chunk 2 (latents 5, 6) is handed out a latent frame at a time; the switch on screen at frame
    18, asked once latent 5 (frames 17..20) is out, lands at latent 6, where the decode stands: chunk 2 ends there,
    every latent frame is decoded once, and the video is the reference's with the chunk split there."""
    stream = pipe.stream(P, seed=SEED, switch_lead=0, piece_frames=1)
    decoded, decode = [], stream.decoder.decode
    stream.decoder.decode = lambda z: decoded.append(z.shape[2]) or decode(z)
    got = run(stream, 11, {6: lambda s, out: s.set_prompt(Q, at_frame=18)})
    assert [(c.index, c.start_frame, len(c.frames)) for c in got] == \
           [(0, 0, 1), (0, 1, 4), (0, 5, 4), (1, 9, 4), (1, 13, 4), (2, 17, 4),
            (3, 21, 4), (3, 25, 4), (4, 29, 4), (4, 33, 4), (5, 37, 4)]
    assert np.array_equal(watch(got), reference(pipe, SWITCHED + [(CF, Q, CF)])[:41])
    assert decoded == [1] * 11  # one latent frame each, none again
    spent = [(c.gen_seconds > 0, c.gen_frames) for c in got]  # a chunk's time and frames on its last piece
    assert spent == [(False, 0), (False, 0), (True, 9), (False, 0), (True, 8), (False, 0),
                     (False, 0), (True, 8), (False, 0), (True, 8), (False, 0)]


def test_pieces_up_to_a_switch_go_out_at_once(pipe):
    """piece_frames=1, chunks of 4: the switch asked once latent 5 (frames 17..20) of chunk 1 ([5, 9)) is out lands
    at latent 8 (a lead of 10 frames from frame 18): latents 6 and 7 go out as one piece, not one by one (each piece
    waits for the screen, which would hold the switch's chunk back by as many pieces), then the switch's chunk from
    latent 8; the video is the reference's with chunk 1 split there."""
    stream = pipe.stream(P, seed=SEED, chunk_frames=4, piece_frames=1, switch_lead=10 / 16)
    got = run(stream, 9, {6: lambda s, out: s.set_prompt(Q, at_frame=18)})
    assert [(c.index, c.start_frame, len(c.frames), c.prompt) for c in got[5:]] == \
           [(1, 17, 4, P), (1, 21, 8, P), (2, 29, 4, Q), (2, 33, 4, Q)]
    assert np.array_equal(watch(got), reference(pipe, [(5, P, 5), (4, P, 3), (4, Q, 4)])[:37])


def test_the_lead_moves_the_switch_later(pipe):
    stream = pipe.stream(P, seed=SEED, switch_lead=0.25)  # 4 frames: from frame 18 to >= 22, latent 7 (frame 25)
    got = run(stream, 5, {3: lambda s, out: s.set_prompt(Q, at_frame=18)})
    assert [(c.start_frame, c.prompt) for c in got[3:]] == [(25, Q), (33, Q)]
    want = reference(pipe, [(3, P, 3), (2, P, 2), (2, P, 2), (2, Q, 2), (2, Q, 2)])
    assert np.array_equal(watch(got), want)
    auto = pipe.stream(P, seed=SEED)  # measured: the work under way, then the median of the last chunks' times
    run(auto, 3, {})
    made = np.median(auto._chunk_seconds) * auto.fps
    assert auto.lead_frames() == int(np.ceil(LEAD_MARGIN * made)) > 0  # idle between chunks: the new one alone
    auto._busy_since = time.perf_counter()  # as if a chunk were under way from now: it comes first
    assert auto.lead_frames() >= int(np.ceil((1 + LEAD_MARGIN) * made)) - 1
    auto._busy_since = None  # the frame named was on screen 1 s before set_prompt was called: 16 frames on
    assert auto.lead_frames(since=time.perf_counter() - 1.0) >= int(np.ceil(LEAD_MARGIN * made)) + auto.fps - 1
    auto.step.work_left = lambda: 1.0  # handed out, with 1 s of the next chunk's work started ahead left
    assert auto.lead_frames() >= int(np.ceil(LEAD_MARGIN * made)) + auto.fps - 1
    auto._busy_since = time.perf_counter()  # asked for, its work started ahead: more left than the chunks waited
    auto.step.work_left = lambda: 100.0
    assert auto.lead_terms()[1] == 100.0


def test_the_lead_counts_the_work_under_way_once(pipe):
    """A switch's chunk asked for while work started ahead runs waits for that work too. The lead adds what is left
    of it apart, so the time kept for a switch (which later leads scale by LEAD_MARGIN) leaves it out."""
    stream = pipe.stream(P, seed=SEED)
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.set_prompt(Q)  # asked for with nothing under way: its whole wait
    t = time.perf_counter()
    assert next(it).prompt == Q
    assert 0 < stream._switch_seconds[-1] <= time.perf_counter() - t
    stream.step.work_left = lambda: 5.0  # 5 s of work started ahead left when the next chunk is asked for
    stream.set_prompt(R)
    assert next(it).prompt == R
    assert stream._switch_seconds[-1] == 0.0  # (its wait, well under 5 s, less the 5 s the lead counts apart)
    stream.close()


def test_once_a_chunks_first_piece_is_out_the_work_under_way_is_the_steps(pipe):
    """Handed out in pieces, a chunk's work is done at its first piece: while its later pieces go out, the work under
    way that the lead adds is what the step started ahead (`work_left`), not what a chunk asked for would have left."""
    stream = pipe.stream(P, seed=SEED, chunk_frames=4, piece_frames=1)
    it = iter(stream)
    while next(it).index < 1:  # chunk 0's pieces, then chunk 1's first
        pass
    assert stream._chunk_seconds  # (a chunk's median making time is known)
    stream.step.work_left = lambda: 5.0
    assert stream.lead_terms()[1] == 5.0
    stream.close()


def test_until_a_switch_is_timed_the_lead_takes_a_chunks_wait_for_its_first_piece(pipe):
    """Before any switch, the lead's time for a switch's first frames is the last chunks' median wait for their
    first piece, not for all their pieces (a switch's frames go out at its first), or the step's measured work for a
    chunk where that is longer (a chunk whose work was started ahead waited for part of it, or none of it)."""
    stream = pipe.stream(P, seed=SEED, chunk_frames=4, piece_frames=1)
    chunks = {}
    for c in itertools.islice(stream, 9):  # chunk 0's 5 pieces (latents [0, 5)), then chunk 1's 4
        chunks[c.index] = c.gen_seconds or chunks.get(c.index, 0.0)  # (a chunk's whole wait is on its last piece)
    assert len(stream._chunk_seconds) == 2 and all(0 < w < chunks[i] for i, w in enumerate(stream._chunk_seconds))
    waited = statistics.median(stream._chunk_seconds)
    stream.step.chunk_work = lambda: waited + 0.5
    assert stream.lead_terms()[2] == waited + 0.5
    stream.step.chunk_work = lambda: waited / 2
    assert stream.lead_terms()[2] == waited
    stream.close()


def test_a_switch_lands_the_lead_after_the_screen_and_not_before_committed_frames(pipe):
    """not_before (the first frame a switch may replace: a server's encoder has taken the frames before it) is a
    floor under the landing, not added to the lead: the new frames are made while those frames play."""
    stream = pipe.stream(P, seed=SEED, switch_lead=0.25)  # 4 frames
    a = stream.set_prompt(Q, at_frame=18, not_before=20)  # 18 + 4 = 22 (not 20 + 4): latent 7, frame 25
    b = stream.set_prompt(R, at_frame=30, not_before=39)  # 30 + 4 = 34 < 39: latent 11, frame 41
    assert (stream.landing(a), stream.landing(b)) == (25, 41)
    assert [video_frame(latent_at_or_after(f)) for f in (22, 39)] == [25, 41]
    stream.close()
    pipe.worker.run(lambda: None)  # after the prompts' encodings, queued by set_prompt


def test_a_rewind_after_a_switch_splits_again_and_is_deterministic(pipe):
    """After the switch (chunk 3 = latents [6, 8), frames 21..28), a rewind of 0.3 s from frame 32 goes to 27.2:
    latent 7 (frame 25), inside chunk 3, whose prompt (Q) goes on. The same schedule gives the same frames."""
    def schedule():
        stream = pipe.stream(P, seed=SEED, switch_lead=0)
        backs = []
        got = run(stream, 7, {3: lambda s, out: s.set_prompt(Q, at_frame=18),
                              5: lambda s, out: backs.append(s.rewind(0.3, at_frame=32))})
        return got, backs

    got, backs = schedule()
    assert backs == [pytest.approx((32 - 25) / 16)]
    assert [(c.index, c.start_frame, c.prompt) for c in got[4:]] == [(4, 29, Q), (4, 25, Q), (5, 33, Q)]
    want = reference(pipe, [(3, P, 3), (2, P, 2), (2, P, 1), (2, Q, 1), (2, Q, 2), (2, Q, 2)])
    assert np.array_equal(watch(got), want)
    again, _ = schedule()
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(got, again))


def test_rewind_to_a_frame_inside_a_chunk(pipe):
    """Chunks [0,3) [3,5) [5,7) [7,9) handed out; a rewind of 0.3 s from frame 28 goes to 23.2: latent 6 (frame 21),
    inside chunk 2 = [5, 7): the state before chunk 2's clean pass, its x0 cut to [5, 6), the VAE re-decoding latent
    5; the next chunk (index 3) starts at latent 6 with the prompt in force there, a full chunk long."""
    stream = pipe.stream(P, seed=SEED)
    backs = []
    got = run(stream, 6, {4: lambda s, out: backs.append(s.rewind(0.3, at_frame=28))})
    assert backs == [pytest.approx((28 - 21) / 16)]
    assert [(c.index, c.start_frame, c.request) for c in got] == \
           [(0, 0, 0), (1, 9, 0), (2, 17, 0), (3, 25, 0), (3, 21, 1), (4, 29, 1)]
    want = reference(pipe, [(3, P, 3), (2, P, 2), (2, P, 1), (2, P, 2), (2, P, 2)])
    assert np.array_equal(watch(got), want)
    assert stream.rewind(100) > 0 and stream.rewind(100, at_frame=0) == 0.0  # nothing before frame 0


def test_a_rewind_then_a_switch_from_the_same_moment(pipe):
    """A rewind queued with a next-boundary switch: the rewind first, then the switch where it landed."""
    stream = pipe.stream(P, seed=SEED)

    def both(s, out):
        s.rewind(0.3, at_frame=28)
        s.set_prompt(Q)

    got = run(stream, 6, {4: both})
    assert [(c.index, c.start_frame, c.prompt, c.prompt_seq) for c in got[4:]] == [(3, 21, Q, 1), (4, 29, Q, 1)]
    want = reference(pipe, [(3, P, 3), (2, P, 2), (2, P, 1), (2, Q, 2), (2, Q, 2)])
    assert np.array_equal(watch(got), want)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_frames", [3, 4, 5, 10])
def test_chunk_sizes_with_a_split(pipe, chunk_frames):
    """Any chunk size, with a switch splitting the second chunk after its first latent frame."""
    n = chunk_frames
    stream = pipe.stream(P, seed=SEED, chunk_frames=n, switch_lead=0)
    at = video_frame(n + 2)  # latent n + 2: chunk 1 = [n + 1, 2n + 1) keeps 1 latent frame
    got = run(stream, 4, {2: lambda s, out: s.set_prompt(Q, at_frame=at)})
    assert got[2].start_frame == at and got[2].prompt == Q
    want = reference(pipe, [(n + 1, P, n + 1), (n, P, 1), (n, Q, n), (n, Q, n)])
    assert np.array_equal(watch(got), want)


def test_ring_reach_is_a_duration(pipe):
    """rewind_seconds from the screen, with the chunks ahead of it: a rewind of that much lands where asked."""
    assert points_for(10, 16, 40) == 8 and points_for(10, 16, 12) == 18 and points_for(0, 16, 40) == 4
    with pytest.raises(ValueError):
        points_for(-1, 16, 40)
    stream = pipe.stream(P, seed=SEED, rewind_seconds=2)  # 32 frames: 4 chunks of 8, +4 points
    assert stream.ring.capacity == 8
    got = run(stream, 12, {})
    screen = got[-3].start_frame + 3  # the screen two chunks behind what was made
    assert stream.rewind(2, at_frame=screen) == pytest.approx((screen - video_frame(latent_at_or_before(
        screen - 32))) / 16)
    assert screen - 32 - video_frame(latent_at_or_before(screen - 32)) < 4  # within a latent frame of 2 s


def test_transition_mixes_the_prompts_per_chunk(pipe):
    a, b = (pipe.prompts.get(p, pipe.spec.motion_score).ctx for p in (P, Q))
    for w, want in ((0.0, a), (1.0, b)):
        got = blend_text(a, b, w)
        for (k, v), (k_want, v_want) in zip(got.kv, want.kv):
            valid = want.bias[0, 0, 0] == 0
            assert torch.equal(k[:, :, valid], k_want[:, :, valid]) and torch.equal(v[:, :, valid], v_want[:, :, valid])
        assert torch.equal(got.bias, want.bias)
    half = blend_text(a, b, 0.5)
    both = (a.bias == 0) & (b.bias == 0)
    assert torch.allclose(half.kv[0][0][:, :, both[0, 0, 0]], (a.kv[0][0] + b.kv[0][0])[:, :, both[0, 0, 0]] / 2)
    only_b = (a.bias < 0) & (b.bias == 0)
    if only_b.any():
        assert torch.allclose(half.bias[only_b], torch.tensor(np.log(0.5)))
    plain = TextKV(a.kv, None)
    assert blend_text(plain, TextKV(b.kv, None), 0.25).bias is None

    cue = Cue(Q, 1, P, start=21, frames=16)  # frames 21..36
    assert cue.weight(21, 29) == pytest.approx(4.5 / 16) and cue.weight(37, 45) == 1 and cue.weight(0, 1) == 0
    assert Cue(P).weight(0, 9) == 1

    def schedule(frames):
        stream = pipe.stream(P, seed=SEED, switch_lead=0)
        return run(stream, 6, {3: lambda s, out: s.set_prompt(Q, at_frame=18, transition_frames=frames)})

    smooth, sharp = schedule(16), schedule(0)
    assert np.array_equal(watch(smooth)[:21], watch(sharp)[:21])
    assert not np.array_equal(smooth[3].frames, sharp[3].frames)  # mixed conditioning in the first chunks
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(smooth, schedule(16)))  # deterministic
    with pytest.raises(ValueError):
        pipe.stream(P).set_prompt(Q, transition_frames=-1)
