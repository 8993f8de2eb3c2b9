"""`longsana train-demo`: train the built-in demo model (config "demo") from scratch on procedural clips.

The demo is the LongSANA architecture at toy size (transformer, VAE, text encoder), so that a fresh machine streams a
video that follows its prompt through exactly the code the real model runs. One command trains all of it on one GPU
(`--resume` goes on from a previous run's output, so training can span several time-limited runs) and writes a
diffusers-layout folder with `Pipeline.save_pretrained`, which `Pipeline.from_pretrained("demo")` loads like any
other model folder:

  1. Text: a small Gemma-2 with a word-level tokenizer over the caption grammar (`clips.caption_words`) and the
     CHI text, random init and frozen: the transformer learns to read it. Prompts go through the standard
     recipe (`TextEncoder`: CHI prefix, " motion score: N.", BOS + 299 positions).
  2. VAE (Wan 2.1 causal, `vae.py`): L1 + MSE reconstruction of posterior samples, weighted towards object
     pixels, plus a small KL, on a few latent frames after a random no-gradient prefix that warms the causal
     caches (a stream's steady state). Then the per-channel latent mean and std are folded into quant_conv /
     post_quant_conv, so the config's latents_mean / latents_std are 0 / 1 and the encoder's mean is the
     normalized latent.
  3. Transformer: flow matching, x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0, sigma = t / 1000, in the
     block-causal form: one differentiable pass over a clip cut into streaming chunks (`model(..., chunks=)`),
     chunk c seeing chunks <= c exactly as streaming does. Per sample a chunk j is drawn; the chunks before it
     are clean (t = 0, as the stream's clean-context pass), chunk j gets a level from the training
     distribution and each later chunk a level between its predecessor's and 1000 (earlier chunks cleaner,
     diffusion-forcing style); the loss covers the noised chunks. Some clips switch prompt at a chunk boundary
     (`render_timeline`) and are captioned with the NEW prompt, with no loss before the switch: the model
     learns to follow the text over a context that shows something else, which is what a switch asks. With
     --switch-splice their latents cut at the switch (`train_latents`), so the model learns to cut, not fade.
     The weights shipped are an exponential moving average.

A phase runs its given number of steps; 0 steps means as many as fit its time budget, estimated from the first
steps (the log says how many, so a run can be repeated with fixed steps); 0 steps and 0 seconds skip it.
Seeds fix the data, the initialization and the noise; GPU kernels are not bitwise deterministic.

The shipped model (2026-11-22), each line `longsana train-demo` with the options shown, on one H100 with
`LONGSANA_KERNELS=torch` (the Triton kernels have no backward); "beside": in the same 10-minute call, sharing the
GPU. Scores are tests/test_demo.py's measurements.
  1. --out r1 --workers 15 --vae-seconds 140 --seconds 260        VAE PSNR 14.6 dB; dropped
  2. --out r2 --eval-captions 0                                    VAE 1967 steps, PSNR 21.0 dB; transformer 1661
                                                                   steps, loss 0.143
  3. --out r3 --resume r2 --seed 1 --vae-seconds 65 --vae-lr 3e-4 --seconds 110 --chunks 6 --lr 4e-4 --ema 0.995
     --eval-captions 0                                             570 steps, loss 0.098; object color 0/20: the VAE
                                                                   got 12-19% of colors right on its own
                                                                   reconstructions
  4. --out A --vae-from r3 --vae-seconds 430 --vae-lr 5e-4 --seconds 0 --clips 64 --eval-captions 0 --workers 4
                                                                   VAE reconstructions: color 0.77, background 1.00
     (beside it, new VAEs of base_dim 16 and 12 for 430 s: color 0.48 and 0.42: dropped)
  5. --out V --vae-from A --vae-decoder-only --vae-seconds 470 --vae-lr 3e-4 --seconds 0 --clips 64
     --eval-captions 0 --workers 5                                 decoder only (the latents stay A's): color 0.83
     beside it: --out T --resume r3 --vae-from A --vae-seconds 0 --seconds 500 --chunks 6 --lr 4e-4 --ema 0.998
     --eval-captions 0 --workers 9                                 1645 steps; color 4/20, background 20/20
  6. --out T2 --resume T --vae-seconds 0 --seconds 515 --chunks 6 --lr 4e-4 --ema 0.998 --object-weight 0.5
     --eval-captions 0 --workers 14                                2694 steps; color 18/20, background 18/20,
                                                                   switch 3/8
  7. as 6 with --out T3 --resume T2 --seed 2 --switch-prob 0.5 --lr 3e-4   2730 steps; 18/20, 19/20, switch 4/8
  8. as 7 with --out T4 --resume T3 --seed 3                       2930 steps; 19/20, 20/20, switch 4/8
  9. --out demo --resume T4 --vae-from V --vae-seconds 0 --seconds 0 --device cpu --clips 8 --eval-captions 0
                                                                   T4's transformer with V's VAE (session 2): 19/20,
                                                                   20/20, switch 4/8 two chunks after, 7/8 three after
 10. as 7 with --out T5 --resume T4 --seed 5 --seconds 505 --switch-prob 0.6 --switch-focus 0.5
                                                                   2857 steps; with V's VAE 18/20, 20/20, switch 5/8;
     the failures were purple objects drawn gray, with or without a switch: the VAE's colors
 11. --out V2 --vae-from V --vae-decoder-only --vae-seconds 440 --vae-lr 2e-4 --seconds 0 --clips 64
     --eval-captions 0 --workers 5                                 2319 steps; reconstructions color 0.88 (V: 0.83)
     beside it: as 10 with --out T6 --resume T5 --seed 6 --seconds 440 --lr 2e-4 --workers 9   1381 steps
 12. --out demo --resume T6 --vae-from V2 --vae-seconds 0 --seconds 0 --device cpu --clips 8 --eval-captions 0
                                                                   color 19/20, background 20/20; switch: old color
                                                                   held 7/8, new color two chunks after 6/8, three
                                                                   chunks after 7/8
 13. (2026-12-05, the 2-core CPU, no LONGSANA_KERNELS) --out VC --resume base --vae-decoder-only --vae-seconds 1500
     --vae-cut-prob 0.6 --vae-prefixes 2 --vae-prefixes 6 --vae-batch 8 --vae-clips 2048 --vae-lr 2e-4 --seconds 0
     --clips 8 --device cpu --workers 1 --eval-captions 0, base being 12's folder as base/demo and its transformer
     saved as base/resume.pt                                       897 steps; shipped: 12 with VC's decoder. A cut
                                                                   through the VAE holds its new colours after 4
                                                                   frames (median; 12's: 10), the stream's after a
                                                                   switch within 1 s 13/20 and 12/20 (12's: 8, 9)
 14. (2026-12-06, the 2-core CPU) as 13 with --out VS --vae-seconds 2100 --vae-splice-prob 0.5, base being 13's
     folder                                                        700 steps; a cut between clean latents holds its
                                                                   new colours after 2 frames (median; 13's: 10)
 15. (the same) OMP_NUM_THREADS=2 longsana train-demo --out TS --resume base --vae-from VS --vae-seconds 0
     --seconds 2700 --clips 1024 --batch 16 --switch-prob 0.6 --switch-focus 0.5 --switch-splice --lr 2e-4
     --ema 0.99 --seed 7 --device cpu --workers 2 --eval-captions 0
                                                                   745 steps; shipped: TS/demo (15's transformer,
                                                                   14's VAE). Color 18/20, background 20/20; switch
                                                                   7/8 two and three chunks after; the stream's
                                                                   colours within 1 s of a switch 20, 18, 19 of 20
                                                                   (13's: 12, 11, 10), through the server 5 to 8 of
                                                                   8 in six runs (13's: 3)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from ..config import CAUSAL_TIMESTEPS, get_config
from ..fast_vae import accelerate
from ..loading import load_transformer
from ..model import LongSANATransformer
from ..stream import Pipeline, video_frame
from ..text import CHI_SANA, TextEncoder, build_gemma2, build_word_tokenizer, motion_suffix
from ..vae import CausalCache, WanVAE, load_vae
from .clips import (MIN_CONTRAST, caption, caption_variant, caption_words, contrast, matches, render,
                    render_timeline, sample_scene, to_frames)

LAYOUT_SEED = 0  # render seed of every transformer training clip (render_train_clip)
# The demo's Gemma-2 (its width is the transformer's caption_channels); see demo_text_encoder
TEXT_LAYERS, TEXT_HEADS, TEXT_WINDOW, TEXT_EMBED_STD = 2, 2, 4, 0.15


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    device: str = "cuda"
    workers: int = 10  # processes rendering clips (leave the training process a few cores)
    resume: Path | None = None  # a previous run's output: continue from it (the VAE for vae_seconds, if any)
    vae_from: Path | None = None  # a previous run's output whose VAE to take instead (then trained for vae_seconds)
    # VAE
    vae_clips: int = 4096
    vae_latents: int = 4  # latent frames with gradients per clip
    vae_prefixes: tuple[int, ...] = (0, 4, 8, 16)  # latent frames that first warm the causal caches
    vae_batch: int = 48
    vae_steps: int = 0
    vae_seconds: float = 200.0
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4  # per latent element, against per-pixel L1 + MSE
    vae_eval_clips: int = 48  # clips whose reconstructions are scored after training (vae_accuracy)
    vae_decoder_only: bool = False  # train the decoder alone: the latents, and so the transformer, stay valid
    vae_cut_prob: float = 0.0  # clips that cut to a new scene where gradients reach (render_vae_clip)
    vae_splice_prob: float = 0.0  # batches whose latents cut to other clips' where gradients reach (vae_loss)
    # transformer
    clips: int = 10240
    chunks: int = 8  # streaming chunks per training clip
    switch_prob: float = 0.3  # clips that switch prompt at a chunk boundary
    switch_focus: float = 0.0  # of those, the fraction whose first noised chunk is the one right after the switch
    switch_splice: bool = False  # their latents cut at the switch as a spliced decoder expects (train_latents)
    batch: int = 128
    steps: int = 0
    seconds: float = 300.0
    lr: float = 5e-4
    warmup: int = 200
    ema: float = 0.999
    time_shift: float = 3.0  # training levels: t = 1000 shift(u), u uniform (more weight on high noise)
    object_weight: float = 0.5  # loss weight 1 + object_weight d^2, d: a latent's distance from its frame's median
    # evaluation after training
    eval_captions: int = 24
    eval_timesteps: tuple[tuple[float, ...], ...] = (CAUSAL_TIMESTEPS,
                                                     (1000, 900, 750, 550, 350, 200),
                                                     (1000, 950, 880, 790, 680, 550, 400, 250))


START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


# -- data ----------------------------------------------------------------------------------------------------------

def chunk_sizes(spec, chunks: int) -> list[int]:
    """Latent frames of the first `chunks` streaming chunks: the first has one more (1 + 4k video frames)."""
    return [spec.chunk_frames + 1] + [spec.chunk_frames] * (chunks - 1)


def switch_scene(a, rng: np.random.Generator):
    """Where a prompt switch goes: a new random scene, or (half the time) `a` with a new color and motion."""
    while True:
        b = sample_scene(rng)
        if rng.random() < 0.5:
            b = dataclasses.replace(a, color=b.color, motion=b.motion)
        if b != a and contrast(b.color, b.background) >= MIN_CONTRAST and (b.shape, b.motion) != ("circle", "spinning"):
            return b


def cut_latent(rng: np.random.Generator, prefixes: tuple[int, ...], latents: int) -> int:
    """A latent boundary inside one of vae_loss's stretches with gradients: p + 1 .. p + latents - 1."""
    return int(rng.choice(prefixes)) + int(rng.integers(1, latents))


def render_vae_clip(args) -> np.ndarray:
    """A clip for the VAE, from a random point in time; a fifth of them switch scene somewhere. With probability
    cut_prob instead, the clip cuts to a new scene at a latent boundary inside one of the stretches that get
    gradients (latent p + 1 .. p + latents - 1 for a prefix p; a batch draws its p, so a cut clip is cut inside its
    batch's stretch once in len(prefixes)): a prompt switch as the stream makes it, which the VAE must decode
    as a cut, not a fade (benchmarks/cuts.py)."""
    seed, i, frames, size, cut_prob, prefixes, latents = args
    rng = np.random.default_rng((seed, 1, i))
    a = sample_scene(rng)
    segments = [(0, a)]
    if cut_prob and rng.random() < cut_prob:
        start = int(rng.integers(0, 400))
        segments.append((start + video_frame(cut_latent(rng, prefixes, latents)), switch_scene(a, rng)))
    else:  # (the draws of runs before cut_prob, in their order: their clips stay the same)
        if rng.random() < 0.2:
            segments.append((int(rng.integers(1, 400)), switch_scene(a, rng)))
        start = int(rng.integers(0, 400))
    return render_timeline(segments, frames, size, size, seed=(seed, 2, i), start_frame=start)


def render_train_clip(args) -> tuple[np.ndarray, str, int]:
    """A clip of whole streaming chunks, its caption (a random phrasing) and the chunk where the prompt switches
    (0: no switch; the caption is the new prompt's). Every clip is rendered with the same layout seed, so what a
    caption leaves open (positions, sizes, speeds) is a fixed function of its shape, count and motion: the
    streaming sampler re-noises its estimate of x0 with fresh noise at each step, which, on a model trained by
    plain flow matching rather than distilled, averages random placements away (trained on them, the demo drew
    the backgrounds and no objects). After a prompt switch the clip goes on from where its objects were."""
    seed, i, sizes, size, switch_prob = args
    rng = np.random.default_rng((seed, 3, i))
    T = video_frame(sum(sizes))
    a = sample_scene(rng)
    if rng.random() < switch_prob:
        k = int(rng.integers(1, len(sizes) // 2 + 1))
        b = switch_scene(a, rng)
        frames = render_timeline([(0, a), (video_frame(sum(sizes[:k])), b)], T, size, size, seed=LAYOUT_SEED)
        return frames, caption_variant(b, rng), k
    return render(a, T, size, size, seed=LAYOUT_SEED), caption_variant(a, rng), 0


@torch.no_grad()
def train_latents(vae: WanVAE, frames, switch: torch.Tensor, sizes: list[int], splice: bool, device,
                  batch: int = 32) -> torch.Tensor:
    """bf16 (B, z, F, h, w) encoder means of the training clips. With `splice`, a clip that switches prompt at
    chunk k keeps the latents of its own encoding up to the switch and takes the rest from an encoding of the
    clip whose frames before the switch all show the first new one: the causal encoder then carries nothing of
    the old scene across, and the latents cut at once (what the stream should make at a switch, and what a
    decoder trained with --vae-splice-prob decodes as a cut). Without it, a cut's latents fade over ~10 frames
    (benchmarks/cuts.py), and a transformer trained on them fades too."""
    out = []
    for s in range(0, len(frames), batch):
        x = video_batch(torch.from_numpy(np.stack(frames[s:s + batch])), device)
        z = encoder_mean(vae, x)
        cuts = [(b, sum(sizes[:k])) for b, k in enumerate(switch[s:s + batch].tolist()) if k] if splice else []
        if cuts:
            rows = [b for b, _ in cuts]
            for b, cut in cuts:
                x[b, :, :video_frame(cut)] = x[b, :, video_frame(cut)][:, None]
            z_new = encoder_mean(vae, x[rows])
            for (b, cut), zb in zip(cuts, z_new):
                z[b, :, cut:] = zb[:, cut:]
        out.append(z.to(torch.bfloat16))
    return torch.cat(out)


def video_batch(clips: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1] on `device` (clips.to_video, batched)."""
    return clips.to(device, non_blocking=True).permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1)


# -- text ----------------------------------------------------------------------------------------------------------

def demo_text_encoder(dim: int, motion_score: int, seed: int, device=None) -> TextEncoder:
    """Word-level tokenizer over the CHI text, the caption words and the motion-score suffix; random Gemma-2.

    Made to tell prompts apart while random: at its default init, attention averages over the long CHI prefix
    and every position reads alike (cosine 0.9+ between different words). Larger token embeddings keep each
    position's word, and a 4-token window in the local (sliding) layers adds its neighbours, which is what
    tells "a red circle" from "on a red background" in a word-level prompt."""
    tok = build_word_tokenizer(["\n".join(CHI_SANA), " ".join(caption_words()), motion_suffix(motion_score)])
    gemma = build_gemma2(len(tok), hidden_size=dim, num_layers=TEXT_LAYERS, num_heads=TEXT_HEADS, seed=seed)
    gemma.config.sliding_window = TEXT_WINDOW  # saved with the config; the masks are built from it
    for layer in gemma.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = TEXT_WINDOW
    with torch.no_grad():
        gemma.embed_tokens.weight.normal_(0, TEXT_EMBED_STD, generator=torch.Generator().manual_seed(seed))
    return TextEncoder(tok, gemma.to(device))


@torch.no_grad()
def encode_captions(text: TextEncoder, captions: list[str], motion_score: int, batch: int = 512):
    """(N, L, C) bf16 embeddings and (N, L) masks, cut after the longest prompt: the padding positions are
    masked out of the cross-attention (bias -10000, exp = 0), so dropping them changes nothing."""
    embs, masks = zip(*(text.encode(captions[s:s + batch], motion_score) for s in range(0, len(captions), batch)))
    emb, mask = torch.cat(embs), torch.cat(masks)
    L = int(mask.nonzero()[:, 1].max()) + 1
    return emb[:, :L].to(torch.bfloat16), mask[:, :L]


# -- the loop ------------------------------------------------------------------------------------------------------

def train_loop(name: str, params, loss_fn, steps: int, seconds: float, lr: float, warmup: int, device,
               on_step=None, log_every: int = 100) -> int:
    """AdamW with linear warmup and cosine decay to lr/10. steps = 0: fit `seconds`: the number of steps is
    estimated from steps 10..40, then again every `log_every` steps from the last ones (the first steps can
    be slower, e.g. while clips are still rendering), and the schedule follows the estimate."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    params = [p for g in opt.param_groups for p in g["params"]]
    fit = not steps
    total = steps or None
    cuda = torch.device(device).type == "cuda"
    start = time.perf_counter()
    acc, i, mark, logged = torch.zeros((), device=device), 0, None, 0
    while True:
        due = i in (10, 40) or (i > 40 and i % log_every == 0)
        if fit and due and (mark is None or mark[0] != i):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if mark is not None:
                per_step = (now - mark[1]) / (i - mark[0])
                total = i + int((seconds - (now - start)) / per_step)
                if i == 40:
                    log(f"{name}: {per_step * 1000:.1f} ms/step -> {total} steps")
            mark = (i, now)
        if total is not None and i >= total:
            break
        frac = 0.0 if total is None else max(0.0, (i - warmup) / max(1, total - warmup))
        scale = min(1.0, (i + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        loss = loss_fn(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if on_step is not None:
            on_step(i)
        acc += loss.detach()
        i += 1
        if i % log_every == 0 or i == total:
            log(f"{name} step {i}/{total}: loss {acc.item() / (i - logged):.4f} lr {lr * scale:.2e}")
            acc.zero_()
            logged = i
        if fit and i < 40 and time.perf_counter() - start > seconds:  # never got to the first estimate
            total = i
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    log(f"{name}: {i} steps in {time.perf_counter() - start:.0f}s{mem}")
    return i


# -- VAE -----------------------------------------------------------------------------------------------------------

def vae_loss(vae: WanVAE, x: torch.Tensor, kl_weight: float, prefix: int = 0,
             splice: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """x (B, 3, T, H, W): reconstruct a posterior sample. The first `prefix` latent frames (1 + 4 (prefix - 1)
    video frames) only fill the causal caches, without gradients: the causal convs look back about 20 latent
    frames, so a stream's steady state is only seen after a long start, which this makes cheap.
    splice (partner, cut): from latent frame `cut` of the stretch with gradients on, sample b takes the latents of
    clip partner[b], each encoded in its own clip, and must decode partner[b]'s frames: a hard cut between clean
    latents, which is what a stream's switch hands the decoder (benchmarks/cuts.py's "spliced")."""
    enc, dec = CausalCache(), CausalCache()
    if prefix:
        n = video_frame(prefix)
        with torch.no_grad():
            h = vae.quant_conv(vae.encoder(x[:, :, :n], enc))
            vae.decoder(vae.post_quant_conv(h[:, :vae.cfg.z_dim]), dec)
        x = x[:, :, n:]
    mu, logvar = vae.quant_conv(vae.encoder(x, enc)).float().chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    if splice is not None:
        z, x = splice_clips(z, x, *splice, prefix)
    rec = vae.decoder(vae.post_quant_conv(z.to(x.dtype)), dec).float()
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
    # Objects cover a few percent of a frame: weight pixels by their distance from the frame's median color
    # (about the background), or the colors of small objects wash out into it.
    bg = x.flatten(3).median(dim=3).values[..., None, None]  # (B, 3, T, 1, 1)
    w = 1 + 4 * (x - bg).abs().sum(1, keepdim=True)
    e = rec - x
    return (w * (e.abs() + e.square())).mean() / w.mean() + kl_weight * kl


def splice_clips(z: torch.Tensor, x: torch.Tensor, partner: torch.Tensor, cut: int,
                 prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents z (B, z, f, h, w) and the video x (B, 3, T, H, W) they decode to, both starting after `prefix`
    latent frames: from latent frame `cut` (and its first video frame) on, sample b is partner[b]'s."""
    n = video_frame(prefix + cut) - video_frame(prefix)
    return (torch.cat([z[:, :, :cut], z[partner, :, cut:]], dim=2),
            torch.cat([x[:, :, :n], x[partner, :, n:]], dim=2))


@torch.no_grad()
def encoder_mean(vae: WanVAE, x: torch.Tensor) -> torch.Tensor:
    """Posterior mean of a whole clip (B, 3, T, H, W) -> (B, z, f, h, w) fp32 (WanVAE.encode, batched and
    without its input checks or pieces)."""
    return vae.quant_conv(vae.encoder(x, CausalCache()))[:, :vae.cfg.z_dim].float()


@torch.no_grad()
def vae_accuracy(vae: WanVAE, device, size: int, seed: int, n: int = 48) -> dict[str, float]:
    """Fraction of `n` random clips (25 frames) whose reconstruction from the posterior mean still shows their
    object color and background (clips.matches): the best the transformer can reach through this VAE."""
    rng = np.random.default_rng((seed, 6))
    scenes = [sample_scene(rng) for _ in range(n)]
    clips = torch.from_numpy(np.stack([render(s, 25, size, size, seed=(seed, 6, i)) for i, s in enumerate(scenes)]))
    x = video_batch(clips, device)
    rec = vae.decoder(vae.post_quant_conv(encoder_mean(vae, x)), CausalCache())
    hits = [matches(to_frames(r), s) for r, s in zip(rec, scenes)]
    return {k: float(np.mean([h[k] for h in hits])) for k in ("color", "background")}


@torch.no_grad()
def fold_latent_stats(vae: WanVAE, clips: torch.Tensor, device, batch: int = 64) -> None:
    """Make the encoder's mean the normalized latent: z_norm = (z - m) / s per channel, measured on `clips`,
    goes into quant_conv (mean rows, and log-variance rows shift by -2 log s), z = s z_norm + m into
    post_quant_conv. The config's latents_mean / latents_std are then 0 / 1."""
    zs = torch.cat([encoder_mean(vae, video_batch(clips[s:s + batch], device)) for s in range(0, len(clips), batch)])
    m = zs.transpose(0, 1).flatten(1).mean(1).double()
    s = zs.transpose(0, 1).flatten(1).std(1).double()
    log(f"latent mean {m.abs().max():.3f} (max abs), std {s.min():.3f}..{s.max():.3f} -> folded into the VAE")
    C = vae.cfg.z_dim
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:C] /= s.view(-1, 1, 1, 1, 1).to(q.weight)
    q.bias[:C] = ((q.bias[:C].double() - m) / s).to(q.bias)
    q.bias[C:] -= (2 * s.log()).to(q.bias)
    p.bias += (p.weight.flatten(1).double() @ m).to(p.bias)
    p.weight *= s.view(1, -1, 1, 1, 1).to(p.weight)


def train_vae(cfg: TrainConfig, spec, clips: torch.Tensor, device, vae: WanVAE | None = None) -> WanVAE:
    """Train a new VAE, or go on training `vae`: all of it (then the latent statistics are folded in again) or,
    with cfg.vae_decoder_only, its decoder alone, which keeps every latent as it was."""
    if cfg.vae_decoder_only and vae is None:
        raise ValueError(DECODER_ONLY_NEEDS_A_VAE)
    torch.manual_seed(cfg.seed)
    vae = (WanVAE(spec.vae).to(device) if vae is None else vae).train().requires_grad_(True)
    for part in (vae.encoder, vae.decoder):
        accelerate(part, compile=False)  # per-tap convs on CPUs (~3x faster), the same maths and gradients
    if cfg.vae_decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    log(f"VAE: {sum(p.numel() for p in params) / 1e6:.2f}M trained parameters, {len(clips)} clips")
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(i):
        """A random warm-up prefix (the same for the batch), then vae_latents latent frames with gradients; with
        probability vae_splice_prob a batch is spliced: each clip cuts to another's latents inside that stretch."""
        prefix = cfg.vae_prefixes[int(torch.randint(len(cfg.vae_prefixes), (), generator=g))]
        x = video_batch(clips[torch.randint(len(clips), (cfg.vae_batch,), generator=g)], device)
        x = x[:, :, :video_frame(prefix + cfg.vae_latents)]
        splice = None
        if cfg.vae_splice_prob and torch.rand((), generator=g) < cfg.vae_splice_prob:  # (no draw at 0: old runs)
            splice = (torch.randperm(len(x), generator=g).to(device),
                      int(torch.randint(1, cfg.vae_latents, (), generator=g)))
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):  # CPU bf16 convs: slow
            return vae_loss(vae, x, cfg.kl_weight, prefix, splice)

    train_loop("vae", params, loss_fn, cfg.vae_steps, cfg.vae_seconds, cfg.vae_lr, 100, device)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = video_batch(clips[:8], device)
        rec = vae.decoder(vae.post_quant_conv(encoder_mean(vae, x)), CausalCache()).clamp(-1, 1)
        psnr = lambda a, b: 10 * math.log10(4 / (a - b).square().mean().item())  # noqa: E731
        log(f"VAE reconstruction of {x.shape[2]} frames (posterior mean): L1 {(rec - x).abs().mean():.4f}, "
            f"PSNR {psnr(rec, x):.1f} dB, last 16 frames {psnr(rec[:, :, -16:], x[:, :, -16:]):.1f} dB")
    log("VAE reconstructions that still match their captions: " +
        ", ".join(f"{k} {v:.2f}" for k, v in vae_accuracy(vae, device, spec.height, cfg.seed,
                                                         cfg.vae_eval_clips).items()))
    if not cfg.vae_decoder_only:
        fold_latent_stats(vae, clips[:1024], device)
    return vae


# -- transformer ---------------------------------------------------------------------------------------------------

def init_transformer(model: LongSANATransformer) -> LongSANATransformer:
    """DiT-style init: Xavier linear / conv weights, zero biases; zero adaLN projection and output layer, so
    every block starts as the identity in its gated branches and the first prediction is v = 0."""
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.xavier_uniform_(mod.weight.flatten(1))
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
    for mod in (model.time_embed.linear, model.proj_out):
        torch.nn.init.zeros_(mod.weight)
        torch.nn.init.zeros_(mod.bias)
    return model


def noise_levels(B: int, n: int, switch: torch.Tensor, shift: float, g: torch.Generator,
                 switch_focus: float = 0.0) -> torch.Tensor:
    """(B, n) integer t per chunk: 0 before a drawn chunk j (j >= the switch chunk; j = 0 a quarter of the
    time otherwise; j = the switch chunk itself for a `switch_focus` fraction of the clips that switch),
    t_j = ceil(1000 shift(u)), then each later chunk uniform between its predecessor and 1000.

    The chunk right after a switch, whose context shows only the old scene, is the hard case of a switch; a
    uniform j reaches it once in n - switch draws."""
    r = torch.rand(B, generator=g)
    j = switch + (r * (n - switch)).long()
    j = torch.where((switch == 0) & (torch.rand(B, generator=g) < 0.25), 0, j)
    if switch_focus > 0:  # (no extra draw otherwise: earlier runs' noise stays reproducible)
        j = torch.where((switch > 0) & (torch.rand(B, generator=g) < switch_focus), switch, j)
    u = torch.rand(B, n, generator=g)
    t = torch.zeros(B, n)
    prev = torch.zeros(B)
    for c in range(n):
        first = shift * u[:, c] / (1 + (shift - 1) * u[:, c]) * 1000
        later = prev + (1000 - prev) * u[:, c]
        cur = torch.where(c == j, first, torch.where(c > j, later, torch.zeros(B)))
        t[:, c] = cur
        prev = cur
    return torch.where(t > 0, t.ceil().clamp(1, 1000), t)


def flow_loss(model, lat, emb, mask, switch, sizes, shift, object_weight, switch_focus, g, g_dev) -> torch.Tensor:
    """Block-causal flow-matching loss of one batch. lat: (B, C, F, H, W) normalized latents of whole chunks.
    Objects are a few latent pixels of a frame: positions are weighted by their squared distance from the frame's
    median latent (about the background), as the VAE's loss weights pixels, or the loss is nearly all background
    and the model learns object colors last. The weights change how much each position counts, not its target."""
    B, C, Fr, H, W = lat.shape
    n = len(sizes)
    chunk_of = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))  # (F,)
    t = noise_levels(B, n, switch.cpu(), shift, g, switch_focus)[:, chunk_of].to(lat.device)  # (B, F)
    trained = (t > 0) & (chunk_of[None] >= switch.cpu()[:, None]).to(lat.device)
    eps = torch.randn(lat.shape, generator=g_dev, device=lat.device)
    sigma = (t / 1000)[:, None, :, None, None]
    x = (1 - sigma) * lat + sigma * eps
    pt, ph, pw = model.cfg.patch_size
    t_tokens = t.repeat_interleave((H // ph) * (W // pw), dim=1)  # (B, N), tokens ordered (frame, row, col)
    with torch.autocast(lat.device.type, torch.bfloat16, enabled=lat.device.type == "cuda"):
        v = model(x, emb, t_tokens, mask, chunks=sizes)
    d2 = (lat - lat.flatten(3).median(3).values[..., None, None]).square().sum(1)  # (B, F, H, W)
    w = (1 + object_weight * d2) * trained[..., None, None]
    err = (v.float() - (eps - lat)).square().mean(1)  # (B, F, H, W)
    return (err * w).sum() / w.sum().clamp(min=1)


def train_transformer(cfg: TrainConfig, spec, lat, emb, mask, switch, model, device,
                      ema: LongSANATransformer | None = None) -> LongSANATransformer:
    """Returns the EMA of the weights, which starts as `ema` (a resumed run's) or a copy of `model`."""
    sizes = chunk_sizes(spec, cfg.chunks)
    warm = ema is None  # a fresh average follows the first steps closely
    ema = (copy.deepcopy(model) if ema is None else ema).requires_grad_(False)
    model.train()
    log(f"transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(lat)} clips "
        f"of chunks {sizes}, {int((switch > 0).sum())} with a prompt switch")
    g = torch.Generator().manual_seed(cfg.seed + 1)
    g_dev = torch.Generator(device).manual_seed(cfg.seed + 2)
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def loss_fn(i):
        idx = torch.randint(len(lat), (cfg.batch,), generator=g)
        return flow_loss(model, lat[idx.to(lat.device)].float(), emb[idx.to(emb.device)], mask[idx.to(mask.device)],
                         switch[idx], sizes, cfg.time_shift, cfg.object_weight, cfg.switch_focus, g, g_dev)

    def on_step(i):
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - (min(cfg.ema, (1 + i) / (10 + i)) if warm else cfg.ema))

    train_loop("transformer", params, loss_fn, cfg.steps, cfg.seconds, cfg.lr, cfg.warmup, device, on_step)
    return ema.eval()


# -- evaluation ----------------------------------------------------------------------------------------------------

def generate(pipe: Pipeline, prompt: str, chunks: int, seed: int = 0, switch_to: str | None = None,
             switch_after: int = 1, **settings) -> list[np.ndarray]:
    """The uint8 frames of the first `chunks` chunks of a stream, one array per chunk; with `switch_to`, the
    prompt switches after chunk `switch_after`."""
    stream, out = pipe.stream(prompt, seed=seed, **settings), []
    for chunk in stream:
        out.append(chunk.frames)
        if switch_to is not None and len(out) == switch_after:
            stream.set_prompt(switch_to)
        if len(out) == chunks:
            break
    stream.close()
    return out


def evaluate(pipe: Pipeline, captions: int, seed: int = 0, chunks: int = 2, **settings) -> dict[str, float]:
    """Fraction of random captions whose generated clip matches them (clips.matches), per attribute, and of
    prompt switches whose new color holds the second chunk after the switch."""
    rng = np.random.default_rng((seed, 5))
    scores: dict[str, list[float]] = {}
    for i in range(captions):
        scene = sample_scene(rng)
        frames = np.concatenate(generate(pipe, caption(scene), chunks, seed=i, **settings))
        for k, v in matches(frames, scene).items():
            if not k.endswith("score"):
                scores.setdefault(k, []).append(float(v))
        b = switch_scene(scene, rng)
        after = generate(pipe, caption(scene), 3, seed=i, switch_to=caption(b), **settings)[2]
        scores.setdefault("switch_color", []).append(float(matches(after, b)["color"]))
    return {k: float(np.mean(v)) for k, v in scores.items()}


# -- the command ---------------------------------------------------------------------------------------------------

DECODER_ONLY_NEEDS_A_VAE = "--vae-decoder-only trains an existing VAE's decoder: give --vae-from or --resume"


def check(cfg: TrainConfig) -> None:
    """ValueError for a configuration that `train` cannot run, before any work starts."""
    has_vae = cfg.vae_from is not None or cfg.resume is not None
    if not has_vae and not (cfg.vae_steps or cfg.vae_seconds):
        raise ValueError("no VAE: train one (--vae-seconds / --vae-steps) or take one (--vae-from, --resume)")
    if cfg.vae_decoder_only and not has_vae:
        raise ValueError(DECODER_ONLY_NEEDS_A_VAE)


def train(cfg: TrainConfig) -> Path:
    check(cfg)
    spec = get_config("demo")
    device = torch.device(cfg.device)
    size = spec.height
    sizes = chunk_sizes(spec, cfg.chunks)
    vae_from = cfg.vae_from or cfg.resume
    train_vae_now = bool(cfg.vae_steps or cfg.vae_seconds)
    ctx = multiprocessing.get_context("fork")  # before CUDA starts in this process
    with ctx.Pool(cfg.workers) as pool:
        vae_frames = video_frame(max(cfg.vae_prefixes) + cfg.vae_latents)
        vae_pending = pool.map_async(render_vae_clip, [(cfg.seed, i, vae_frames, size, cfg.vae_cut_prob,
                                                        cfg.vae_prefixes, cfg.vae_latents)
                                                       for i in range(cfg.vae_clips)],
                                     chunksize=16) if train_vae_now else None
        pending = pool.map_async(render_train_clip, [(cfg.seed, i, sizes, size, cfg.switch_prob)
                                                     for i in range(cfg.clips)], chunksize=16)
        if cfg.resume is None:
            text = demo_text_encoder(spec.transformer.caption_channels, spec.motion_score, cfg.seed, device)
            torch.manual_seed(cfg.seed)
            model, ema = init_transformer(LongSANATransformer(spec.transformer)).to(device), None
        else:
            folder = cfg.resume / "demo"
            text = TextEncoder.from_pretrained(folder, device=device, dtype=torch.float32)
            model = LongSANATransformer(spec.transformer)
            model.load_state_dict(torch.load(cfg.resume / "resume.pt", map_location="cpu")["model"])
            model = model.to(device)
            ema = load_transformer(folder, config=spec.transformer, device=device, dtype=torch.float32)
            log(f"resumed the transformer from {cfg.resume}")
        vae = None if vae_from is None else load_vae(vae_from / "demo" / "vae", device=device)
        if train_vae_now:
            vae_clips = torch.from_numpy(np.stack(vae_pending.get()))
            log(f"rendered {len(vae_clips)} VAE clips {tuple(vae_clips.shape[1:])}" +
                ("" if vae is None else f"; training on the VAE of {vae_from}"))
            vae = train_vae(cfg, spec, vae_clips, device, vae)
            del vae_clips
        results = pending.get()
    log(f"rendered {len(results)} training clips of {results[0][0].shape[0]} frames")
    frames, captions, switch = zip(*results)
    del results
    switch = torch.tensor(switch)
    lat = train_latents(vae, frames, switch, sizes, cfg.switch_splice, device)
    del frames
    emb, mask = encode_captions(text, list(captions), spec.motion_score)
    log(f"latents {tuple(lat.shape)} (std {lat.float().std():.3f}), captions {tuple(emb.shape)}; e.g. {captions[0]!r}")
    if cfg.steps or cfg.seconds:
        ema = train_transformer(cfg, spec, lat, emb, mask, switch, model, device, ema)
    elif ema is None:
        ema = copy.deepcopy(model)

    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}}, out / "resume.pt")
    cpu = Pipeline(copy.deepcopy(ema).cpu(), copy.deepcopy(vae).cpu(),
                   TextEncoder(text.tokenizer, copy.deepcopy(text.model).cpu()), spec)
    folder = cpu.save_pretrained(out / "demo")
    (out / "train-config.json").write_text(json.dumps(dataclasses.asdict(cfg), default=str, indent=2) + "\n")
    log(f"wrote {folder}")
    pipe = Pipeline(ema, vae, text, spec)
    for timesteps in cfg.eval_timesteps if cfg.eval_captions else ():
        res = evaluate(pipe, cfg.eval_captions, timesteps=timesteps)
        log(f"eval {timesteps}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
    return folder


# Option defaults are TrainConfig's (a dataclass keeps each field's default as a class attribute).
C = TrainConfig


@click.command("train-demo")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder (demo/ model folder, "
              "resume.pt, train-config.json).")
@click.option("--resume", type=click.Path(path_type=Path, exists=True, file_okay=False), default=C.resume,
              help="A previous run's --out: keep its text encoder, continue training its transformer, and its VAE "
                   "for --vae-seconds (0: keep it as it is).")
@click.option("--vae-from", type=click.Path(path_type=Path, exists=True, file_okay=False), default=C.vae_from,
              help="A previous run's --out whose VAE to take (instead of --resume's), trained for --vae-seconds.")
@click.option("--seed", type=int, default=C.seed, show_default=True, help="Data, init and noise seed.")
@click.option("--device", default=C.device, show_default=True)
@click.option("--workers", type=int, default=C.workers, show_default=True, help="Processes rendering clips.")
@click.option("--vae-steps", type=int, default=C.vae_steps, show_default=True, help="0: fit --vae-seconds.")
@click.option("--vae-seconds", type=float, default=C.vae_seconds, show_default=True)
@click.option("--vae-clips", type=int, default=C.vae_clips, show_default=True)
@click.option("--vae-batch", type=int, default=C.vae_batch, show_default=True)
@click.option("--vae-lr", type=float, default=C.vae_lr, show_default=True)
@click.option("--vae-decoder-only", is_flag=True, default=C.vae_decoder_only,
              help="Train only the VAE's decoder (the latents stay valid).")
@click.option("--vae-prefixes", type=int, multiple=True, default=C.vae_prefixes, show_default=True,
              help="Latent frames that warm the causal caches before the ones with gradients, one drawn per batch "
                   "(repeat the option for each).")
@click.option("--vae-cut-prob", type=click.FloatRange(0, 1), default=C.vae_cut_prob, show_default=True,
              help="Fraction of VAE clips that cut to a new scene at a latent boundary where the loss reaches.")
@click.option("--vae-splice-prob", type=click.FloatRange(0, 1), default=C.vae_splice_prob, show_default=True,
              help="Fraction of VAE batches whose latents cut to other clips' latents where the loss reaches.")
@click.option("--steps", type=int, default=C.steps, show_default=True, help="Transformer steps; 0: fit --seconds.")
@click.option("--seconds", type=float, default=C.seconds, show_default=True)
@click.option("--clips", type=int, default=C.clips, show_default=True, help="Training clips for the transformer.")
@click.option("--chunks", type=int, default=C.chunks, show_default=True, help="Streaming chunks per training clip.")
@click.option("--switch-prob", type=float, default=C.switch_prob, show_default=True,
              help="Fraction of training clips that switch prompt at a chunk boundary.")
@click.option("--switch-focus", type=float, default=C.switch_focus, show_default=True,
              help="Of the clips that switch, the fraction trained on the first chunk after the switch.")
@click.option("--switch-splice", is_flag=True, default=C.switch_splice,
              help="Switching clips' latents cut at the switch (encoded apart; for a --vae-splice-prob decoder).")
@click.option("--batch", type=int, default=C.batch, show_default=True)
@click.option("--object-weight", type=float, default=C.object_weight, show_default=True,
              help="Extra loss weight of latents far from their frame's background (see flow_loss).")
@click.option("--lr", type=float, default=C.lr, show_default=True)
@click.option("--ema", type=float, default=C.ema, show_default=True, help="Decay of the weight average shipped.")
@click.option("--eval-captions", type=int, default=C.eval_captions, show_default=True,
              help="Captions scored after training.")
def train_cmd(**kw):
    """Train the built-in demo model on procedural clips (one GPU, a few minutes)."""
    cfg = TrainConfig(**kw)
    try:
        check(cfg)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    train(cfg)
