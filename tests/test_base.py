"""The base-model pipeline against diffusers 0.42.1's SanaVideoPipeline (T2V) and SanaImageToVideoPipeline (I2V):
tiny random transformer and VAE with the same weights, the same precomputed embeddings and initial noise, CFG;
final latents to 1e-4 and the schedules and timesteps the networks see exactly. Then resolution binning, image
inputs, the `longsana generate` base path (T2V, I2V, batch file) and bad input."""

from __future__ import annotations

from dataclasses import replace

import av
import diffusers
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from longsana.base import BasePipeline, aspect_ratio_table, fit_image, read_image
from longsana.cli import main as cli
from longsana.config import CONFIGS, DIFFUSERS_CONVENTIONS, ModelSpec, get_config
from longsana.model import LongSANATransformer
from longsana.resolution import ASPECT_RATIO_480_BIN, resize_and_crop
from longsana.sampling import dpm_solver_schedule, flow_euler_schedule
from longsana.testing import diffusers_transformer, diffusers_vae, rel_err, save_pipeline, tiny_pipeline
from longsana.vae import WanVAE, to_uint8

TINY = get_config("tiny")
CFG = replace(TINY.transformer, **DIFFUSERS_CONVENTIONS)
SPEC = ModelSpec(CFG, TINY.vae, causal=False, motion_score=30, height=32, width=64)
H, W, FRAMES = 32, 64, 9  # 3 latent frames of 4 x 8 -> 2 x 4 tokens each
DPM_KW = dict(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction")
P = "a red circle moving left"
Q = "two yellow squares bouncing"


@pytest.fixture(scope="module")
def models():
    """(diffusers transformer, diffusers VAE, our pipeline with the same weights and no text encoder)."""
    tr, vae = diffusers_transformer(CFG, seed=3), diffusers_vae(TINY.vae, seed=4)
    model = LongSANATransformer(CFG).eval()
    model.load_state_dict(tr.state_dict())
    ours = WanVAE(TINY.vae).eval()
    ours.load_state_dict(vae.state_dict())
    return tr, vae, BasePipeline(model, ours, None, SPEC)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    pos, neg = torch.randn(1, 7, 24, generator=g), torch.randn(1, 7, 24, generator=g)
    pos_mask, neg_mask = torch.ones(1, 7), torch.ones(1, 7)
    pos_mask[:, 5:], neg_mask[:, 6:] = 0, 0  # padding on both prompts
    return dict(embeds=dict(prompt_embeds=pos, prompt_attention_mask=pos_mask, negative_prompt_embeds=neg,
                            negative_prompt_attention_mask=neg_mask),
                x=torch.randn(1, 16, 3, H // 8, W // 8, generator=g),
                image=(torch.rand(H, W, 3, generator=g) * 255).to(torch.uint8).numpy())


def recorder(mp, module, name, key):
    """Wrap module.<name> (undone with the monkeypatch context `mp`) to record the timestep it is called with
    (argument `key`: a keyword or a position)."""
    seen, inner = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append((kwargs[key] if isinstance(key, str) else args[key]).clone())
        return inner(*args, **kwargs)
    mp.setattr(module, name, wrapped)
    return seen


def run_both(models, inputs, monkeypatch, n, g, image=False, output_type="latent"):
    """Our pipeline and diffusers' on the same inputs: (ours, ref, t seen by ours, t seen by diffusers, ref pipe)."""
    tr, vae, pipe = models
    if image:
        ref_pipe = diffusers.SanaImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=8.0))
        extra = dict(image=torch.from_numpy(inputs["image"]).permute(2, 0, 1)[None].float() / 255)
    else:
        ref_pipe = diffusers.SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                               scheduler=diffusers.DPMSolverMultistepScheduler(**DPM_KW))
        extra = {}
    ref_pipe.set_progress_bar_config(disable=True)
    common = dict(height=H, width=W, frames=FRAMES, num_inference_steps=n, guidance_scale=g,
                  use_resolution_binning=False, **inputs["embeds"])
    with monkeypatch.context() as mp:
        ref_seen = recorder(mp, tr, "forward", "timestep")
        ref = ref_pipe(negative_prompt=None, latents=inputs["x"].clone(), output_type=output_type, return_dict=False,
                       **extra, **common)[0]
    with monkeypatch.context() as mp:
        seen = recorder(mp, pipe.model, "run", 1)
        steps = []
        out = pipe(latents=inputs["x"], output_type="latent" if output_type == "latent" else "np",
                   image=inputs["image"] if image else None, callback=lambda i, k: steps.append((i, k)), **common)
    assert steps == [(i + 1, n) for i in range(n)]
    return out, ref, seen, ref_seen, ref_pipe


# -- parity with diffusers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, g", [(2, 6.0), (5, 6.0), (2, 1.0)])
def test_t2v_matches_diffusers(models, inputs, monkeypatch, n, g):
    out, ref, seen, ref_seen, ref_pipe = run_both(models, inputs, monkeypatch, n, g)
    assert out.shape == ref.shape == inputs["x"].shape
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out, inputs["x"]) > 0.5  # it moved
    schedule = dpm_solver_schedule(n)
    assert torch.equal(ref_pipe.scheduler.timesteps, schedule.timesteps)
    assert torch.equal(ref_pipe.scheduler.sigmas, schedule.sigmas)
    batch = 2 if g > 1 else 1  # [negative; positive] only with guidance
    assert [(t.dtype, t.tolist()) for t in seen] == [(t.dtype, t.tolist()) for t in ref_seen]
    assert [t.tolist() for t in seen] == [[t] * batch for t in schedule.timesteps.tolist()]


@pytest.mark.parametrize("n", [2, 5])
def test_i2v_matches_diffusers(models, inputs, monkeypatch, n):
    out, ref, seen, ref_seen, ref_pipe = run_both(models, inputs, monkeypatch, n, 6.0, image=True)
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out[:, :, 1:], ref[:, :, 1:]) <= 1e-4  # the generated frames alone, not just the image frame
    schedule = flow_euler_schedule(n)
    assert torch.equal(ref_pipe.scheduler.timesteps, schedule.timesteps)
    assert torch.equal(ref_pipe.scheduler.sigmas, schedule.sigmas)
    # per token: t = 0 on frame 0, the step's t elsewhere; diffusers' (B, 1, F, h, w) is our (B, F, h*w)
    for t, t_ref, t_step in zip(seen, ref_seen, schedule.timesteps, strict=True):
        assert t.shape == (2, 3, 8) and torch.equal(t.flatten(), t_ref.flatten())
        assert (t[:, 0] == 0).all() and (t[:, 1:] == t_step).all()
    # frame 0 is the VAE's (normalized) mean of the image
    pipe = models[2]
    z0 = pipe.vae.encode_normalized(fit_image(read_image(inputs["image"]), H, W)[:, :, None])
    assert torch.equal(out[:, :, :1], z0)


@pytest.mark.parametrize("image", [False, True])
def test_same_seed_same_clip_as_diffusers(models, inputs, image):
    """No latents given: the initial noise comes from the generator exactly as diffusers draws it."""
    tr, vae, pipe = models
    if image:
        ref_pipe = diffusers.SanaImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=8.0))
        ref_image = torch.from_numpy(inputs["image"]).permute(2, 0, 1)[None].float() / 255
        extra, ours_extra = dict(image=ref_image), dict(image=inputs["image"])
    else:
        ref_pipe = diffusers.SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                               scheduler=diffusers.DPMSolverMultistepScheduler(**DPM_KW))
        extra, ours_extra = {}, {}
    ref_pipe.set_progress_bar_config(disable=True)
    common = dict(height=H, width=W, frames=FRAMES, num_inference_steps=2, use_resolution_binning=False,
                  output_type="latent", **inputs["embeds"])
    ref = ref_pipe(negative_prompt=None, generator=torch.Generator().manual_seed(11), return_dict=False, **extra,
                   **common)[0]
    out = pipe(generator=torch.Generator().manual_seed(11), **ours_extra, **common)
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(pipe(generator=torch.Generator().manual_seed(12), **ours_extra, **common), ref) > 0.1


def test_decoded_frames_match_diffusers(models, inputs, monkeypatch):
    """The whole call: decode through the VAE and uint8 frames vs diffusers' np output in [0, 1]."""
    out, ref, *_ = run_both(models, inputs, monkeypatch, 2, 6.0, output_type="np")
    assert out.dtype == np.uint8 and out.shape == (FRAMES, H, W, 3)
    ref = np.round(ref[0] * 255)
    assert np.abs(out.astype(float) - ref).max() <= 1 and out.std() > 5


# -- sizes ----------------------------------------------------------------------------------------------------------
def test_resolution_binning(models, inputs):
    """A size off the table: generate at the nearest entry, then resize and center-crop the decoded video back."""
    _, _, pipe = models
    binned = BasePipeline(pipe.model, pipe.vae, None, SPEC, aspect_ratios={"0.5": (32, 64), "1.0": (32, 32)})
    kw = dict(latents=inputs["x"], frames=FRAMES, num_inference_steps=2, height=40, width=72, **inputs["embeds"])
    assert binned.generation_size(40, 72) == (32, 64)
    z = binned(output_type="latent", **kw)
    frames = binned(**kw)
    assert frames.shape == (FRAMES, 40, 72, 3)
    ref = to_uint8(resize_and_crop(pipe.vae.decode(z), 40, 72))[0].numpy()
    assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1
    # the 480p table is the default for a model trained on it, none for the small configs
    assert aspect_ratio_table(get_config("sana-video-2b-480p")) is ASPECT_RATIO_480_BIN
    assert pipe.aspect_ratios is None


# -- images ---------------------------------------------------------------------------------------------------------
def write_png(path, rgb: np.ndarray):
    with av.open(str(path), "w", format="image2") as f:
        s = f.add_stream("png")
        s.width, s.height, s.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            f.mux(p)
        for p in s.encode(None):
            f.mux(p)
    return path


def test_image_inputs_agree(inputs, tmp_path):
    from PIL import Image  # installed with diffusers (a test dependency); the runtime does not import PIL

    rgb = inputs["image"]
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for image in (write_png(tmp_path / "a.png", rgb), str(tmp_path / "a.png"), rgb, rgb / 255.0, Image.fromarray(rgb),
                  torch.from_numpy(rgb).permute(2, 0, 1), want[None]):
        assert torch.allclose(read_image(image), want, atol=1e-7), type(image)
    # another size is stretched with a Lanczos filter: within a level of PIL's Lanczos (diffusers' PIL path)
    y, x = np.mgrid[0:90, 0:140]
    smooth = np.stack([128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), 128 + 60 * np.sin((x + y) / 11)], -1)
    smooth = smooth.astype(np.uint8)
    pil = np.asarray(Image.fromarray(smooth).resize((W, H), resample=Image.LANCZOS)).astype(float)
    ours = (fit_image(read_image(smooth), H, W)[0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(ours - pil).max() <= 1.0 + 1e-4


# -- the CLI --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_pipeline(tiny_pipeline(seed=5), tmp_path_factory.mktemp("base"))


@pytest.fixture
def tiny_base(monkeypatch):
    """A named bidirectional tiny spec for --spec (the folder's weights are the same kind of tiny transformer)."""
    monkeypatch.setitem(CONFIGS, "tiny-base", ModelSpec(TINY.transformer, TINY.vae, causal=False, motion_score=30,
                                                        height=32, width=32))
    return "tiny-base"


def read_video(path):
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def generate(model_dir, spec, *args):
    return CliRunner().invoke(cli, ["generate", "-m", str(model_dir), "--spec", spec, "--steps", "2", *args])


def test_generate_t2v_i2v_and_batch(model_dir, tiny_base, inputs, tmp_path):
    r = generate(model_dir, tiny_base, "-p", P, "--frames", "5", "-o", str(tmp_path / "t2v.mp4"))
    assert r.exit_code == 0, r.output
    t2v = read_video(tmp_path / "t2v.mp4")
    assert t2v.shape == (5, 32, 32, 3) and t2v.std() > 5

    png = write_png(tmp_path / "first.png", inputs["image"])
    r = generate(model_dir, tiny_base, "-p", P, "--image", str(png), "--seconds", "0.5", "--width", "64",
                 "-o", str(tmp_path / "i2v.mp4"))
    assert r.exit_code == 0, r.output
    assert read_video(tmp_path / "i2v.mp4").shape == (9, 32, 64, 3)  # 0.5 s = 8 frames -> 1 + 4k = 9

    batch = tmp_path / "prompts.txt"
    batch.write_text(f"{P}\n\n   \n{Q}\n")
    r = generate(model_dir, tiny_base, "--txt-file", str(batch), "--frames", "5", "--guidance", "1",
                 "--negative-prompt", "", "--out-dir", str(tmp_path / "clips"))
    assert r.exit_code == 0, r.output
    assert "skipped empty line(s) 2, 3" in r.output
    clips = sorted((tmp_path / "clips").glob("*.mp4"))
    assert [c.name[:4] for c in clips] == ["000_", "001_"]
    assert all(read_video(c).shape == (5, 32, 32, 3) for c in clips)


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "does not exist"),
    (["--image", "{text}"], "not a readable image"),
    (["--image", "{mp4}"], "not a still image"),
    (["--height", "50"], "multiples of 32"),
    (["--frames", "10"], "1 + 4k"),
    (["--guidance", "0.5"], "--guidance"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1001"], "--steps"),
    (["--timeline", "{timeline}"], "streaming option"),
    (["--seconds", "1", "--frames", "17"], "at most one of --seconds and --frames"),
])
def test_generate_bad_input(model_dir, tiny_base, tmp_path, args, message):
    text = tmp_path / "notes.png"
    text.write_text("not a picture\n")
    mp4, timeline = tmp_path / "clip.mp4", tmp_path / "story.txt"
    timeline.write_text(f"0 {P}\n1 {Q}\n")
    if "{mp4}" in args:
        from longsana.video import VideoWriter
        with VideoWriter(mp4, 32, 32, TINY.fps) as v:
            v.write(np.zeros((2, 32, 32, 3), np.uint8))
    args = [a.format(text=text, mp4=mp4, timeline=timeline) for a in args]
    prompt = [] if "--timeline" in args else ["-p", P]
    r = CliRunner().invoke(cli, ["generate", "-m", str(model_dir), "--spec", tiny_base, *prompt, *args,
                                 "-o", str(tmp_path / "x.mp4")])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x.mp4").exists()


def test_generate_base_options_need_the_base_model(model_dir, tmp_path):
    r = CliRunner().invoke(cli, ["generate", "-m", str(model_dir), "--spec", "tiny", "-p", P, "--steps", "3",
                                 "--guidance", "4", "-o", str(tmp_path / "x.mp4")])
    assert r.exit_code != 0 and "--steps, --guidance: base-model option" in r.output
    assert "--spec sana-video-2b-480p" in r.output
    r = CliRunner().invoke(cli, ["generate", "-m", str(model_dir), "--spec", "no-such-spec", "-p", P])
    assert r.exit_code != 0 and "unknown config 'no-such-spec'" in r.output and "Traceback" not in r.output


# -- bad input to the Python API ------------------------------------------------------------------------------------
def test_bad_calls(models, inputs, tmp_path):
    _, _, pipe = models
    e = inputs["embeds"]
    ok = dict(frames=FRAMES, num_inference_steps=1, **e)
    cases = [
        (dict(ok, num_inference_steps=0), "num_inference_steps must be an int in [1, 1000]"),
        (dict(ok, num_inference_steps=1001), "num_inference_steps"),
        (dict(ok, guidance_scale=0.5), "guidance_scale must be a finite number >= 1"),
        (dict(ok, guidance_scale=float("nan")), "guidance_scale"),
        (dict(ok, frames=10), "frames must be 1 + 4k"),
        (dict(ok, frames=0), "frames must be 1 + 4k"),
        (dict(ok, height=50), "multiples of 32"),
        (dict(ok, width=-32), "width must be a positive int"),
        (dict(ok, output_type="pil"), "output_type"),
        (dict(ok, prompt=P), "exactly one of prompt and prompt_embeds"),
        (dict(ok, negative_prompt="blurry"), "at most one of negative_prompt and negative_prompt_embeds"),
        (dict(ok, prompt_attention_mask=None), "needs its attention mask"),
        (dict(ok, negative_prompt_embeds=e["negative_prompt_embeds"][:, :5],
              negative_prompt_attention_mask=e["negative_prompt_attention_mask"][:, :5]), "same shape"),
        (dict(ok, latents=torch.zeros(1, 16, 2, 4, 8)), "latents must be"),
        (dict(ok, image=tmp_path / "nope.png"), "no such file"),
        (dict(ok, image=tmp_path), "no such file"),
        (dict(ok, image=np.zeros((32, 64), np.uint8)), "(H, W, 3)"),
        (dict(ok, image=torch.full((3, 8, 8), 2.0)), "values in [0, 1]"),
        (dict(ok, image=inputs["image"], frames=1), "at least 5 frames"),
        (dict(frames=FRAMES, prompt=P), "no text encoder"),
    ]
    for kw, message in cases:
        with pytest.raises((ValueError, FileNotFoundError, TypeError)) as info:
            pipe(**kw)
        assert message in str(info.value), (kw, str(info.value))
    with pytest.raises(ValueError, match="block-causal"):
        BasePipeline(pipe.model, pipe.vae, None, TINY)
