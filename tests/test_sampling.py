"""Samplers and resolution binning against diffusers 0.42.1 (schedules bit-exact, fp32 sample loops to 1e-6,
including the real SanaVideoPipeline with a tiny transformer), and LongSANA's causal chunk sampler against its
recipe written out here in fp64."""

from __future__ import annotations

import diffusers
import pytest
import torch

from longsana.config import get_config
from longsana.resolution import ASPECT_RATIO_480_BIN, classify_height_width_bin, resize_and_crop
from longsana.sampling import (causal_timesteps, cfg_velocity, dpm_solver_schedule, dpm_solver_step,
                               flow_euler_schedule, sample_chunk, sample_dpm_solver, sample_flow_euler)
from longsana.testing import diffusers_transformer, rel_err

# the SANA-Video scheduler configs (diffusers' scripts/convert_sana_video_to_diffusers.py, flow_shift 8)
DPM_KW = dict(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction")
EULER_KW = dict(shift=8.0)


def dpm_scheduler(n):
    s = diffusers.DPMSolverMultistepScheduler(**DPM_KW)
    s.set_timesteps(n)
    return s


def euler_scheduler(n):
    s = diffusers.FlowMatchEulerDiscreteScheduler(**EULER_KW)
    s.set_timesteps(n)
    return s


def fake_velocity(C: int, seed: int, seen: list | None = None):
    """A fixed, mildly nonlinear velocity field: channel mixing of x plus a term that depends on the t value it is
    given (so a wrong t shows). Records the t it sees in `seen`."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(C) * 0.8 + 0.3 * torch.randn(C, C, generator=g) / C ** 0.5
    b = torch.randn(1, C, 1, 1, 1, generator=g)

    def v(x, t):
        if seen is not None:
            seen.append(torch.as_tensor(t).clone())
        tt = torch.as_tensor(t, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        return (torch.einsum("oc,bcfhw->bofhw", A.to(x.dtype), x) + 0.1 * torch.tanh(x)
                + torch.cos(tt / 300) * b.to(x.dtype))
    return v


def noise(shape=(2, 4, 3, 4, 5), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- schedules ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 50])
def test_dpm_solver_schedule_is_diffusers(n):
    ref = dpm_scheduler(n)
    t, s = dpm_solver_schedule(n)
    assert t.dtype == ref.timesteps.dtype == torch.int64 and s.dtype == ref.sigmas.dtype == torch.float32
    assert torch.equal(t, ref.timesteps) and torch.equal(s, ref.sigmas)
    assert s[-1] == 0 and t[0] == 999  # the base model never sees t = 1000


@pytest.mark.parametrize("n", [1, 2, 5, 50])
def test_flow_euler_schedule_is_diffusers(n):
    ref = euler_scheduler(n)
    t, s = flow_euler_schedule(n)
    assert t.dtype == ref.timesteps.dtype == torch.float32
    assert torch.equal(t, ref.timesteps) and torch.equal(s, ref.sigmas)


def test_bad_step_counts():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="number of steps"):
            dpm_solver_schedule(bad)
    with pytest.raises(ValueError, match="number of steps"):
        causal_timesteps(steps=0)


# -- DPM-Solver++ -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 5, 50])
def test_dpm_solver_matches_diffusers_scheduler(n):
    x = noise()
    ref_seen, seen = [], []
    ref = x.clone()
    sched, v_ref = dpm_scheduler(n), fake_velocity(4, seed=1, seen=ref_seen)
    for t in sched.timesteps:
        ref = sched.step(v_ref(ref, t), t, ref, return_dict=False)[0]
    out = sample_dpm_solver(fake_velocity(4, seed=1, seen=seen), x.clone(), dpm_solver_schedule(n))
    assert [(t.item(), t.dtype) for t in seen] == [(t.item(), t.dtype) for t in ref_seen]
    assert rel_err(out, ref) <= 1e-6
    assert rel_err(out, x) > 0.1  # it did move


@pytest.mark.parametrize("n", [5, 20])
def test_dpm_solver_with_cfg_matches_pipeline_loop(n):
    """The guidance arithmetic of SanaVideoPipeline: batch [negative, positive], fp32, g = 6."""
    v_neg, v_pos = fake_velocity(4, seed=2), fake_velocity(4, seed=3)

    def model_fn(x2, t):
        a, b = x2.chunk(2)
        assert torch.equal(a, b)
        return torch.cat([v_neg(a, t), v_pos(b, t)])

    x = noise(seed=4)
    sched, ref = dpm_scheduler(n), x.clone()
    for t in sched.timesteps:  # the pipeline's loop body, minus the transformer
        u, c = model_fn(torch.cat([ref] * 2), t).float().chunk(2)
        ref = sched.step(u + 6.0 * (c - u), t, ref, return_dict=False)[0]
    out = sample_dpm_solver(cfg_velocity(model_fn, 6.0), x.clone(), dpm_solver_schedule(n))
    assert rel_err(out, ref) <= 1e-6
    # guidance changes the result (the test would not see a dropped guidance term otherwise)
    assert rel_err(sample_dpm_solver(v_pos, x.clone(), dpm_solver_schedule(n)), ref) > 1e-3


@torch.no_grad()
def test_sana_video_pipeline_t2v_loop():
    """diffusers' SanaVideoPipeline itself (tiny random transformer, CFG 6, 5 steps, latent output) against
    sample_dpm_solver + cfg_velocity around the same transformer; also what timestep values reach the model."""
    tr = diffusers_transformer(get_config("tiny").transformer, seed=5)
    pipe = diffusers.SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                       scheduler=diffusers.DPMSolverMultistepScheduler(**DPM_KW))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    pos, neg = torch.randn(1, 7, 24, generator=g), torch.randn(1, 7, 24, generator=g)
    pos_mask, neg_mask = torch.ones(1, 7), torch.ones(1, 7)
    pos_mask[:, 5:] = 0

    seen, forward = [], tr.forward

    def recording_forward(*args, **kwargs):
        seen.append(kwargs["timestep"].clone())
        return forward(*args, **kwargs)

    tr.forward = recording_forward
    ref = pipe(negative_prompt=None, prompt_embeds=pos, prompt_attention_mask=pos_mask,
               negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask, latents=x.clone(),
               height=64, width=64, frames=5, num_inference_steps=5, guidance_scale=6.0, output_type="latent",
               use_resolution_binning=False, return_dict=False)[0]
    del tr.forward
    assert [s.tolist() for s in seen] == [[t, t] for t in dpm_solver_schedule(5).timesteps.tolist()]

    y, mask = torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask])

    def model_fn(x2, t):
        return tr(x2, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t.expand(len(x2)),
                  return_dict=False)[0]

    out = sample_dpm_solver(cfg_velocity(model_fn, 6.0), x.clone(), dpm_solver_schedule(5))
    assert rel_err(out, ref) <= 1e-6


def test_last_step_to_zero_returns_x0():
    x, x0, x0_prev = noise(seed=7), noise(seed=8), noise(seed=9)
    s = dpm_solver_schedule(3).sigmas
    assert torch.equal(dpm_solver_step(x, x0, s[2], s[3]), x0)
    second = dpm_solver_step(x, x0, s[1], s[2], x0_prev, s[0])
    assert rel_err(second, dpm_solver_step(x, x0, s[1], s[2])) > 1e-3  # history is used


# -- flow-Euler ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 5, 50])
def test_flow_euler_matches_diffusers_scheduler(n):
    x = noise(seed=10)
    ref_seen, seen = [], []
    sched, v_ref, ref = euler_scheduler(n), fake_velocity(4, seed=11, seen=ref_seen), x.clone()
    for t in sched.timesteps:
        ref = sched.step(v_ref(ref, t), t, ref, return_dict=False)[0]
    out = sample_flow_euler(fake_velocity(4, seed=11, seen=seen), x.clone(), flow_euler_schedule(n))
    assert [(t.item(), t.dtype) for t in seen] == [(t.item(), t.dtype) for t in ref_seen]
    assert rel_err(out, ref) <= 1e-6


def test_flow_euler_i2v_frame0_fixed():
    """The I2V pipeline steps only latent frames 1.. while the model sees all frames; with the sampler that is
    a velocity_fn that re-attaches the clean frame 0 and drops its output."""
    x, v = noise(seed=12), fake_velocity(4, seed=13)
    sched, ref = euler_scheduler(5), x.clone()
    for t in sched.timesteps:
        ref = torch.cat([ref[:, :, :1], sched.step(v(ref, t)[:, :, 1:], t, ref[:, :, 1:], return_dict=False)[0]], 2)
    frame0 = x[:, :, :1]
    out = sample_flow_euler(lambda xs, t: v(torch.cat([frame0, xs], 2), t)[:, :, 1:], x[:, :, 1:].clone(),
                            flow_euler_schedule(5))
    assert rel_err(torch.cat([frame0, out], 2), ref) <= 1e-6


# -- LongSANA causal sampler --------------------------------------------------------------------------------------
def test_causal_timesteps():
    assert causal_timesteps() == (1000, 960, 889, 727) == get_config("longsana-2b-480p").denoise_timesteps
    # the official sampler: torch.ones(B, dtype=bf16) * t
    official = tuple((torch.ones(1, dtype=torch.bfloat16) * t).item() for t in causal_timesteps())
    assert causal_timesteps(bf16_like=True) == official == (1000, 960, 888, 728)
    assert causal_timesteps(shift=1.0, steps=2) == (1000, 500)


@pytest.mark.parametrize("bf16_like", [False, True])
def test_sample_chunk_follows_spec(bf16_like):
    ts = causal_timesteps()
    net_ts = causal_timesteps(bf16_like=bf16_like)
    draws = [noise(seed=20 + i) for i in range(len(ts))]

    # the recipe, in fp64: x0 with the t the network saw; re-noise to the exact next level, fresh noise
    v = fake_velocity(4, seed=14)
    x = draws[0].double()
    for i, t in enumerate(net_ts):
        x0 = x - (t / 1000) * v(x, torch.tensor(t, dtype=torch.float64))
        if i + 1 < len(ts):
            x = (1 - ts[i + 1] / 1000) * x0 + (ts[i + 1] / 1000) * draws[i + 1].double()

    it, seen = iter(draws), []
    out = sample_chunk(fake_velocity(4, seed=14, seen=seen), lambda: next(it), ts, bf16_like=bf16_like)
    assert next(it, None) is None  # one fresh draw per step
    assert tuple(t.item() for t in seen) == net_ts
    assert rel_err(out, x0) <= 1e-5
    assert rel_err(out, draws[0]) > 0.1


# -- resolution binning -------------------------------------------------------------------------------------------
def test_480p_table_is_diffusers():
    from diffusers.pipelines.sana_video.pipeline_sana_video import ASPECT_RATIO_480_BIN as ref

    assert list(ASPECT_RATIO_480_BIN) == list(ref)
    assert all(tuple(map(int, ref[k])) == ASPECT_RATIO_480_BIN[k] for k in ref)


def test_classify_height_width_bin_is_diffusers():
    from diffusers.pipelines.sana_video.pipeline_sana_video import ASPECT_RATIO_480_BIN as ref
    from diffusers.video_processor import VideoProcessor

    g = torch.Generator().manual_seed(15)
    sizes = [(480, 832), (832, 480), (720, 1280), (1080, 1920), (512, 512), (107, 200), (1, 1000), (1000, 1)]
    sizes += [tuple(s) for s in torch.randint(16, 2000, (200, 2), generator=g).tolist()]
    for h, w in sizes:
        assert classify_height_width_bin(h, w) == VideoProcessor.classify_height_width_bin(h, w, ratios=ref)
    assert classify_height_width_bin(480, 832) == (480, 832)
    with pytest.raises(ValueError, match="positive"):
        classify_height_width_bin(0, 832)


@pytest.mark.parametrize("request_hw", [(500, 800), (720, 1280), (480, 832), (600, 600), (1000, 500), (333, 777)])
def test_resize_and_crop_is_diffusers(request_hw):
    from diffusers.video_processor import VideoProcessor

    h, w = request_hw
    video = torch.rand(1, 3, 2, *classify_height_width_bin(h, w), generator=torch.Generator().manual_seed(16)) * 2 - 1
    ref = VideoProcessor.resize_and_crop_tensor(video, w, h)
    out = resize_and_crop(video, h, w)
    assert out.shape == ref.shape == (1, 3, 2, h, w)
    assert rel_err(out, ref) <= 1e-6
