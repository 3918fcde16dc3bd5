"""Sampling schedulers for the two denoising loops: DDIM and DPM-Solver++ (2M), both as diffusers'
``DPMSolverMultistepScheduler``.

DDIM (eta = 0) *is* the first-order DPM-Solver++ (Lu et al., "DPM-Solver++", 2022, section 4: the
first-order solver in data-prediction form is DDIM), so ``"ddim"`` is that scheduler configured with
``solver_order=1`` and ``"dpm"`` the same scheduler with ``solver_order=2``. We do not use diffusers'
``DDIMScheduler``: its step derives the previous timestep as ``t - T // steps`` instead of reading its
own timestep table, so at step counts that do not divide T (7 of 1000) with "trailing" spacing every
step lands on a noise level other than the next timestep's and the last one stops at t = 0 instead of
the clean sample (error 3e-2 with a perfect model). ``DPMSolverMultistepScheduler`` walks its own sigma
table, whose last entry is 0 (``final_sigmas_type="zero"``), for every spacing.

Bounded data (``SchedulerConfig.clip_sample``: pixel content frames and the tanh-bounded motion latent
live in [-1, 1]; SD latents do not): every x0 prediction is clamped to [-1, 1]. That is diffusers'
``thresholding=True`` with ``sample_max_value=1.0``: the dynamic threshold s is clamped to [1, 1], which
is Imagen's static thresholding, a plain clip (Saharia et al. 2022, section 2.3).

Two ways to run the same scheduler:

- :class:`DiffusersSampler` calls diffusers' own ``scheduler.step`` (the reference; the eager, compile
  and onnxruntime backends use it).
- :class:`DeviceSampler` precomputes the scheduler's per-step coefficients once per (scheduler, steps,
  device) as small device tensors, so a step is a few elementwise ops on the device and never waits on
  the host (CUDA graphs, TensorRT: no host syncs in the loop). Every step of both schedulers is

      x0     = clip(P[i] * x + Q[i] * out)                    # model output -> predicted x0
      x_prev = A[i] * x + B[i] * x0 + C[i] * x0_prev

  where ``x0_prev`` is the previous step's x0 (DPM-Solver++ 2M's second-order term) and ``out`` is the
  (guided) model output. The coefficients come from the scheduler's own sigma table, formula by formula;
  ``tests/engine/test_pipeline_schedulers.py`` checks both against each other and against a perfect model.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

SCHEDULERS = ("ddim", "dpm")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
_ORDER = {"ddim": 1, "dpm": 2}


def build_scheduler(kind: str, config, clip_sample: Optional[bool] = None, timestep_spacing: str = "trailing"):
    """A fresh diffusers ``DPMSolverMultistepScheduler`` for ``kind`` ("ddim": first order, "dpm": 2M) from an
    ``engine.configs.SchedulerConfig`` (training betas and prediction type).

    ``clip_sample``: clamp every predicted x0 to [-1, 1]; None takes ``config.clip_sample``.
    ``timestep_spacing``: "trailing" (default; starts at the last training timestep, which keeps few-step
    sampling honest: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    table 2), "linspace" or "leading". Raises ValueError for an unknown kind or spacing."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose from {', '.join(SCHEDULERS)}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose from {', '.join(TIMESTEP_SPACINGS)}")
    from diffusers import DPMSolverMultistepScheduler

    clip = bool(getattr(config, "clip_sample", False) if clip_sample is None else clip_sample)
    return DPMSolverMultistepScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start, beta_end=config.beta_end,
        beta_schedule=config.beta_schedule, prediction_type=config.prediction_type,
        timestep_spacing=timestep_spacing, algorithm_type="dpmsolver++", solver_order=_ORDER[kind],
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
        thresholding=clip, sample_max_value=1.0)


class DiffusersSampler:
    """Runs diffusers' ``scheduler.step`` (stateful: one instance per denoising loop).

    Timesteps stay on the CPU, so diffusers' table look-ups need no device sync either."""

    def __init__(self, kind: str, config, steps: int, device, clip_sample: Optional[bool] = None,
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
        """Step i: model output ``out`` at sample ``x`` (same shape) -> the sample at step i + 1."""
        return self.scheduler.step(out, self._timesteps[i], x, return_dict=False)[0]


@dataclass
class _Tables:
    timesteps: torch.Tensor  # (S,) long
    coef: torch.Tensor  # (5, S) float32: P, Q, A, B, C
    clip: Optional[float]
    second_order: bool  # False for DDIM (order 1): no step reads the previous x0


_TABLE_CACHE: Dict[Tuple, _Tables] = {}


def scheduler_tables(sched) -> Tuple[list, Optional[float]]:
    """Per-step (P, Q, A, B, C) of ``DPMSolverMultistepScheduler.step`` for dpmsolver++ of order 1 (DDIM)
    or 2 (midpoint), including diffusers' first-order first and final steps, from the scheduler's own
    sigma table (so step i always lands on sigma[i + 1]; the last is 0); and the x0 clip (1.0 or None)."""
    cfg = sched.config
    supported = (cfg.algorithm_type == "dpmsolver++" and cfg.solver_order in (1, 2) and cfg.solver_type == "midpoint"
                 and (not cfg.thresholding or cfg.sample_max_value == 1.0) and not cfg.use_karras_sigmas
                 and not getattr(cfg, "use_lu_lambdas", False) and not getattr(cfg, "use_flow_sigmas", False))
    if not supported:
        raise ValueError("the device sampler supports DPM-Solver++ of order 1 or 2 (midpoint), clipped to [-1, 1] "
                         "or not, on the training sigmas")
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
        if cfg.solver_order == 1 or i == 0 or lower_final:
            rows.append((p, q, sigma_t / sigma_s0, first, 0.0))
            continue
        alpha_s1, sigma_s1 = alpha_sigma(sigmas[i - 1])
        lam = lambda a, s: math.log(a) - math.log(s)
        h = lam(alpha_t, sigma_t) - lam(alpha_s0, sigma_s0)
        r0 = (lam(alpha_s0, sigma_s0) - lam(alpha_s1, sigma_s1)) / h
        # x_t = (sigma_t/sigma_s0) x + first * D0 + 0.5 * first * D1, D1 = (m0 - m1) / r0.
        half = 0.5 * first / r0
        rows.append((p, q, sigma_t / sigma_s0, first + half, -half))
    return rows, (1.0 if cfg.thresholding else None)


class DeviceSampler:
    """The same scheduler as :class:`DiffusersSampler`, as precomputed device tables (see the module docstring).

    Tables are built once per (kind, scheduler config, steps, clip, spacing, device) and cached;
    each loop gets its own small state (the previous x0)."""

    def __init__(self, kind: str, config, steps: int, device, clip_sample: Optional[bool] = None,
                 timestep_spacing: str = "trailing"):
        self.device = torch.device(device)
        key = (kind, tuple(sorted(vars(config).items())), steps, clip_sample, timestep_spacing, str(self.device))
        tables = _TABLE_CACHE.get(key)
        if tables is None:
            sched = build_scheduler(kind, config, clip_sample, timestep_spacing)
            sched.set_timesteps(steps)
            rows, clip = scheduler_tables(sched)
            coef = torch.tensor(rows, dtype=torch.float64).T.contiguous().to(torch.float32)
            tables = _Tables(sched.timesteps.to(torch.long).to(self.device), coef.to(self.device), clip,
                             any(row[4] != 0.0 for row in rows))
            _TABLE_CACHE[key] = tables
        self.timesteps_device = tables.timesteps
        self._p, self._q, self._a, self._b, self._c = tables.coef.unbind(0)
        self._clip = tables.clip
        self._second_order = tables.second_order
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
        x_prev = self._a[i] * x + self._b[i] * x0
        if self._second_order and self._x0_prev is not None:
            x_prev = x_prev + self._c[i] * self._x0_prev
        self._x0_prev = x0
        return x_prev


def make_sampler(kind: str, config, steps: int, device, on_device: bool, clip_sample: Optional[bool] = None,
                 timestep_spacing: str = "trailing"):
    """The sampler for one denoising loop: device tables (``on_device``) or diffusers' own step.
    ``clip_sample`` None takes the config's ``clip_sample``."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose from {', '.join(SCHEDULERS)}")
    cls = DeviceSampler if on_device else DiffusersSampler
    return cls(kind, config, steps, device, clip_sample, timestep_spacing)
