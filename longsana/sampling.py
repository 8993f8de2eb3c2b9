"""Samplers as plain functions over a schedule: the base model's multistep DPM-Solver++ (T2V) and flow-Euler
(I2V), classifier-free guidance, and LongSANA's 4-step causal chunk sampler.

The network predicts a flow velocity v at noise level sigma, x_sigma = (1 - sigma) x0 + sigma eps, so
x0 = x - sigma v. A sampler is a loop over a `Schedule` (the timesteps the network is fed, the sigmas the update
uses) calling `velocity_fn(x, t) -> v`; guidance, text, masks and I2V conditioning live in velocity_fn.

The base-model schedules and updates reproduce diffusers 0.42.1 (the test reference) operation for operation,
so fp32 latents agree to rounding:
  - T2V, SanaVideoPipeline + DPMSolverMultistepScheduler(flow_shift=8, use_flow_sigmas=True,
    prediction_type="flow_prediction"), all else default: dpmsolver++, order 2, midpoint, lower_order_final,
    final sigma 0. sigmas = shift(1 - linspace(1, 1/1000, N + 1)) flipped, last dropped, in fp64, stored fp32,
    then 0 appended. The network sees the int64 `trunc(1000 sigma)` (fp64): 999, 997, ..., 140 at 50 steps;
    it never sees 1000 (the first sigma is shift(0.999) = 0.99987). The update uses the fp32 sigmas, not t/1000.
    Steps 0 and N-1 are first order (no history; the last step lands on sigma 0, where lambda is infinite and
    the update returns x0 itself); the rest are second order.
  - I2V, SanaImageToVideoPipeline + FlowMatchEulerDiscreteScheduler(shift=8): diffusers shifts twice (its
    constructor shifts a 1000-entry table in fp32; set_timesteps spaces N points linearly between the shifted
    table ends and shifts them again), so the schedule runs 1 .. 0.0602 before the final 0. The network sees
    the fp32 `1000 sigma` (fractional: 1000, 997.42, ...); diffusers' transformer embeds it as is, the original
    network floors it (TransformerConfig.floor_timestep).
  - diffusers looks the first step up by timestep value, so from 144 DPM steps on (first two timesteps both 999)
    it starts one sigma late and fails on the last step; these functions always start at step 0.

LongSANA: per chunk, t in [1000, 960, 889, 727] = round(1000 shift(u)), u = 1, .75, .5, .25,
shift 8; x0 = x - (t/1000) v; re-noise with FRESH noise to the next level. The official sampler builds the
timestep tensor in bf16, so its network sees 1000, 960, 888, 728 and its x0 uses that t, while re-noising uses
the exact integers; `bf16_like=True` reproduces that, the default feeds the exact integers the model was trained
on. Not reproduced: the official code also snaps every sigma to the nearest entry of a 1000-entry shifted table
(up to 4e-4 in sigma; with table shift 8 the levels 889, 727 become 8/9, 8/11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> v, shaped like x


class Schedule(NamedTuple):
    timesteps: torch.Tensor  # (N,) the t fed to the network at each step
    sigmas: torch.Tensor  # (N + 1,) fp32 noise levels; sigmas[i] goes with timesteps[i], sigmas[N] = 0


def shift_sigmas(sigma, shift: float):
    """The flow time shift sigma -> shift sigma / (1 + (shift - 1) sigma) (numpy, torch or float; fixed order)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


# -- schedules ----------------------------------------------------------------------------------------------------
def dpm_solver_schedule(num_steps: int, shift: float = 8.0, num_train_timesteps: int = 1000) -> Schedule:
    """diffusers' DPMSolverMultistepScheduler.set_timesteps with flow sigmas: int64 timesteps, fp32 sigmas."""
    _check_steps(num_steps)
    u = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_steps + 1)  # fp64, 0 .. 1 - 1/T
    sigmas = np.flip(shift_sigmas(u, shift))[:-1].copy()  # (N,) high to low, sigma = 0 dropped
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)  # truncates, like diffusers
    return Schedule(timesteps, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32)))


def flow_euler_schedule(num_steps: int, shift: float = 8.0, num_train_timesteps: int = 1000) -> Schedule:
    """diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps): fp32 timesteps = 1000 sigma."""
    _check_steps(num_steps)
    T = num_train_timesteps
    # the constructor's table, shifted in fp32: only its ends (sigma 1 and 1/T) matter
    ends = shift_sigmas(torch.tensor([float(T), 1.0]) / T, shift)
    sigma_max, sigma_min = ends.tolist()
    sigmas = shift_sigmas(np.linspace(sigma_max * T, sigma_min * T, num_steps) / T, shift)  # fp64, shifted again
    sigmas = torch.from_numpy(sigmas).float()
    return Schedule(sigmas * T, torch.cat([sigmas, sigmas.new_zeros(1)]))


def causal_timesteps(shift: float = 8.0, steps: int = 4, bf16_like: bool = False,
                     num_train_timesteps: int = 1000) -> tuple[float, ...]:
    """LongSANA's per-chunk timesteps: round(T shift(1 - k/steps)), k < steps -> (1000, 960, 889, 727) by default;
    bf16_like gives what the official sampler's bf16 timestep tensor holds: (1000, 960, 888, 728)."""
    _check_steps(steps)
    ts = tuple(float(round(num_train_timesteps * shift_sigmas(1 - k / steps, shift))) for k in range(steps))
    return tuple(map(bf16_round, ts)) if bf16_like else ts


def bf16_round(t: float) -> float:
    """t as a bf16 timestep tensor holds it (what the official sampler feeds the network)."""
    return torch.tensor(t, dtype=torch.bfloat16).item()


def _check_steps(n: int):
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of steps must be a positive int, got {n!r}")


# -- guidance -----------------------------------------------------------------------------------------------------
def cfg_velocity(model_fn: VelocityFn, guidance_scale: float) -> VelocityFn:
    """Classifier-free guidance as a velocity_fn. model_fn(x2, t) runs the doubled batch [negative; positive]
    (x2 = cat([x, x]); the text batch is model_fn's); guided v = v_neg + g (v_pos - v_neg) in fp32, as diffusers.
    diffusers guides only when g > 1; below that call the model on the positive prompt alone."""
    def velocity(x, t):
        v_neg, v_pos = model_fn(torch.cat([x, x]), t).float().chunk(2)
        return v_neg + guidance_scale * (v_pos - v_neg)
    return velocity


# -- base model: DPM-Solver++ (T2V) and flow-Euler (I2V) ------------------------------------------------------------
def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log-SNR of a flow noise level: log(alpha / sigma) with alpha = 1 - sigma (as diffusers, two logs)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def dpm_solver_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                    x0_prev: torch.Tensor | None = None, sigma_prev: torch.Tensor | None = None) -> torch.Tensor:
    """One multistep DPM-Solver++ (midpoint) update of x from sigma to sigma_next, given the data prediction x0
    at sigma. With x0_prev (the prediction at the previous level sigma_prev) it is second order, else first
    order (DDIM). Sigmas are 0-dim fp32 tensors; the scalar algebra runs on them as in diffusers."""
    alpha_next = 1 - sigma_next
    h = _lambda(sigma_next) - _lambda(sigma)
    phi = alpha_next * (torch.exp(-h) - 1.0)
    x_next = (sigma_next / sigma) * x - phi * x0
    if x0_prev is None:
        return x_next
    r0 = (_lambda(sigma) - _lambda(sigma_prev)) / h
    D1 = (1.0 / r0) * (x0 - x0_prev)
    return x_next - 0.5 * phi * D1


def sample_dpm_solver(velocity_fn: VelocityFn, x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Run the order-2 multistep DPM-Solver++ from x (noise at sigmas[0]; pass fp32) to the final sample."""
    timesteps, sigmas = schedule
    timesteps = timesteps.to(x.device)
    n = len(timesteps)
    x0_prev = None
    for i in range(n):
        x0 = x - sigmas[i] * velocity_fn(x, timesteps[i])  # flow prediction -> data prediction
        # first order on the first step (no history) and the last (to sigma = 0: lambda = inf, result = x0)
        second = 0 < i < n - 1
        x = dpm_solver_step(x, x0, sigmas[i], sigmas[i + 1],
                            x0_prev if second else None, sigmas[i - 1] if second else None)
        x0_prev = x0
    return x


def sample_flow_euler(velocity_fn: VelocityFn, x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Flow-matching Euler: x <- x + (sigma_next - sigma) v at each step."""
    timesteps, sigmas = schedule
    for i, t in enumerate(timesteps.to(x.device)):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity_fn(x, t)
    return x


# -- LongSANA: the 4-step causal chunk sampler ----------------------------------------------------------------------
def sample_chunk(velocity_fn: Callable[[torch.Tensor, float], torch.Tensor], noise_fn: Callable[[], torch.Tensor],
                 timesteps: Sequence[float],
                 bf16_like: bool = False, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Denoise one chunk and return its x0. `timesteps` are the exact levels (causal_timesteps()); each step
    predicts x0 = x - (t/T) v and re-noises x0 with a fresh noise_fn() draw to the next level. bf16_like feeds
    the network (and the x0 conversion) bf16-rounded t, as the official sampler does.

    Unlike the other samplers' velocity_fn, this one is given t as a Python float: the fast chunk step runs this
    loop inside a CUDA graph capture, which allows no host-to-device copy of a new tensor."""
    if not timesteps:
        raise ValueError("sample_chunk needs at least one timestep")
    x = noise_fn()
    for i in range(len(timesteps)):
        x = chunk_step(velocity_fn, noise_fn, x, i, timesteps, bf16_like, num_train_timesteps)
    return x


def chunk_step(velocity_fn: Callable[[torch.Tensor, float], torch.Tensor], noise_fn: Callable[[], torch.Tensor],
               x: torch.Tensor, i: int, timesteps: Sequence[float], bf16_like: bool = False,
               num_train_timesteps: int = 1000) -> torch.Tensor:
    """Step i of `sample_chunk`, from x at level timesteps[i]: the predicted x0 re-noised to the next level, or x0
    itself at the last step (the fast chunk step launches a chunk's steps one at a time)."""
    T, t = num_train_timesteps, timesteps[i]
    t_net = bf16_round(t) if bf16_like else float(t)
    x0 = x - (t_net / T) * velocity_fn(x, t_net)
    if i + 1 == len(timesteps):
        return x0
    s = timesteps[i + 1] / T
    return (1 - s) * x0 + s * noise_fn()
