"""Sampling schedulers for the two denoising loops: diffusers' DDIM and DPM-Solver++ (2M).

Two ways to run the same scheduler:

- :class:`DiffusersSampler` calls diffusers' own ``scheduler.step`` (the reference; the eager and
  compile backends use it).
- :class:`DeviceSampler` precomputes diffusers' per-step coefficients once per (scheduler, steps,
  device) as small device tensors, so a step is a few elementwise ops on the device and never
  waits on the host (CUDA graphs, no host syncs in the loop). Every step of both schedulers is

      x0     = clip(P[i] * x + Q[i] * out)                    # model output -> predicted x0
      x_prev = A[i] * x + B[i] * x0 + C[i] * x0_prev + E[i] * out

  where ``x0_prev`` is the previous step's x0 (DPM-Solver++ 2M's second-order term) and ``out``
  is the (guided) model output. The coefficients mirror diffusers' formulas line by line;
  ``tests/engine/test_pipeline_schedulers.py`` checks both against each other.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

SCHEDULERS = ("ddim", "dpm")


def build_scheduler(kind: str, config, clip_sample: bool = False, timestep_spacing: str = "trailing"):
    """A fresh diffusers scheduler for ``kind`` ("ddim" | "dpm") from an ``engine.configs.SchedulerConfig``.

    ``clip_sample`` clamps DDIM's predicted x0 to [-1, 1] (pixel-space content and the tanh-bounded
    motion latent live there); "trailing" spacing starts at the last training timestep, which keeps
    few-step sampling honest (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed")."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    base = dict(num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start,
                beta_end=config.beta_end, beta_schedule=config.beta_schedule,
                prediction_type=config.prediction_type, timestep_spacing=timestep_spacing)
    if kind == "ddim":
        return DDIMScheduler(**base, clip_sample=clip_sample, set_alpha_to_one=True, steps_offset=0)
    if kind == "dpm":
        return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2,
                                           solver_type="midpoint", lower_order_final=True)
    raise ValueError(f"unknown scheduler {kind!r}; choose from {', '.join(SCHEDULERS)}")


class DiffusersSampler:
    """Runs diffusers' ``scheduler.step`` (stateful: one instance per denoising loop).

    Timesteps stay on the CPU, so diffusers' table look-ups need no device sync either."""

    def __init__(self, kind: str, config, steps: int, device, clip_sample: bool = False,
                 timestep_spacing: str = "trailing"):
        self.scheduler = build_scheduler(kind, config, clip_sample, timestep_spacing)
        self.scheduler.set_timesteps(steps)
        self.device = torch.device(device)
        self._timesteps = self.scheduler.timesteps.to(torch.long)
        self.timesteps_device = self._timesteps.to(self.device)

    def __len__(self) -> int:
        return len(self._timesteps)

    def timestep(self, i: int) -> torch.Tensor:
        """The model's timestep at step i, a 0-d long tensor on the device."""
        return self.timesteps_device[i]

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(out, self._timesteps[i], x, return_dict=False)[0]


@dataclass
class _Tables:
    timesteps: torch.Tensor  # (S,) long
    coef: torch.Tensor  # (6, S) float32: P, Q, A, B, C, E
    clip: Optional[float]


_TABLE_CACHE: Dict[Tuple, _Tables] = {}


def _ddim_tables(sched) -> Tuple[list, Optional[float]]:
    """Per-step (P, Q, A, B, C, E) of ``DDIMScheduler.step`` with eta = 0 and
    use_clipped_model_output = False (diffusers' defaults)."""
    cfg = sched.config
    ac = sched.alphas_cumprod.double()
    final = float(sched.final_alpha_cumprod)
    ratio = cfg.num_train_timesteps // sched.num_inference_steps
    rows = []
    for t in sched.timesteps.tolist():
        prev = t - ratio
        a_t, a_prev = float(ac[t]), (float(ac[prev]) if prev >= 0 else final)
        sa, sb = math.sqrt(a_t), math.sqrt(1 - a_t)  # sqrt(alpha_prod_t), sqrt(beta_prod_t)
        sa_prev, sb_prev = math.sqrt(a_prev), math.sqrt(1 - a_prev)
        # x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, with eps taken *before* x0 is clipped.
        if cfg.prediction_type == "epsilon":  # x0 = (x - sb out) / sa; eps = out
            p, q, a, e = 1 / sa, -sb / sa, 0.0, sb_prev
        elif cfg.prediction_type == "sample":  # x0 = out; eps = (x - sa out) / sb
            p, q, a, e = 0.0, 1.0, sb_prev / sb, -sb_prev * sa / sb
        elif cfg.prediction_type == "v_prediction":  # x0 = sa x - sb out; eps = sa out + sb x
            p, q, a, e = sa, -sb, sb_prev * sb, sb_prev * sa
        else:
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
        rows.append((p, q, a, sa_prev, 0.0, e))
    clip = float(cfg.clip_sample_range) if cfg.clip_sample and not cfg.thresholding else None
    if cfg.thresholding:
        raise ValueError("DDIM thresholding is not supported on the device sampler")
    return rows, clip


def _dpm_tables(sched) -> Tuple[list, Optional[float]]:
    """Per-step (P, Q, A, B, C, E) of ``DPMSolverMultistepScheduler.step`` for dpmsolver++ 2M
    (midpoint), including diffusers' first-order first and final steps."""
    cfg = sched.config
    if cfg.algorithm_type != "dpmsolver++" or cfg.solver_order != 2 or cfg.solver_type != "midpoint" or cfg.thresholding:
        raise ValueError("the device sampler supports DPM-Solver++ 2M (midpoint) without thresholding")
    sigmas = sched.sigmas.double().tolist()
    n = len(sched.timesteps)

    def alpha_sigma(s):  # diffusers' _sigma_to_alpha_sigma_t
        alpha = 1.0 / math.sqrt(s * s + 1.0)
        return alpha, s * alpha

    rows = []
    for i in range(n):
        alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        if cfg.prediction_type == "epsilon":
            p, q = 1 / alpha_s0, -sigma_s0 / alpha_s0
        elif cfg.prediction_type == "sample":
            p, q = 0.0, 1.0
        elif cfg.prediction_type == "v_prediction":
            p, q = alpha_s0, -sigma_s0
        else:
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
        # exp(-h) = exp(lambda_s0 - lambda_t) = (sigma_t / alpha_t) / (sigma_s0 / alpha_s0); 0 at sigma_t = 0.
        exp_neg_h = (sigma_t / alpha_t) / (sigma_s0 / alpha_s0)
        lower_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                      or cfg.final_sigmas_type == "zero")
        first = -(alpha_t * (exp_neg_h - 1.0))  # weight of D0 = x0
        if i == 0 or lower_final:
            rows.append((p, q, sigma_t / sigma_s0, first, 0.0, 0.0))
            continue
        alpha_s1, sigma_s1 = alpha_sigma(sigmas[i - 1])
        lam = lambda a, s: math.log(a) - math.log(s)
        h = lam(alpha_t, sigma_t) - lam(alpha_s0, sigma_s0)
        r0 = (lam(alpha_s0, sigma_s0) - lam(alpha_s1, sigma_s1)) / h
        # x_t = (sigma_t/sigma_s0) x + first * D0 + 0.5 * first * D1, D1 = (m0 - m1) / r0.
        half = 0.5 * first / r0
        rows.append((p, q, sigma_t / sigma_s0, first + half, -half, 0.0))
    return rows, None


class DeviceSampler:
    """diffusers' DDIM / DPM-Solver++ step as precomputed device tables (see the module docstring).

    Tables are built once per (kind, scheduler config, steps, clip, spacing, device) and cached;
    each loop gets its own small state (the previous x0)."""

    def __init__(self, kind: str, config, steps: int, device, clip_sample: bool = False,
                 timestep_spacing: str = "trailing"):
        self.device = torch.device(device)
        key = (kind, tuple(sorted(vars(config).items())), steps, clip_sample, timestep_spacing, str(self.device))
        tables = _TABLE_CACHE.get(key)
        if tables is None:
            sched = build_scheduler(kind, config, clip_sample, timestep_spacing)
            sched.set_timesteps(steps)
            rows, clip = (_ddim_tables if kind == "ddim" else _dpm_tables)(sched)
            coef = torch.tensor(rows, dtype=torch.float64).T.contiguous().to(torch.float32)
            tables = _Tables(sched.timesteps.to(torch.long).to(self.device), coef.to(self.device), clip)
            _TABLE_CACHE[key] = tables
        self.timesteps_device = tables.timesteps
        self._p, self._q, self._a, self._b, self._c, self._e = tables.coef.unbind(0)
        self._clip = tables.clip
        self._x0_prev: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.timesteps_device.shape[0]

    def timestep(self, i: int) -> torch.Tensor:
        return self.timesteps_device[i]

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One step; indexing a device table with a Python int is a view, so nothing syncs."""
        out = out.to(x.dtype)
        x0 = self._p[i] * x + self._q[i] * out
        if self._clip is not None:
            x0 = x0.clamp(-self._clip, self._clip)
        x_prev = self._a[i] * x + self._b[i] * x0 + self._e[i] * out
        if self._x0_prev is not None:
            x_prev = x_prev + self._c[i] * self._x0_prev
        self._x0_prev = x0
        return x_prev


def make_sampler(kind: str, config, steps: int, device, on_device: bool, clip_sample: bool = False,
                 timestep_spacing: str = "trailing"):
    """The sampler for one denoising loop: device tables (``on_device``) or diffusers' own step."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose from {', '.join(SCHEDULERS)}")
    cls = DeviceSampler if on_device else DiffusersSampler
    return cls(kind, config, steps, device, clip_sample, timestep_spacing)
