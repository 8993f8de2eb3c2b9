"""A scene cut through the demo's VAE: `python -m longsana.benchmarks.cuts` (the built-in demo model, any device).

After a prompt switch the demo's stream fades from the old scene to the new over about a chunk (benchmarks/switch.py:
the colours of some of the page's examples hold 10-13 frames after the first new frame). This measures how much of
that fade the VAE makes on its own. Per ordered pair of the page's examples, a clip is rendered with a hard cut at
a latent boundary (the old scene's objects going on where they were, as the demo's training clips do), and the
frames from the cut until the new prompt's colours hold (`clips.colours_hold_from`) are counted in:
  - the rendered clip (0 when the measure reads the cut right);
  - its VAE round trip (the whole clip encoded, then decoded): what the transformer, trained on such latents, is
    taught to make at a cut;
  - the decode of clean latents spliced at the cut (the old scene's clip before it, a clip of the new scene alone
    after it), the decoder's causal cache carried across the cut as a stream carries it: the decoder's own share.

Prints one line per pair, the medians, and one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from longsana.demo.clips import colours_hold_from, parse_caption, render, render_timeline, to_frames, to_video
from longsana.demo.train import LAYOUT_SEED, encoder_mean
from longsana.stream import Pipeline, video_frame
from longsana.streaming.guide import DEMO_EXAMPLES

CUT, LATENTS = 6, 10  # the cut after 6 latent frames of a 10-latent-frame clip
AFTER = video_frame(LATENTS) - video_frame(CUT)  # video frames from the cut on (16): a cut that never holds counts so
WAYS = ("rendered", "round_trip", "spliced")


@torch.no_grad()
def cut_frames(vae, old: str, new: str, size: int) -> dict[str, int | None]:
    """Frames from the cut until `new`'s colours hold, each way (None: not within the clip), size x size clips."""
    a, b = parse_caption(old)[0], parse_caption(new)[0]
    cut, T = video_frame(CUT), video_frame(LATENTS)
    clip = render_timeline([(0, a), (cut, b)], T, size, size, seed=LAYOUT_SEED)

    def encode(frames):
        return encoder_mean(vae, to_video(frames)[None].to(vae.device, vae.dtype))

    def decode(z):
        return to_frames(vae.decode(z)[0])

    spliced = torch.cat([encode(render(a, T, size, size, seed=LAYOUT_SEED))[:, :, :CUT],
                         encode(render(b, T, size, size, seed=LAYOUT_SEED))[:, :, CUT:]], dim=2)
    frames = dict(rendered=clip, round_trip=decode(encode(clip)), spliced=decode(spliced))
    return {way: colours_hold_from(frames[way][cut:], b) for way in WAYS}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=None, help="only the first N ordered pairs of the page's examples")
    a = p.parse_args(argv)
    pipe = Pipeline.from_pretrained("demo")
    size = pipe.spec.height  # the demo's clips are square
    pairs = list(itertools.permutations(DEMO_EXAMPLES, 2))[:a.pairs]
    print(f"# a scene cut through the demo's VAE: {len(pairs)} pairs of the page's examples, {size}x{size}, the cut "
          f"after {CUT} of {LATENTS} latent frames; frames from the cut until the new colours hold (-: not in "
          f"{AFTER} frames)")
    rows = []
    for old, new in pairs:
        rows.append(cut_frames(pipe.vae, old, new, size))
        print(f"{old[:30]:30s} -> {new[:30]:30s} " + "  ".join(
            f"{way} {'-' if rows[-1][way] is None else rows[-1][way]:>2}" for way in WAYS))
    res = {"bench": "cuts", "pairs": len(rows), **{way: [r[way] for r in rows] for way in WAYS}}
    for way in WAYS:
        held = [AFTER if n is None else n for n in res[way]]
        res[f"{way}_median"] = statistics.median(held)
        res[f"{way}_within_4"] = sum(n <= 4 for n in held)
    print("medians: " + ", ".join(f"{way} {res[f'{way}_median']} frames ({res[f'{way}_within_4']}/{len(rows)} "
                                  "within 4)" for way in WAYS))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
