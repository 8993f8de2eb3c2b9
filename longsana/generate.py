"""`longsana generate`: videos to MP4 files from the command line.

    longsana generate --prompt "a red circle moving left" --seconds 10 -o out.mp4
    longsana generate --timeline story.txt --seconds 60 -o story.mp4      # prompt switches at given seconds
    longsana generate --txt-file prompts.txt --out-dir videos/            # one video per line

    longsana generate -m SANA-Video_2B_480p_diffusers --spec sana-video-2b-480p -p "a fox in the snow"
    longsana generate -m SANA-Video_2B_480p_diffusers --spec sana-video-2b-480p --image fox.png -p "it runs"

A timeline file has one segment per line, "<start second> [~<transition seconds>] <prompt>", the first starting at
0; blank lines and lines starting with # are skipped. Each switch lands on the first latent frame at or after its
start second (inside a chunk if need be, not at the next chunk); the optional "~<seconds>" moves the conditioning
from the previous prompt to this one over that long (a transition, e.g. "4 ~1.5 a fox in the snow"). Frames are
written as they are made, so a killed run leaves a playable file.

Which path runs is the model's spec: a block-causal spec (LongSANA, the default) streams chunk by chunk; a
bidirectional one (sana-video-2b-480p) runs the base model, one whole clip per prompt with 50 steps of guided
DPM-Solver++ (`base.py`), text-to-video or, with --image, image-to-video. A model folder cannot say which it holds:
both transformers have the same keys and the same config.json; the base folder's model_index.json names
SanaVideoPipeline, the LongSANA one is made for diffusers' unreleased LongSanaVideoPipeline, and our own
save_pretrained writes SanaVideoPipeline for either. So a folder runs as LongSANA unless --spec names a
bidirectional spec. Clip length: --seconds (rounded up to whole latent frames) or --frames, 1 + 4k; 5 s = 81
frames by default. The base model takes any --height/--width (binned to its 480p table, resized back).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import click

from .config import DEFAULT_MODEL, DEFAULT_SECONDS, check_text

Timeline = list[tuple]  # (start seconds, prompt), or (start seconds, prompt, transition seconds) where one is given


def read_text(path: Path) -> str:
    """A UTF-8 text file; ValueError naming the file, line and byte where it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "save the file as UTF-8") from None


def read_timeline(path: Path) -> Timeline:
    """Parse a timeline file; ValueErrors name the file and line."""
    segments: Timeline = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\d+(?:\.\d*)?)(?:\s+~(\d+(?:\.\d*)?))?\s+(\S.*)", line)
        if not m:
            raise ValueError(f"{path}:{n}: expected '<start seconds> <prompt>', got {line!r} (a transition: "
                             "'<start seconds> ~<seconds> <prompt>')")
        start = float(m[1])
        if not segments and start != 0:
            raise ValueError(f"{path}:{n}: the first segment must start at 0, not {start:g}")
        if segments and start <= segments[-1][0]:
            raise ValueError(f"{path}:{n}: start {start:g}s is not after the previous {segments[-1][0]:g}s")
        segments.append((start, m[3]) if m[2] is None else (start, m[3], float(m[2])))
    if not segments:
        raise ValueError(f"{path}: no segments")
    return segments


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped and reported; ValueError if there is none."""
    lines = read_text(path).splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip()]
    skipped = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if skipped:
        click.echo(f"{path}: skipped empty line(s) {', '.join(map(str, skipped))}", err=True)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "video"


def past_the_end(timeline: Timeline, seconds: float) -> Timeline:
    """The segments that start at or after the end of a video of `seconds`: none of their frames would exist."""
    return [seg for seg in timeline if seg[0] >= seconds]


def stream_to_file(pipe, timeline: Timeline, out: Path, frames: int, seed: int, height, width,
                   **settings) -> tuple[int, Timeline]:
    """Run one stream through the timeline and write it to `out`, with a progress bar. A segment comes into force
    with the first chunk that starts at or after its start. Returns (frames written, the segments that never came
    into force: those starting within the last chunk, and those followed by another before a chunk started)."""
    from tqdm import tqdm

    from .video import VideoWriter

    for start, prompt, *_ in timeline:  # every prompt checked before the file is opened, not once it is half written
        try:
            pipe.prompts.get(prompt, pipe.spec.motion_score)
        except ValueError as e:
            raise ValueError(f"the segment at {start:g} s: {e}") from None
    stream = pipe.stream(timeline[0][1], seed=seed, height=height, width=width, num_frames=frames, switch_lead=0,
                         **settings)
    total = (stream.total_latents - 1) * pipe.vae.cfg.temporal_stride + 1
    requests = {}  # request id -> segment
    for segment in timeline[1:]:  # each lands on its latent frame as the stream gets there
        start, prompt, *transition = segment
        rid = stream.set_prompt(prompt, at_frame=round(start * stream.fps),
                                transition_frames=round(transition[0] * stream.fps) if transition else 0)
        requests[rid] = segment
    shown = set()
    with VideoWriter(out, stream.width, stream.height, stream.fps) as video, \
            tqdm(total=total, unit="frame", desc=out.name, dynamic_ncols=True) as bar:
        for chunk in stream:  # switches known ahead cut chunks as they are made: no chunk ever goes back
            shown.add(chunk.request)
            video.write(chunk.frames)
            bar.update(len(chunk.frames))
    stream.close()
    return video.frames, [seg for rid, seg in requests.items() if rid not in shown]


def clip_to_file(pipe, prompt: str, out: Path, seed: int, **call) -> int:
    """Generate one base-model clip, with a progress bar over its steps, and write it to `out`. Returns frames."""
    import torch
    from tqdm import tqdm

    from .video import VideoWriter

    with tqdm(total=call["num_inference_steps"], unit="step", desc=out.name, leave=False, dynamic_ncols=True) as bar:
        frames = pipe(prompt, generator=torch.Generator(pipe.device).manual_seed(seed),
                      callback=lambda i, n: bar.update(), **call)
    with VideoWriter(out, frames.shape[2], frames.shape[1], pipe.spec.fps) as video:
        video.write(frames)
    return video.frames


def base_clip_settings(spec, image: Path | None, height: int | None, width: int | None) -> dict:
    """Output size of the base path, checked before any model is loaded. Without --height/--width an
    image-to-video clip takes the image's aspect ratio (the nearest table entry of a binned model)."""
    from .base import aspect_ratio_table, generation_size, read_image
    from .resolution import classify_height_width_bin

    table = aspect_ratio_table(spec)
    if image is not None:
        image = read_image(image)  # a bad file fails here, not after loading the model
        if height is None and width is None and table:
            height, width = classify_height_width_bin(*image.shape[1:], table)
    height, width = height or spec.height, width or spec.width
    generation_size(height, width, table)
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs an even height and width, got {height}x{width}")
    return dict(image=image, height=height, width=width)


def _text_option(ctx, param, value):
    """--prompt / --negative-prompt: a ValueError of check_text as click's bad-parameter error."""
    try:
        return value if value is None else check_text(value, param.opts[0])
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("generate")
@click.option("--prompt", "-p", callback=_text_option, help="The prompt.")
@click.option("--timeline", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt timeline file: '<start second> [~<transition seconds>] <prompt>' per line.")
@click.option("--txt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Batch mode: one prompt per line, one video each (into --out-dir).")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="A built-in model name or a diffusers-layout model folder.")
@click.option("--spec", default=None, help="Named config of a model folder (e.g. longsana-2b-480p).")
@click.option("--seconds", "-s", default=None, type=click.FloatRange(min=0.0625),
              help=f"Length (default {DEFAULT_SECONDS}).")
@click.option("--frames", type=click.IntRange(min=1), default=None, help="Length in frames, 1 + 4k (5 s: 81).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Base model: image-to-video, starting from this picture (PNG, JPEG, WebP, ...).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Base model: denoising steps (50).")
@click.option("--guidance", type=click.FloatRange(min=1.0), default=None,
              help="Base model: classifier-free guidance scale, 1 = none (6).")
@click.option("--negative-prompt", default=None, callback=_text_option,
              help="Base model: negative prompt (default: the original's).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--height", type=int, default=None, help="Pixels (default: the model's; streaming: a multiple of 32).")
@click.option("--width", type=int, default=None, help="Pixels (default: the model's; streaming: a multiple of 32).")
@click.option("--chunk-frames", type=click.IntRange(min=1), default=None, help="Latent frames per chunk.")
@click.option("--bf16-timesteps", is_flag=True, help="Feed the official sampler's bf16-rounded timesteps.")
@click.option("--device", default=None, help="cuda, cpu, ... (default: cuda if available).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("out.mp4"),
              show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("videos"),
              show_default=True, help="Where --txt-file videos go.")
def generate_cmd(prompt, timeline, txt_file, model, spec, seconds, frames, image, steps, guidance, negative_prompt,
                 seed, height, width, chunk_frames, bf16_timesteps, device, output, out_dir):
    """Generate videos from prompts and write them as H.264 MP4 (at the model's frame rate).

    Everything given is checked before the model loads; the ValueErrors and OSErrors of the checks are one line of
    error each (the `longsana` group turns them into click's)."""
    from .base import DEFAULT_FRAMES, MAX_STEPS
    from .files import check_output
    from .stream import latent_frames, resolve_model

    if sum(x is not None for x in (prompt, timeline, txt_file)) != 1:
        raise click.UsageError("give exactly one of --prompt, --timeline, --txt-file")
    if seconds is not None and frames is not None:
        raise click.UsageError("give at most one of --seconds and --frames")
    if steps is not None and steps > MAX_STEPS:
        raise click.BadParameter(f"at most {MAX_STEPS}, got {steps}", param_hint="--steps")
    prompts = read_prompt_file(txt_file) if txt_file else [prompt]
    segments = read_timeline(timeline) if timeline else None
    try:
        folder, model_spec = resolve_model(model, spec)
    except KeyError as e:  # get_config's: an unknown spec name
        raise click.BadParameter(e.args[0], param_hint="--spec") from None
    outputs = [out_dir / f"{i:03d}_{slug(p)}.mp4" for i, p in enumerate(prompts)] if txt_file else [output]
    for out in outputs:
        check_output(out)
    ts = model_spec.vae.temporal_stride  # video frames per latent frame after the first
    if frames is not None and (frames - 1) % ts:
        raise click.BadParameter(f"must be 1 + {ts}k (e.g. {DEFAULT_FRAMES}), got {frames}", param_hint="--frames")
    seconds = DEFAULT_SECONDS if seconds is None else seconds
    if not math.isfinite(seconds * model_spec.fps):  # nan and inf pass FloatRange; 1e308 overflows here
        why = "is too long" if math.isfinite(seconds) else "is not a finite number of seconds"
        raise click.BadParameter(f"{seconds:g} {why}", param_hint="--seconds")
    frames = frames or 1 + ts * (latent_frames(round(seconds * model_spec.fps), ts) - 1)
    if model_spec.causal:
        _refuse("base-model", "this model streams (LongSANA); for a base-model folder pass --spec sana-video-2b-480p",
                image=image, steps=steps, guidance=guidance, negative_prompt=negative_prompt)
    else:
        _refuse("streaming", "this model is the base model (one clip per prompt)", timeline=timeline,
                chunk_frames=chunk_frames, bf16_timesteps=bf16_timesteps or None)
    if model_spec.causal:
        from .stream import Pipeline, check_size

        if height is not None or width is not None:
            try:
                check_size(height or 32, width or 32)
            except ValueError as e:
                raise click.BadParameter(str(e)) from e
        if segments and (late := past_the_end(segments, frames / model_spec.fps)):
            # A warning, not a refusal: a shorter video is how one previews the start of a long timeline.
            _warn_unshown(timeline, late, f"they start after the video's end ({frames / model_spec.fps:.2f} s); "
                                          "a longer --seconds would include them")
            segments = segments[:len(segments) - len(late)]
        timelines = [segments] if segments else [[(0.0, p)] for p in prompts]
        pipe = Pipeline.from_pretrained(folder, device=device, spec=model_spec)
        settings = dict(chunk_frames=chunk_frames, bf16_timesteps=bf16_timesteps or None)
        for tl, out in zip(timelines, outputs):
            n, unshown = stream_to_file(pipe, tl, out, frames, seed, height, width, **settings)
            click.echo(f"wrote {out} ({n} frames)")
            if unshown:
                _warn_unshown(timeline, unshown, "a later segment lands on the same latent frame (segments under "
                                                 f"{model_spec.vae.temporal_stride} video frames apart)")
    else:
        from tqdm import tqdm

        from .base import BasePipeline

        call = dict(base_clip_settings(model_spec, image, height, width), frames=frames,
                    num_inference_steps=steps or 50, guidance_scale=guidance or 6.0,
                    negative_prompt=negative_prompt)
        pipe = BasePipeline.from_pretrained(folder, device=device, spec=model_spec)
        jobs = list(zip(prompts, outputs))
        for p, out in tqdm(jobs, unit="clip", desc="clips", disable=len(jobs) == 1, dynamic_ncols=True):
            n = clip_to_file(pipe, p, out, seed, **call)
            tqdm.write(f"wrote {out} ({n} frames)")


def _warn_unshown(path: Path, segments: Timeline, why: str) -> None:
    starts = ", ".join(f"{start:g} s" for start, *_ in segments)
    click.echo(f"warning: {path}: the segment(s) starting at {starts} are not in the video: {why}", err=True)


def _refuse(kind: str, why: str, **options) -> None:
    """UsageError naming the given options (not None) that this path does not take."""
    if given := [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]:
        raise click.UsageError(f"{', '.join(given)}: {kind} option(s), but {why}")
