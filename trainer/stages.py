"""The three training stages: what each trains, what it feeds the network and its loss.

    autoencoder  stage 1: video -> CMDAutoencoder -> video; L1 (+ MSE) reconstruction (DESIGN 3.1)
    content      stage 2a: content frames xbar of the frozen encoder -> UNet2DConditionModel;
                 epsilon (or v) objective, text dropout to the empty prompt "" for CFG (DESIGN 3.2)
    motion       stage 2b: (z, xbar) pairs of the frozen encoder -> MotionDiT conditioned on the clean xbar
                 and the pooled text; text dropout through ``drop_text`` (DESIGN 3.3)

A stage splits a step into ``prepare`` (no gradients, deterministic: frozen encoders, caches) and ``loss``
(the trained network; every random draw comes from the generator it is given, so a resumed run repeats
the uninterrupted one exactly).
"""

import dataclasses
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler

from engine.configs import TrainConfig
from engine.models import CMDModel
from engine.models.vae import encode_frames

TRAINING_STAGES = ("autoencoder", "content", "motion")
NETWORK_OF = {"autoencoder": "autoencoder", "content": "content_unet", "motion": "motion_dit"}


def noise_scheduler(section) -> DDPMScheduler:
    """The training noise schedule of a config section (``SchedulerConfig``) as a diffusers scheduler."""
    kwargs = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    if kwargs.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {kwargs['prediction_type']!r}")
    return DDPMScheduler(**kwargs)


class Stage:
    """Base: the model bundle, this stage's hyper-parameters and the device."""

    name = ""

    def __init__(self, model: CMDModel, hparams: Dict[str, Any], device: torch.device, text=None,
                 amp: bool = False):
        self.model = model
        self.amp = amp  # bf16 autocast for the frozen encoders too
        self.cfg = model.config
        self.hparams = hparams
        self.device = device
        self.text = text  # trainer.text_cache.CaptionEmbeddings, for the text-conditioned stages
        for name in ("autoencoder", "motion_dit", "content_unet", "vae"):
            net = getattr(model, name)
            if net is not None:
                net.to(device).eval().requires_grad_(False)
        self.network.train().requires_grad_(True)

    @property
    def network_name(self) -> str:
        return NETWORK_OF[self.name]

    @property
    def network(self) -> nn.Module:
        return getattr(self.model, self.network_name)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def ae_input(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels (B, L, 3, H, W) -> what the AE sees: the pixels, or per-frame VAE latents (latent mode).
        Latents use the posterior mean, so they are deterministic (and cacheable)."""
        video = video.to(self.device, non_blocking=True)
        if self.cfg.space == "latent":
            with self.autocast():
                return encode_frames(self.model.vae, video).float()
        return video

    def prepare(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, net: nn.Module, inputs: Dict[str, torch.Tensor], generator: torch.Generator
             ) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError


class AutoencoderStage(Stage):
    name = "autoencoder"

    def __init__(self, model, hparams, device, text=None, amp: bool = False):
        super().__init__(model, hparams, device, text, amp)
        if hparams.get("freeze_encoder"):  # decoder fine-tuning: the encodings stay those of --init
            for module in self.network.encoder_modules():
                module.requires_grad_(False)

    def prepare(self, batch):
        if "latents" in batch:  # latent mode with a latent cache: the VAE already ran
            return {"video": batch["latents"].to(self.device).float()}
        return {"video": self.ae_input(batch["video"])}

    def loss(self, net, inputs, generator):
        video = inputs["video"]
        recon = net(video).float()
        l1 = (recon - video).abs().mean()
        mse = (recon - video).pow(2).mean()
        loss = self.hparams["l1_weight"] * l1 + self.hparams["mse_weight"] * mse
        return loss, {"l1": l1.item(), "mse": mse.item()}


class _DiffusionStage(Stage):
    """Shared by the content and motion stages: the frozen encoder's (xbar, z), optionally cached per
    clip (its index, or (index, size) in a mixed-size run; for data sets whose item i never changes, like the
    synthetic one), and the noising."""

    scheduler_section = ""

    def __init__(self, model, hparams, device, text=None, amp: bool = False, cache_encodings: bool = False):
        super().__init__(model, hparams, device, text, amp)
        if text is None:
            raise ValueError(f"the {self.name} stage needs caption embeddings")
        self.scheduler = noise_scheduler(getattr(self.cfg, self.scheduler_section))
        self.prediction_type = self.scheduler.config.prediction_type
        self.cache_encodings = cache_encodings
        self._encoded: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(xbar (B, C, H, W), z (B, D, L, H'+W')) of the frozen AE encoder, float32."""
        indices = batch.get("index")
        if not self.cache_encodings or indices is None:
            return self._encode(batch)
        # A clip's key: its index, or (index, size) when a run trains at several sizes (trainer.train.Indexed).
        indices = [tuple(key) if isinstance(key, (tuple, list)) else int(key)
                   for key in batch.get("key", [int(i) for i in indices])]
        for k, i in enumerate(indices):
            if i in self._encoded:
                continue
            # One clip at a time: its encoding must not depend on the batch it first came in (a resumed run
            # re-encodes in other company; matmul blocking can change with the batch size). Cached on the CPU
            # in fp16 (half the memory); the cached value is what every epoch sees, the first included.
            c, m = self._encode({key: batch[key][k:k + 1] for key in ("video", "latents") if key in batch})
            self._encoded[i] = (c[0].to("cpu", torch.float16), m[0].to("cpu", torch.float16))
        content = torch.stack([self._encoded[i][0] for i in indices]).to(self.device).float()
        motion = torch.stack([self._encoded[i][1] for i in indices]).to(self.device).float()
        return content, motion

    def _encode(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        x = batch["latents"].to(self.device).float() if "latents" in batch else self.ae_input(batch["video"])
        with self.autocast():
            content, motion = self.model.autoencoder.encode(x)
        return content.float(), motion.float()

    def noised(self, x0: torch.Tensor, generator: torch.Generator):
        """(x_t, t, target) for uniformly drawn timesteps."""
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator,
                          device=generator.device).to(self.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(self.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        return x_t, t, target

    def drop_mask(self, b: int, p: float, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(b, generator=generator, device=generator.device) < p).to(self.device)


class ContentStage(_DiffusionStage):
    name = "content"
    scheduler_section = "content_scheduler"

    def prepare(self, batch):
        content, _ = self.encode(batch)
        states, _ = self.text(batch["caption"])
        return {"content": content, "states": states, "null_states": self.null_states(len(states))}

    def null_states(self, b: int) -> torch.Tensor:
        """The unconditional branch is the encoding of the empty prompt, as the engine's CFG uses."""
        states, _ = self.text([""])
        return states.expand(b, -1, -1)

    def loss(self, net, inputs, generator):
        x0, states = inputs["content"], inputs["states"]
        x_t, t, target = self.noised(x0, generator)
        drop = self.drop_mask(x0.shape[0], self.hparams["text_dropout"], generator)
        states = torch.where(drop[:, None, None], inputs["null_states"], states)
        pred = net(x_t, t, encoder_hidden_states=states).sample.float()
        return F.mse_loss(pred, target), {}


class MotionStage(_DiffusionStage):
    name = "motion"
    scheduler_section = "motion_scheduler"

    def prepare(self, batch):
        content, motion = self.encode(batch)
        _, pooled = self.text(batch["caption"])
        return {"content": content, "motion": motion, "pooled": pooled}

    def loss(self, net, inputs, generator):
        z0, content, pooled = inputs["motion"], inputs["content"], inputs["pooled"]
        z_t, t, target = self.noised(z0, generator)
        drop = self.drop_mask(z0.shape[0], self.hparams["text_dropout"], generator)
        pred = net(z_t, t, content, text=pooled, drop_text=drop).float()
        return F.mse_loss(pred, target), {}


def make_stage(name: str, model: CMDModel, hparams: Dict[str, Any], device: torch.device, text=None,
               amp: bool = False, cache_encodings: bool = False) -> Stage:
    """``hparams``: the stage's training hyper-parameters (``train.<stage>`` of the config); keys left out
    take their defaults (:class:`engine.configs.StageTrainConfig`). ``amp``: bf16 autocast in the frozen
    encoders; ``cache_encodings``: keep (xbar, z) per clip index."""
    if name in TRAINING_STAGES:
        hparams = dict(dataclasses.asdict(TrainConfig().stage(name)), **hparams)
    if name == "autoencoder":
        return AutoencoderStage(model, hparams, device, text, amp)
    if name == "content":
        return ContentStage(model, hparams, device, text, amp, cache_encodings)
    if name == "motion":
        return MotionStage(model, hparams, device, text, amp, cache_encodings)
    raise ValueError(f"unknown stage {name!r}; choose from {TRAINING_STAGES}")
