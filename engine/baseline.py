"""The video-UNet baseline of the paper's efficiency table: ModelScope text-to-video's UNet3D.

CMD (Table 9) compares against ModelScope T2V: a diffusers ``UNet3DConditionModel`` that denoises all
16 frame latents at every step. This module builds that network at its released size (random weights:
only its cost is measured) and runs the DDIM sampling loop with classifier-free guidance the way the
diffusers ModelScope pipeline does, so its FLOPs (``engine.flops``) and its latency and memory
(``benchmarks/paper_scale.py``) can be set beside CMD's at the same latent size and step count.

Layouts: the UNet3D works on (B, C, L, h, w); ``sample_baseline`` returns the engine's (B, L, C, h, w).
"""

import contextlib
from typing import Any, Dict, Optional

import torch
from diffusers import DDIMScheduler, UNet3DConditionModel

BASELINE_NAME = "ModelScope T2V UNet3D"

# damo-vilab/text-to-video-ms-1.7b, unet/config.json (diffusers 0.17 port of ModelScope T2V).
# Note the diffusers naming quirk (huggingface/diffusers#2011): UNet3DConditionModel reads
# ``attention_head_dim`` as the number of heads, so the spatial attentions run 64 heads of width
# 320/64 = 5 ... 1280/64 = 20. FLOPs do not depend on the head split; kernel speed does.
MODELSCOPE_UNET3D_CONFIG: Dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": 64,
}

# Its scheduler (scheduler/scheduler_config.json of the same repository): SD's scaled-linear betas.
MODELSCOPE_SCHEDULER_CONFIG: Dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

TEXT_TOKENS = 77  # ModelScope's OpenCLIP-H text encoder: 77 token states of width 1024
DEFAULT_GUIDANCE = 9.0  # the diffusers ModelScope pipeline's default


def build_baseline_unet(in_channels: int = 4, device=None, dtype: Optional[torch.dtype] = None,
                        **overrides) -> UNet3DConditionModel:
    """The ModelScope UNet3D with random weights, for latents of ``in_channels`` channels.
    ``overrides`` replace config entries (tests build a narrow one); ``device="meta"`` builds shapes only."""
    unknown = set(overrides) - set(MODELSCOPE_UNET3D_CONFIG)
    if unknown:
        raise ValueError(f"unknown UNet3D config keys: {sorted(unknown)}")
    kwargs = {**MODELSCOPE_UNET3D_CONFIG, "in_channels": in_channels, "out_channels": in_channels, **overrides}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        unet = UNet3DConditionModel(**kwargs)
    return unet.to(dtype=dtype) if dtype is not None else unet


def build_baseline_scheduler(**overrides) -> DDIMScheduler:
    return DDIMScheduler(**{**MODELSCOPE_SCHEDULER_CONFIG, **overrides})


def _downsampling(unet: UNet3DConditionModel) -> int:
    return 2 ** (len(unet.config.block_out_channels) - 1)


@torch.no_grad()
def sample_baseline(unet: UNet3DConditionModel, text_states: torch.Tensor, null_states: Optional[torch.Tensor],
                    num_frames: int, height: int, width: int, steps: int = 50,
                    guidance_scale: float = DEFAULT_GUIDANCE, scheduler: Optional[DDIMScheduler] = None,
                    generator: Optional[torch.Generator] = None, progress: bool = False) -> torch.Tensor:
    """DDIM sampling of video latents with classifier-free guidance, as the ModelScope pipeline does:
    each step runs the UNet once on the batch [unconditional; conditional] and mixes
    eps = eps_uncond + s * (eps_cond - eps_uncond).

    text_states (B, T, d) and null_states (B or 1, T, d): token states of the prompts and of the empty
    prompt; ``guidance_scale <= 1`` (or ``null_states=None``) runs the conditional branch alone.
    ``height``/``width`` are latent sizes. Returns latents (B, num_frames, C, height, width)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    down = _downsampling(unet)
    if height < 1 or width < 1 or height % down or width % down:
        raise ValueError(f"latent size {height}x{width} must be positive multiples of {down} "
                         f"(the UNet downsamples {len(unet.config.block_out_channels) - 1} times)")
    if text_states.dim() != 3 or text_states.shape[-1] != unet.config.cross_attention_dim:
        raise ValueError(f"text_states must be (B, T, {unet.config.cross_attention_dim}), "
                         f"got {tuple(text_states.shape)}")
    if null_states is not None and (null_states.dim() != 3 or null_states.shape[0] not in (1, text_states.shape[0])
                                    or null_states.shape[1:] != text_states.shape[1:]):
        raise ValueError(f"null_states must be (1 or {text_states.shape[0]}, {text_states.shape[1]}, "
                         f"{text_states.shape[2]}) like text_states, got {tuple(null_states.shape)}")
    guided = null_states is not None and guidance_scale > 1.0
    batch = text_states.shape[0]
    device, dtype = unet.device, unet.dtype
    scheduler = scheduler or build_baseline_scheduler()
    scheduler.set_timesteps(steps, device=device)

    states = text_states.to(device, dtype)
    if guided:
        # One UNet call per step on [uncond; cond], the CFG batch (as diffusers' pipelines do).
        states = torch.cat([null_states.to(device, dtype).expand(batch, -1, -1), states])
    shape = (batch, unet.config.in_channels, num_frames, height, width)
    latents = torch.randn(shape, generator=generator, device=generator.device if generator else device,
                          dtype=torch.float32).to(device) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm  # only when asked: the GPU machines need not have it

        timesteps = tqdm(timesteps, desc="UNet3D")
    for t in timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t).to(dtype)
        eps = unet(model_in, t, encoder_hidden_states=states).sample.float()
        if guided:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        # The scheduler's update runs in fp32 (the latents stay fp32 between steps).
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents.permute(0, 2, 1, 3, 4).contiguous()
