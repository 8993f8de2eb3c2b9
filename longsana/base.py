"""The bidirectional base model (SANA-Video 2B): a 5-second clip from a prompt (text-to-video) or from a prompt and a
first frame (image-to-video), 50 steps with classifier-free guidance.

    pipe = BasePipeline.from_pretrained("SANA-Video_2B_480p_diffusers")        # a diffusers-layout model folder
    g = torch.Generator("cuda").manual_seed(42)
    frames = pipe(prompt="a red fox running through snow", generator=g)          # uint8 (81, 480, 832, 3)
    frames = pipe(prompt="the fox turns its head", image="fox.png", generator=g)  # image-to-video

The call takes diffusers' SanaVideoPipeline / SanaImageToVideoPipeline arguments (prompt, negative_prompt, image,
height, width, frames, guidance_scale, num_inference_steps, generator, latents, prompt_embeds, ...), so moving over
is one line: `pipe(...).frames[0]` there is `pipe(...)` here. One clip per call.

The recipe and how it matches diffusers 0.42.1 (the test reference; `sampling.py` has the details):
  - T2V: multistep DPM-Solver++ (order 2, flow prediction, flow shift 8, lower-order final, final sigma 0) over
    the batch [negative; positive] with guidance g: v = v_neg + g (v_pos - v_neg). g = 1 runs the positive prompt
    alone, as diffusers does for g <= 1.
  - I2V: the official image-to-video sampler is flow-Euler (shift 8): diffusers' converter insists on it for i2v
    and the original script samples i2v with a flow-Euler solver. The image is stretched to the generation size,
    VAE-encoded (posterior mean) and normalized into latent frame 0; frame 0's tokens get t = 0 and only frames
    1.. are stepped.
  - Resolution binning: a model trained on the 480p table generates at the entry nearest the requested aspect
    ratio, and the decoded video is resized and center-cropped back (`resolution.py`). Models whose default size
    is not in the table (the small test configs) generate at the requested size, a multiple of 32.
  - Initial noise: randn of the latent shape, fp32, drawn on the generator's device, as diffusers' randn_tensor.

On purpose different from diffusers (each reproducible through an argument):
  - the default negative prompt is the original scripts' NEGATIVE_PROMPT (diffusers: ""), and the prompt recipe is
    the original's (`text.py`; diffusers': PromptRecipe(CHI_DIFFUSERS_VIDEO, lowercase=True), motion_score=None);
  - the network runs the original numerical conventions (TransformerConfig; diffusers': DIFFUSERS_CONVENTIONS);
  - an image of another size is resized with ffmpeg's Lanczos (diffusers: PIL's Lanczos for PIL images, within one
    level of 255; nearest for arrays and tensors); one already at the generation size is used as it is;
  - frames must be 1 + 4k (diffusers rounds other counts down without a word).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch

from .config import DEFAULT_SECONDS, ModelSpec
from .model import LongSANATransformer, TextKV
from .resolution import ASPECT_RATIO_480_BIN, classify_height_width_bin, resize_and_crop
from .sampling import (VelocityFn, cfg_velocity, dpm_solver_schedule, flow_euler_schedule, sample_dpm_solver,
                       sample_flow_euler)
from .stream import check_size, resolve_model
from .text import NEGATIVE_PROMPT, TextEncoder
from .vae import StreamingDecoder, WanVAE, to_uint8

BASE_MODEL = "sana-video-2b-480p"
FLOW_SHIFT = 8.0
MAX_STEPS = 1000  # the training timesteps: a finer schedule repeats timesteps
DEFAULT_FRAMES = 1 + DEFAULT_SECONDS * ModelSpec.fps  # 81, which is 1 + 4k


class BasePipeline:
    """Transformer + VAE + text encoder of the base model, loaded once, generating any number of clips."""

    def __init__(self, model: LongSANATransformer, vae: WanVAE, text: TextEncoder | None, spec: ModelSpec,
                 aspect_ratios: dict[str, tuple[int, int]] | None = None):
        """`text` may be None when every call passes precomputed embeddings. `aspect_ratios`: the binning table
        (default: the 480p table for a model whose default size is one of its entries, else no binning)."""
        if spec.causal:
            raise ValueError("BasePipeline runs the bidirectional base model; this spec is block-causal (use "
                             "stream.Pipeline)")
        self.model, self.vae, self.text, self.spec = model, vae, text, spec
        self.device = next(model.parameters()).device
        self.aspect_ratios = aspect_ratio_table(spec) if aspect_ratios is None else aspect_ratios

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, device=None, dtype=None, spec: str | ModelSpec = BASE_MODEL,
                        vae_dtype: torch.dtype = torch.float32) -> BasePipeline:
        """A diffusers-layout model folder (transformer/, vae/, text_encoder/, tokenizer/). The folder does not
        say which model it holds: `spec` does (default: the base model). The VAE runs in fp32, as the official
        pipeline's does; the transformer and text encoder in `dtype` (bf16 on a GPU, fp32 on the CPU)."""
        from .loading import default_device_dtype, load_transformer
        from .vae import load_vae

        folder, spec = resolve_model(path_or_name, spec)
        if spec.causal:
            raise ValueError(f"the spec of {path_or_name} is block-causal (LongSANA streams: stream.Pipeline); the "
                             f"base pipeline needs a bidirectional spec such as {BASE_MODEL!r}")
        device, dtype = default_device_dtype(device, dtype)
        model = load_transformer(folder, config=spec.transformer, device=device, dtype=dtype)
        vae = load_vae(folder / "vae", device=device, dtype=vae_dtype)
        text = TextEncoder.from_pretrained(folder, device=device, dtype=dtype)
        return cls(model, vae, text, spec)

    # -- sizes ------------------------------------------------------------------------------------------------------
    def generation_size(self, height: int, width: int, use_resolution_binning: bool = True) -> tuple[int, int]:
        """The size the latents are generated at for a requested output size (ValueError if unsupported)."""
        return generation_size(height, width, self.aspect_ratios if use_resolution_binning else None)

    def latent_frames(self, frames: int) -> int:
        ts = self.vae.cfg.temporal_stride
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % ts:
            raise ValueError(f"frames must be 1 + {ts}k (e.g. {DEFAULT_FRAMES}), got {frames!r}")
        n = (frames - 1) // ts + 1
        if n > self.model.cfg.rope_max_len:
            raise ValueError(f"frames={frames} is {n} latent frames, more than the model's "
                             f"{self.model.cfg.rope_max_len} positions")
        return n

    # -- generation -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, prompt: str | None = None, negative_prompt: str | None = None, image=None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, height: int | None = None,
                 width: int | None = None, frames: int = DEFAULT_FRAMES, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 prompt_attention_mask: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None, output_type: str = "np",
                 use_resolution_binning: bool = True, motion_score: int | None = None,
                 callback: Callable[[int, int], None] | None = None):
        """One clip. Returns uint8 frames (frames, height, width, 3) as numpy, or with output_type="latent" the
        final normalized latents (1, C, latent frames, h, w) fp32 at the generation size (diffusers' "latent").

        image: a file path, a PIL image, an array (H, W, 3) (uint8, or float in [0, 1]) or a tensor (3, H, W) /
        (1, 3, H, W) (uint8, or float in [0, 1]); given, the clip starts from it (image-to-video).
        negative_prompt: default NEGATIVE_PROMPT; not allowed together with negative_prompt_embeds.
        prompt_embeds / negative_prompt_embeds (1, L, C) with their (1, L) masks replace the text encoder.
        latents: the initial noise (1, C, latent frames, h, w) instead of drawing it from `generator`.
        motion_score: appended to the prompt as " motion score: N." (default: the spec's, 30 for the base model).
        callback(step, num_steps) is called after each denoising step."""
        steps, g = _check_steps(num_inference_steps), _check_guidance(guidance_scale)
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        height, width = height or self.spec.height, width or self.spec.width
        gen_hw = self.generation_size(height, width, use_resolution_binning)
        n_lat = self.latent_frames(frames)
        if image is not None:
            if n_lat < 2:
                raise ValueError(f"image-to-video needs at least {1 + self.vae.cfg.temporal_stride} frames, got "
                                 f"{frames}")
            image = fit_image(read_image(image), *gen_hw)[:, :, None].to(self.device)  # (1, 3, 1, H, W)
        text = self._text(prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                          negative_prompt_attention_mask, motion_score or self.spec.motion_score, g > 1)
        s = self.vae.cfg.spatial_stride
        shape = (1, self.model.cfg.in_channels, n_lat, gen_hw[0] // s, gen_hw[1] // s)
        x = self._initial_latents(shape, generator, latents)
        if image is None:
            schedule = dpm_solver_schedule(steps, FLOW_SHIFT)
            velocity = _counted(self._velocity(text, g), callback, steps)
            z = sample_dpm_solver(velocity, x, schedule)
        else:
            z0 = self.vae.encode_normalized(image)  # replaces frame 0 of x (drawn all the same, as diffusers does)
            velocity = _counted(self._velocity(text, g, z0), callback, steps)
            z = torch.cat([z0, sample_flow_euler(velocity, x[:, :, 1:], flow_euler_schedule(steps, FLOW_SHIFT))], 2)
        if output_type == "latent":
            return z
        return self.decode(z, height, width)

    def _text(self, prompt, negative_prompt, emb, mask, neg_emb, neg_mask, motion_score, cfg: bool) -> TextKV:
        """The prompt batch the network sees ([negative; positive] with guidance), prepared once for all steps."""
        if (prompt is None) == (emb is None):
            raise ValueError("give exactly one of prompt and prompt_embeds")
        if neg_emb is not None and negative_prompt is not None:
            raise ValueError("give at most one of negative_prompt and negative_prompt_embeds")
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str (one clip per call), got {type(prompt).__name__}")
        if emb is None:
            emb, mask = self._encoder().encode([prompt], motion_score)
        emb, mask = _check_embeds("prompt_embeds", emb, mask, self.model.cfg.caption_channels)
        if not cfg:
            return self.model.prepare_text(emb.to(self.device), mask.to(self.device))
        if neg_emb is None:
            neg = NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
            neg_emb, neg_mask = self._encoder().encode([neg], None, use_chi=False, allow_empty=True)
        neg_emb, neg_mask = _check_embeds("negative_prompt_embeds", neg_emb, neg_mask, emb.shape[-1])
        if neg_emb.shape != emb.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(neg_emb.shape)} and prompt_embeds {tuple(emb.shape)} "
                             "must have the same shape")
        y = torch.cat([neg_emb.to(self.device, emb.dtype), emb.to(self.device)])
        return self.model.prepare_text(y, torch.cat([neg_mask, mask]).to(self.device))

    def _encoder(self) -> TextEncoder:
        if self.text is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds (and negative_prompt_embeds)")
        return self.text

    def _initial_latents(self, shape, generator, latents) -> torch.Tensor:
        if latents is None:
            device = generator.device if generator is not None else self.device
            return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(self.device)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must be {shape} for this size and frame count, got {tuple(latents.shape)}")
        return latents.to(self.device, torch.float32)

    def _velocity(self, text: TextKV, guidance: float, z0: torch.Tensor | None = None) -> VelocityFn:
        """v(x, t) for the sampler. Image-to-video (z0, the image's latent frame): x holds frames 1..; the network
        sees [z0, x] with t = 0 on frame 0's tokens, and frame 0 of its output is dropped."""
        m = self.model
        pt, ph, pw = m.cfg.patch_size
        if z0 is not None and pt != 1:
            raise ValueError(f"image-to-video needs a temporal patch size of 1, got {pt}")

        def net(x, t):  # x: (B, C, F, h, w), the whole clip
            B, _, F, h, w = x.shape
            if z0 is None:
                tt = t.expand(B)
            else:  # per token, tokens ordered (frame, row, col)
                tt = t.expand(B, F, (h // ph) * (w // pw)).clone()
                tt[:, 0] = 0
            return m.run(x, tt, text).float()

        v = cfg_velocity(net, guidance) if guidance > 1 else net
        if z0 is None:
            return v
        return lambda x, t: v(torch.cat([z0.expand(len(x), -1, -1, -1, -1), x], 2), t)[:, :, 1:]

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Normalized latents (1, C, f, h, w) -> uint8 frames (1 + 4(f - 1), height, width, 3), resized and
        center-cropped from the generation size when they differ. Decodes a few latent frames per VAE call."""
        s = self.vae.cfg.spatial_stride
        decoder = StreamingDecoder(self.vae, z.shape[3] * s, z.shape[4] * s)
        if (decoder.height, decoder.width) == (height, width):
            return decoder.decode(z).cpu().numpy()
        video = resize_and_crop(decoder.decode_float(z).float(), height, width)
        return to_uint8(video)[0].cpu().numpy()


def aspect_ratio_table(spec: ModelSpec) -> dict[str, tuple[int, int]] | None:
    """The binning table of a model: the 480p table for one trained on it (its default size is an entry), else
    None (generate at the requested size)."""
    return ASPECT_RATIO_480_BIN if (spec.height, spec.width) in ASPECT_RATIO_480_BIN.values() else None


def generation_size(height: int, width: int, aspect_ratios: dict[str, tuple[int, int]] | None) -> tuple[int, int]:
    """The size to generate at for a requested size: the nearest table entry, or without a table the size
    itself, which must then be a multiple of 32. ValueError for an unsupported size."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if aspect_ratios:
        return classify_height_width_bin(height, width, aspect_ratios)
    check_size(height, width)
    return height, width


# -- images ------------------------------------------------------------------------------------------------------
def read_image(image) -> torch.Tensor:
    """Any accepted image (see BasePipeline.__call__) as float (3, H, W) in [0, 1] on the CPU."""
    if isinstance(image, (str, Path)):
        image = _decode_image_file(Path(image))
    elif hasattr(image, "convert") and hasattr(image, "getbands"):  # a PIL image (duck-typed: PIL is no dependency)
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"an image array must be (H, W, 3), got {image.shape}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a file path, a PIL image, an array or a tensor, got {type(image).__name__}")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise ValueError(f"an image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.cpu().float() / 255
    if not image.is_floating_point():
        raise ValueError(f"an image must be uint8 or float in [0, 1], got {image.dtype}")
    lo, hi = image.min().item(), image.max().item()
    if not (0 <= lo and hi <= 1):
        raise ValueError(f"a float image must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    return image.cpu().float()


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (1, 3, height, width) in [-1, 1]. Another size is stretched to this one (no crop,
    as diffusers) with ffmpeg's Lanczos filter on the 8-bit image."""
    if tuple(image.shape[1:]) != (height, width):
        u8 = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        frame = av.VideoFrame.from_ndarray(u8, format="rgb24")
        frame = frame.reformat(width=width, height=height, format="rgb24", interpolation="LANCZOS")
        image = torch.from_numpy(frame.to_ndarray()).permute(2, 0, 1).float() / 255
    return (2 * image - 1)[None]


def _decode_image_file(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a still-image file (PNG, JPEG, WebP, BMP, ...: whatever ffmpeg reads)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path}: no such file")
    try:
        with av.open(str(path)) as f:
            fmt = f.format.name  # still images open as "image2" (by extension) or "<codec>_pipe" (by content)
            if not (fmt == "image2" or fmt.endswith("_pipe")) or not f.streams.video:
                raise ValueError(f"image {path}: not a still image (ffmpeg reads it as {fmt!r})")
            frame = next(f.decode(video=0), None)
    except av.FFmpegError as e:
        raise ValueError(f"image {path}: not a readable image ({e})") from e
    if frame is None:
        raise ValueError(f"image {path}: holds no picture")
    return frame.to_ndarray(format="rgb24")


# -- checks ------------------------------------------------------------------------------------------------------
def _check_steps(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be an int in [1, {MAX_STEPS}], got {n!r}")
    return int(n)


def _check_guidance(g) -> float:
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 1:
        raise ValueError(f"guidance_scale must be a finite number >= 1 (1 = no guidance), got {g!r}")
    return float(g)


def _check_embeds(name: str, emb, mask, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        raise ValueError(f"{name} needs its attention mask ({name.replace('embeds', 'attention_mask')})")
    if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[2] != channels:
        raise ValueError(f"{name} must be (1, L, {channels}), got {tuple(emb.shape)}")
    if tuple(mask.shape) != tuple(emb.shape[:2]):
        raise ValueError(f"the mask of {name} must be {tuple(emb.shape[:2])}, got {tuple(mask.shape)}")
    return emb, mask


def _counted(velocity: VelocityFn, callback: Callable[[int, int], None] | None, steps: int) -> VelocityFn:
    """velocity, calling callback(step, steps) after each call (every sampler step calls it once)."""
    if callback is None:
        return velocity
    counter = itertools.count(1)

    def v(x, t):
        out = velocity(x, t)
        callback(next(counter), steps)
        return out
    return v
