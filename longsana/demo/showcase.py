"""A PNG strip of the built-in demo's output, for the README: one row of frames per prompt, one row switching
prompt mid-stream. `python -m longsana.demo.showcase docs/demo-strip.png` (CPU, a few seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np

from ..stream import Pipeline
from .train import generate

# (prompt, prompt switched to after the first `SWITCH_AFTER` chunks or None)
ROWS = (("a red circle moving left on a blue background", None),
        ("two yellow squares bouncing", None),
        ("three white stars spinning on a striped purple background", "three green stars spinning on a striped "
                                                                     "purple background"))
CHUNKS, SWITCH_AFTER, COLUMNS, SCALE, GAP = 4, 2, 8, 2, 4


def strip(pipe: Pipeline, rows=ROWS, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): per row, COLUMNS frames evenly spaced over the first CHUNKS chunks, scaled SCALE x."""
    out = []
    for prompt, switch_to in rows:
        frames = np.concatenate(generate(pipe, prompt, CHUNKS, seed=seed, switch_to=switch_to,
                                         switch_after=SWITCH_AFTER))
        picks = np.linspace(0, len(frames) - 1, COLUMNS).round().astype(int)
        tiles = [frames[i].repeat(SCALE, 0).repeat(SCALE, 1) for i in picks]
        row = np.full((tiles[0].shape[0], COLUMNS * (tiles[0].shape[1] + GAP) - GAP, 3), 255, np.uint8)
        for j, tile in enumerate(tiles):
            row[:, j * (tile.shape[1] + GAP):j * (tile.shape[1] + GAP) + tile.shape[1]] = tile
        out += [row, np.full((GAP, row.shape[1], 3), 255, np.uint8)]
    return np.concatenate(out[:-1])


def write_png(img: np.ndarray, path: str | Path) -> None:
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = img.shape[1], img.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")) + codec.encode(None)
    Path(path).write_bytes(b"".join(bytes(p) for p in packets))


if __name__ == "__main__":
    write_png(strip(Pipeline.from_pretrained("demo", device="cpu")), sys.argv[1] if len(sys.argv) > 1 else
              "demo-strip.png")
