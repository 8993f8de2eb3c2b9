"""`longsana generate`: videos to MP4 files from the command line.

    longsana generate --prompt "a red circle moving left" --seconds 10 -o out.mp4
    longsana generate --timeline story.txt --seconds 60 -o story.mp4      # prompt switches at given seconds
    longsana generate --txt-file prompts.txt --out-dir videos/            # one video per line

A timeline file has one segment per line, "<start second> <prompt>", the first starting at 0; blank lines and
lines starting with # are skipped. Frames are written as they are made, so a killed run leaves a playable file.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from .config import DEFAULT_MODEL

Timeline = list[tuple[float, str]]


def read_timeline(path: Path) -> Timeline:
    """Parse a timeline file; errors name the file and line."""
    segments: Timeline = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\d+(?:\.\d*)?)\s+(\S.*)", line)
        if not m:
            raise click.ClickException(f"{path}:{n}: expected '<start seconds> <prompt>', got {line!r}")
        start = float(m[1])
        if not segments and start != 0:
            raise click.ClickException(f"{path}:{n}: the first segment must start at 0, not {start:g}")
        if segments and start <= segments[-1][0]:
            raise click.ClickException(f"{path}:{n}: start {start:g}s is not after the previous {segments[-1][0]:g}s")
        segments.append((start, m[2]))
    if not segments:
        raise click.ClickException(f"{path}: no segments")
    return segments


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped and reported."""
    lines = Path(path).read_text().splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip()]
    skipped = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if skipped:
        click.echo(f"{path}: skipped empty line(s) {', '.join(map(str, skipped))}", err=True)
    if not prompts:
        raise click.ClickException(f"{path}: no prompts")
    return prompts


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "video"


def stream_to_file(pipe, timeline: Timeline, out: Path, seconds: float, seed: int, height, width, **settings):
    """Run one stream through the timeline and write it to `out`, with a progress bar. Returns frames written."""
    from tqdm import tqdm

    from .video import VideoWriter

    stream = pipe.stream(timeline[0][1], seed=seed, height=height, width=width,
                         num_frames=max(1, round(seconds * 16)), **settings)
    total = (stream.total_latents - 1) * 4 + 1
    upcoming = list(timeline[1:])
    with VideoWriter(out, stream.width, stream.height, stream.fps) as video, \
            tqdm(total=total, unit="frame", desc=out.name, dynamic_ncols=True) as bar:
        for chunk in stream:
            video.write(chunk.frames)
            bar.update(len(chunk.frames))
            next_start = (chunk.start_frame + len(chunk.frames)) / stream.fps
            while upcoming and upcoming[0][0] <= next_start:
                stream.set_prompt(upcoming.pop(0)[1])
    stream.close()
    return video.frames


@click.command("generate")
@click.option("--prompt", "-p", help="The prompt.")
@click.option("--timeline", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt timeline file: '<start second> <prompt>' per line.")
@click.option("--txt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Batch mode: one prompt per line, one video each (into --out-dir).")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="A built-in model name or a diffusers-layout model folder.")
@click.option("--spec", default=None, help="Named config of a model folder (e.g. longsana-2b-480p).")
@click.option("--seconds", "-s", default=5.0, show_default=True, type=click.FloatRange(min=0.0625))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--height", type=int, default=None, help="Pixels, a multiple of 32 (default: the model's).")
@click.option("--width", type=int, default=None, help="Pixels, a multiple of 32 (default: the model's).")
@click.option("--chunk-frames", type=click.IntRange(min=1), default=None, help="Latent frames per chunk.")
@click.option("--bf16-timesteps", is_flag=True, help="Feed the official sampler's bf16-rounded timesteps.")
@click.option("--device", default=None, help="cuda, cpu, ... (default: cuda if available).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("out.mp4"),
              show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("videos"),
              show_default=True, help="Where --txt-file videos go.")
def generate_cmd(prompt, timeline, txt_file, model, spec, seconds, seed, height, width, chunk_frames,
                 bf16_timesteps, device, output, out_dir):
    """Generate videos from prompts and write them as H.264 MP4 (16 fps)."""
    from .stream import Pipeline, check_size

    if sum(x is not None for x in (prompt, timeline, txt_file)) != 1:
        raise click.UsageError("give exactly one of --prompt, --timeline, --txt-file")
    if height is not None or width is not None:
        try:
            check_size(height or 32, width or 32)
        except ValueError as e:
            raise click.BadParameter(str(e)) from e
    jobs: list[tuple[Timeline, Path]]
    if txt_file:
        jobs = [([(0.0, p)], out_dir / f"{i:03d}_{slug(p)}.mp4") for i, p in enumerate(read_prompt_file(txt_file))]
    else:
        jobs = [(read_timeline(timeline) if timeline else [(0.0, prompt)], output)]
    try:
        pipe = Pipeline.from_pretrained(model, device=device, spec=spec)
        settings = dict(chunk_frames=chunk_frames, bf16_timesteps=bf16_timesteps or None)
        for tl, out in jobs:
            frames = stream_to_file(pipe, tl, out, seconds, seed, height, width, **settings)
            click.echo(f"wrote {out} ({frames} frames)")
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
