"""The procedural clips of the built-in demo: grammar round trip, forgiving prompts, deterministic and chunkable
rendering, prompt switches, and a measurement that reads the captions back from clean and degraded video."""

import dataclasses
import time

import numpy as np
import pytest
import torch

from longsana.demo.clips import (COLORS, MIN_CONTRAST, MOTIONS, PALETTE, PANS, PATTERNS, SHADE_RGB, SHAPES, ClipDataset,
                                 Scene, caption, contrast, matches, measure, parse_caption, render, render_timeline,
                                 sample_scene, to_frames, to_video)

ATTRIBUTES = ("color", "background", "count", "motion", "pan")


def degrade(frames: np.ndarray, rng: np.random.Generator, sigma: float = 1.0, noise: float = 6.0) -> np.ndarray:
    """What a generated video looks like at best: Gaussian blur and noise."""
    k = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    k /= k.sum()
    x = frames.astype(np.float32)
    for ax in (1, 2):
        x = sum(w * np.roll(x, s, axis=ax) for s, w in zip(range(-2, 3), k))
    return np.clip(np.round(x + rng.normal(0, noise, x.shape)), 0, 255).astype(np.uint8)


def test_palette_names_itself_and_its_stripe_shade():
    for i, name in enumerate(COLORS):
        for mix in (0.0, 0.5, 1.0):  # plain bands go to 0.5, stripes to 1
            rgb = np.round(((1 - mix) * np.array(PALETTE[name]) / 255 + mix * SHADE_RGB[i]) * 255)
            frames = np.broadcast_to(rgb.astype(np.uint8), (2, 8, 8, 3)).copy()
            assert measure(frames).bg_color == [name, name], (name, mix)


def test_scene_rejects_unknown_values():
    with pytest.raises(ValueError, match="color='mauve'"):
        Scene(color="mauve")
    with pytest.raises(ValueError, match="count=4"):
        Scene(count=4)


def test_caption_round_trip():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(1500)]
    for s in scenes:
        assert parse_caption(caption(s)) == (s, []), caption(s)
        assert contrast(s.color, s.background) >= MIN_CONTRAST
        assert not (s.shape == "circle" and s.motion == "spinning")
    for field, values in (("shape", SHAPES), ("color", COLORS), ("count", (1, 2, 3)), ("motion", MOTIONS),
                          ("background", COLORS), ("pan", PANS)):
        assert {getattr(s, field) for s in scenes} == set(values), field
    assert caption(Scene("circle", "red", 1, "left", "blue")) == "a red circle moving left on a blue background"
    assert caption(Scene("star", "orange", 3, "spinning", "white", "striped", "right")) == \
        "three orange stars spinning on a striped white background, the camera pans right"


@pytest.mark.parametrize("prompt, expected, unknown", [
    ("red circle moving left", Scene(color="red", motion="left"), []),
    ("two yellow squares bouncing", Scene("square", "yellow", 2, "bouncing"), []),
    ("A GIANT grey ball wobbling on a violet backdrop!", Scene(color="gray", background="purple"),
     ["giant", "wobbling"]),
    ("black stars", Scene("star", "black", 2, background="white"), []),  # plural: two; background contrasts
    ("on a white background", Scene(color="black", background="white"), []),
    ("3 green triangles rising, the camera is panning to the left",
     Scene("triangle", "green", 3, "up", pan="left"), []),
    ("a blue box over stripes of pink", Scene("square", "blue", background="pink", pattern="striped"), []),
    ("red blue circle", Scene(color="red"), ["blue"]),  # the contradiction is reported, the first word wins
    ("five circles spinning slowly", Scene(count=2, motion="spinning"), ["five", "slowly"]),
    ("", Scene(), []),
])
def test_parse_is_forgiving(prompt, expected, unknown):
    assert parse_caption(prompt) == (expected, unknown)


def test_parse_strict_names_the_unknown_words():
    with pytest.raises(ValueError, match="giant, wobbling"):
        parse_caption("a giant red circle wobbling", strict=True)
    assert parse_caption("a red circle", strict=True)[0] == Scene(color="red")


def test_render_is_deterministic():
    s = Scene("star", "red", 3, "spinning", "blue", "striped", "left")
    a = render(s, 17, 64, 96, seed=5)
    assert a.shape == (17, 64, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(s, 17, 64, 96, seed=5))
    assert not np.array_equal(a, render(s, 17, 64, 96, seed=6))
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 20  # anti-aliased edges, not just two colors


def test_chunked_rendering_equals_whole():
    rng = np.random.default_rng(1)
    for i, motion in enumerate(MOTIONS):
        s = Scene(str(rng.choice(SHAPES[1:])), "white", i % 3 + 1, motion, "blue", PATTERNS[i % 2], PANS[i % 3])
        size = (64, 96) if i % 2 else (48, 48)
        whole = render(s, 57, *size, seed=i)
        chunks = [render(s, n, *size, seed=i, start_frame=a) for a, n in ((0, 1), (1, 16), (17, 16), (33, 24))]
        assert np.array_equal(whole, np.concatenate(chunks)), caption(s)


def test_prompt_switch_keeps_positions_and_changes_color():
    red = parse_caption("a red circle moving left on a blue background")[0]
    yellow = parse_caption("a yellow circle moving left on a blue background")[0]
    frames = render_timeline([(0, red), (40, yellow)], 81, 64, 64, seed=3)
    m = measure(frames)
    whole = (m.count == 1) & (np.bincount(m.blobs.frame[m.blobs.edge], minlength=81) == 0)  # not cut by the edge
    assert whole[:40].sum() >= 30 and whole[40:].sum() >= 15
    assert all(c == ("red" if t < 40 else "yellow") for t, c in enumerate(m.fg_color) if whole[t])
    assert abs(m.cx[40] - m.cx[39]) < 0.03 and abs(m.cy[40] - m.cy[39]) < 0.01  # the circle goes on
    window = render_timeline([(0, red), (40, yellow)], 30, 64, 64, seed=3, start_frame=30)
    assert np.array_equal(window, frames[30:60])
    with pytest.raises(ValueError, match="start at frame 0"):
        render_timeline([(5, red)], 10, 64, 64)
    with pytest.raises(TypeError, match="segment 1"):
        render_timeline([(0, red), (9, "a yellow circle")], 10, 64, 64)


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "blur+noise"])
def test_measurement_reads_captions_back(degraded):
    rng, noise = np.random.default_rng(123), np.random.default_rng(7)
    results = []
    for i in range(50):
        s = sample_scene(rng)
        frames = render(s, 48, 64, 64, seed=i)
        results.append(matches(degrade(frames, noise) if degraded else frames, s))
    accuracy = {k: np.mean([r[k] for r in results]) for k in ATTRIBUTES}
    assert all(a >= 0.95 for a in accuracy.values()), accuracy


def test_measurement_rejects_wrong_captions():
    """The checks can fail: the same clips against a caption with one attribute changed."""
    rng = np.random.default_rng(11)
    wrong = {k: [] for k in ATTRIBUTES}
    for i in range(30):
        s = sample_scene(rng)
        frames = render(s, 48, 64, 64, seed=i)
        other = {"color": next(c for c in COLORS if c not in (s.color, s.background)),
                 "background": next(c for c in COLORS if c not in (s.color, s.background)),
                 "count": s.count % 3 + 1,
                 "motion": {"left": "right", "right": "left", "up": "down", "down": "up", "still": "spinning",
                            "spinning": "still", "bouncing": "still", "pulsing": "still"}[s.motion],
                 "pan": {"none": "left", "left": "right", "right": "none"}[s.pan]}
        for k in ATTRIBUTES:
            if k == "motion" and s.shape == "circle" and other[k] == "spinning":
                continue
            wrong[k].append(not matches(frames, dataclasses.replace(s, **{k: other[k]}))[k])
    rejected = {k: np.mean(v) for k, v in wrong.items()}
    assert all(r >= 0.95 for r in rejected.values()), rejected


def test_measure_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 frames"):
        measure(np.zeros((4, 8, 8, 3), np.float32))


def test_clip_dataset_is_deterministic_per_index():
    ds = ClipDataset(5, num_frames=9, height=32, width=48, seed=3)
    video, text = ds[4]
    assert video.shape == (3, 9, 32, 48) and video.dtype == torch.float32
    assert -1 <= video.min() < video.max() <= 1
    assert parse_caption(text) == (ds.scene(4), [])
    again, text2 = ClipDataset(5, num_frames=9, height=32, width=48, seed=3)[4]
    assert torch.equal(video, again) and text == text2
    assert not torch.equal(video, ds[3][0])
    frames = render(ds.scene(4), 9, 32, 48, seed=(3, 4, 1))
    assert np.array_equal(to_frames(to_video(frames)), frames)
    with pytest.raises(IndexError):
        ds[5]


def test_render_and_measure_speed_smoke():
    """Not a timed assertion: reports the cost of a demo-sized clip (81 frames, 64x64) with `pytest -s`."""
    s = Scene("star", "yellow", 3, "spinning", "purple", "striped", "left")
    t = time.process_time()
    frames = render(s, 81, 64, 64, seed=0)
    t_render = time.process_time() - t
    t = time.process_time()
    result = matches(frames, s)
    t_measure = time.process_time() - t
    print(f"render 81x64x64: {t_render * 1e3:.1f} ms CPU, matches: {t_measure * 1e3:.1f} ms CPU")
    assert all(result[k] for k in ATTRIBUTES), result
