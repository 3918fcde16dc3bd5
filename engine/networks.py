"""The networks the engine runs as separate graphs (ONNX Runtime sessions, TensorRT plans).

One class per network declares, in one place, what both sides need: input and output names, the
symbolic axes of each tensor (which become the graph's dynamic axes), a sample input, and the
min/opt/max shape profile of each shape bucket. ``export/`` builds graphs from these declarations
and ``engine/backends/`` runs them, so the two can never disagree on a name or a shape. The folders
the graphs and plans are written to (their manifests, weight hashes, default locations) are
:mod:`engine.artefacts`.

Networks of one model (``networks_for(config)``)::

    text_encoder   input_ids, attention_mask (batch, tokens) int64     -> states (batch, tokens, d), pooled (batch, d)
    content_unet   sample (batch, C, h, w), timestep (batch,), states  -> eps (batch, C, h, w)       CFG batch
    motion_dit     motion (batch, D, L, N), timestep, content, text    -> eps (batch, D, L, N)       CFG batch
    ae_decoder     content (batch, C, h, w), motion (batch, D, L, N)   -> frames (batch, L, C, h, w)
    vae_decoder    latents (batch, c, h, w)                            -> images (batch, 3, 8h, 8w)  latent mode

(h, w: the content frame's size, H/vae_scale; N = h/p + w/p, the motion latent's two planes.)
Timesteps are float32 in every graph (exact for integer timesteps; what TensorRT handles best).

Shape buckets are the clip sizes (frames x height x width, in pixels) a model serves: the config's
``sizes`` (:mod:`engine.geometry`), or a subset of them. An axis is dynamic in the graphs only when its
size changes across buckets or with the batch, so a one-bucket model gets graphs with a dynamic batch
and static everything else (more constant folding, simpler TensorRT profiles).

What graphs or plans can run is checked before a request runs (:func:`check_calls`): the pipeline
lists each network call of a request (:class:`NetworkCall`: size and batch) and the backend checks
them against its graphs' buckets and batch ranges.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from engine.configs import CMDConfig
from engine.geometry import ClipSize, check_fits, format_sizes

# Videos per call a graph is built for (its CFG networks see twice that).
DEFAULT_MAX_BATCH = 4
# Timesteps the sample inputs draw from (any value the schedulers produce).
_SAMPLE_TIMESTEPS = 1000
# Token ids the sample inputs draw from: inside every tokenizer's vocabulary we use.
_SAMPLE_VOCAB = 1000


# A shape bucket is a clip size a model serves (engine.geometry): the graphs hold one profile per bucket.
ShapeBucket = ClipSize


def shape_buckets(cfg: CMDConfig) -> List[ClipSize]:
    """The buckets of a config: the sizes it serves (its ``sizes``; by default its own size)."""
    return cfg.served_sizes


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name, one symbol per axis and its element type.

    ``dtype`` is "float" (the graph's precision), "float32" (always fp32) or "int64"."""

    name: str
    axes: Tuple[str, ...]
    dtype: str = "float"

    def torch_dtype(self, precision: torch.dtype) -> torch.dtype:
        return {"float": precision, "float32": torch.float32, "int64": torch.int64}[self.dtype]


@dataclass(frozen=True)
class Profile:
    """The min/opt/max shape of every input for one bucket (a TensorRT optimisation profile)."""

    bucket: ClipSize
    min: Dict[str, Tuple[int, ...]]
    opt: Dict[str, Tuple[int, ...]]
    max: Dict[str, Tuple[int, ...]]

    def to_dict(self) -> Dict:
        return {"bucket": str(self.bucket), "min": {k: list(v) for k, v in self.min.items()},
                "opt": {k: list(v) for k, v in self.opt.items()}, "max": {k: list(v) for k, v in self.max.items()}}

    def contains(self, shapes: Dict[str, Tuple[int, ...]]) -> bool:
        """True if every input shape lies within [min, max] of this profile."""
        return all(len(s) == len(self.min[n]) and all(lo <= v <= hi for lo, v, hi in zip(self.min[n], s, self.max[n]))
                   for n, s in shapes.items())


class Network:
    """Base class. A subclass sets ``name``, ``inputs``, ``outputs``, its batch range and the sizes of
    its axis symbols, and builds the module to export from a :class:`engine.models.CMDModel`."""

    name: str = ""
    inputs: Tuple[TensorSpec, ...] = ()
    outputs: Tuple[TensorSpec, ...] = ()

    def __init__(self, config: CMDConfig, buckets: Optional[Sequence[ClipSize]] = None,
                 max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.config = config
        self.buckets = list(buckets) if buckets is not None else shape_buckets(config)
        if not self.buckets:
            raise ValueError(f"network {self.name}: no shape buckets")
        for bucket in self.buckets:
            check_fits(config, bucket)
        self.max_batch = max_batch

    # -- what subclasses declare ---------------------------------------------------------------
    def batch_range(self) -> Tuple[int, int, int]:
        """(min, opt, max) of the batch axis."""
        raise NotImplementedError

    def axis_sizes(self, bucket: ClipSize) -> Dict[str, int]:
        """Size of every axis symbol except ``batch`` for a bucket."""
        raise NotImplementedError

    def module(self, model, text_encoder=None) -> nn.Module:
        """The module to export: its forward takes the inputs in declaration order."""
        raise NotImplementedError

    # -- derived: shapes, dynamic axes, profiles, sample inputs ---------------------------------
    @property
    def input_names(self) -> List[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> List[str]:
        return [t.name for t in self.outputs]

    def shape(self, spec: TensorSpec, bucket: ClipSize, batch: int) -> Tuple[int, ...]:
        sizes = dict(self.axis_sizes(bucket), batch=batch)
        return tuple(sizes[a] for a in spec.axes)

    def input_shapes(self, bucket: ClipSize, batch: int) -> Dict[str, Tuple[int, ...]]:
        return {t.name: self.shape(t, bucket, batch) for t in self.inputs}

    def output_shapes(self, bucket: ClipSize, batch: int) -> Dict[str, Tuple[int, ...]]:
        return {t.name: self.shape(t, bucket, batch) for t in self.outputs}

    def dynamic_symbols(self) -> List[str]:
        """Axis symbols whose size changes with the batch or across this network's buckets."""
        used = {a for t in self.inputs + self.outputs for a in t.axes}
        sizes = [self.axis_sizes(b) for b in self.buckets]
        varying = sorted(s for s in sizes[0] if s in used and len({sz[s] for sz in sizes}) > 1)
        lo, _, hi = self.batch_range()
        return (["batch"] if hi > lo else []) + varying

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """``{tensor name: {axis index: symbol}}`` for inputs and outputs (torch.onnx's format)."""
        dynamic = set(self.dynamic_symbols())
        return {t.name: {i: a for i, a in enumerate(t.axes) if a in dynamic}
                for t in self.inputs + self.outputs}

    def profiles(self) -> List[Profile]:
        """One optimisation profile per bucket: the batch spans the batch range, the rest is fixed."""
        lo, opt, hi = self.batch_range()
        return [Profile(b, self.input_shapes(b, lo), self.input_shapes(b, opt), self.input_shapes(b, hi))
                for b in self.buckets]

    def find_bucket(self, shapes: Dict[str, Tuple[int, ...]]) -> ClipSize:
        """The bucket these input shapes belong to, whatever their batch; a ValueError naming them if none.
        (Every input's first axis is the batch.)"""
        batch = tuple(shapes[self.inputs[0].name])[0]
        for bucket in self.buckets:
            if all(tuple(shapes[t.name]) == self.shape(t, bucket, batch) for t in self.inputs):
                return bucket
        raise ValueError(f"{self.name}: input shapes {shapes} fit no shape bucket of these graphs "
                         f"({', '.join(map(str, self.buckets))}); export with --bucket FRAMESxHEIGHTxWIDTH for this size")

    def find_profile(self, shapes: Dict[str, Tuple[int, ...]]) -> int:
        """Index of the first profile that holds these input shapes; a ValueError naming them if none."""
        for i, profile in enumerate(self.profiles()):
            if profile.contains(shapes):
                return i
        lo, _, hi = self.batch_range()
        raise ValueError(f"{self.name}: input shapes {shapes} fit no shape bucket of this model "
                         f"(buckets {', '.join(map(str, self.buckets))}, batch {lo}..{hi})")

    def sample_inputs(self, bucket: Optional[ClipSize] = None, batch: Optional[int] = None,
                      dtype: torch.dtype = torch.float32, device="cpu",
                      generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Random inputs of the right shapes and types (default: first bucket, opt batch). Floats are
        standard normal; timesteps random training timesteps; token masks keep 1..T tokens."""
        bucket = bucket or self.buckets[0]
        batch = batch or self.batch_range()[1]
        gen = generator or torch.Generator().manual_seed(0)
        out = {}
        for spec in self.inputs:
            shape = self.shape(spec, bucket, batch)
            if spec.name == "timestep":
                value = torch.randint(0, _SAMPLE_TIMESTEPS, shape, generator=gen).float()
            elif spec.name == "input_ids":
                value = torch.randint(0, _SAMPLE_VOCAB, shape, generator=gen)
            elif spec.name == "attention_mask":
                lengths = torch.randint(1, shape[1] + 1, (shape[0],), generator=gen)
                lengths[0] = shape[1]  # one full row: every position is exercised
                value = (torch.arange(shape[1])[None] < lengths[:, None]).long()
            else:
                value = torch.randn(shape, generator=gen)
            out[spec.name] = value.to(device=device, dtype=spec.torch_dtype(dtype))
        return out

    def to_dict(self) -> Dict:
        """The declaration as JSON data (written into the export manifest)."""
        return {
            "inputs": [{"name": t.name, "axes": list(t.axes), "dtype": t.dtype} for t in self.inputs],
            "outputs": [{"name": t.name, "axes": list(t.axes), "dtype": t.dtype} for t in self.outputs],
            "dynamic_axes": {n: {str(i): a for i, a in axes.items()} for n, axes in self.dynamic_axes().items()},
            "batch_range": list(self.batch_range()),
            "profiles": [p.to_dict() for p in self.profiles()],
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.name!r}, buckets=[{', '.join(map(str, self.buckets))}])"

    # -- helpers for subclasses ------------------------------------------------------------------
    def _content_sizes(self, bucket: ClipSize) -> Dict[str, int]:
        cfg = self.config
        geo = cfg.geometry(bucket)
        return {"channels": geo.channels, "height": geo.latent_height, "width": geo.latent_width,
                "frames": geo.frames, "motion_dim": geo.motion_dim, "motion_len": geo.motion_length,
                "tokens": cfg.text_encoder.max_length, "text_dim": cfg.text_encoder.hidden_size}


class TextEncoderNet(Network):
    """Token ids and mask -> token states (UNet cross-attention) and the masked-mean pooled vector (DiT).
    The tokenizer stays outside the graph. Batch: prompts and negative prompts together."""

    name = "text_encoder"
    inputs = (TensorSpec("input_ids", ("batch", "tokens"), "int64"),
              TensorSpec("attention_mask", ("batch", "tokens"), "int64"))
    outputs = (TensorSpec("states", ("batch", "tokens", "text_dim"), "float"),
               TensorSpec("pooled", ("batch", "text_dim"), "float"))

    def batch_range(self):
        return 1, 2, 2 * self.max_batch

    def axis_sizes(self, bucket):
        return self._content_sizes(bucket)

    def module(self, model, text_encoder=None):
        if text_encoder is None or not isinstance(text_encoder.encoder, nn.Module):
            raise ValueError("the text_encoder network needs a PyTorch text encoder (engine.models.TextEncoder or "
                             "engine.random_text.RandomTextEncoder)")
        return text_encoder.encoder  # engine.models.text.TokenEncoder: the transformers model and the pooling


class ContentUNetNet(Network):
    """One content-UNet evaluation on the classifier-free-guidance batch (conditional half first)."""

    name = "content_unet"
    inputs = (TensorSpec("sample", ("batch", "channels", "height", "width")),
              TensorSpec("timestep", ("batch",), "float32"),
              TensorSpec("states", ("batch", "tokens", "text_dim")))
    outputs = (TensorSpec("eps", ("batch", "channels", "height", "width")),)

    def batch_range(self):
        return 1, 2, 2 * self.max_batch

    def axis_sizes(self, bucket):
        return self._content_sizes(bucket)

    def module(self, model, text_encoder=None):
        return UNetStep(model.content_unet)


class MotionDiTNet(Network):
    """One motion-DiT evaluation on the CFG batch (text = [pooled ; null text], content in both halves)."""

    name = "motion_dit"
    inputs = (TensorSpec("motion", ("batch", "motion_dim", "frames", "motion_len")),
              TensorSpec("timestep", ("batch",), "float32"),
              TensorSpec("content", ("batch", "channels", "height", "width")),
              TensorSpec("text", ("batch", "text_dim")))
    outputs = (TensorSpec("eps", ("batch", "motion_dim", "frames", "motion_len")),)

    def batch_range(self):
        return 1, 2, 2 * self.max_batch

    def axis_sizes(self, bucket):
        return self._content_sizes(bucket)

    def module(self, model, text_encoder=None):
        return DiTStep(model.motion_dit)


class AEDecoderNet(Network):
    """The CMD autoencoder's decoder: content frame + motion latent -> frames (VAE latents in latent mode)."""

    name = "ae_decoder"
    inputs = (TensorSpec("content", ("batch", "channels", "height", "width")),
              TensorSpec("motion", ("batch", "motion_dim", "frames", "motion_len")))
    outputs = (TensorSpec("frames", ("batch", "frames", "channels", "height", "width")),)

    def batch_range(self):
        return 1, 1, self.max_batch

    def axis_sizes(self, bucket):
        return self._content_sizes(bucket)

    def module(self, model, text_encoder=None):
        return AEDecode(model.autoencoder)


class VAEDecoderNet(Network):
    """Latent mode: the image VAE's decoder on a chunk of frames, scaled latents -> RGB in [-1, 1]."""

    name = "vae_decoder"
    inputs = (TensorSpec("latents", ("batch", "channels", "height", "width")),)
    outputs = (TensorSpec("images", ("batch", "rgb", "image_height", "image_width")),)

    def batch_range(self):
        from engine.models.vae import VAE_CHUNK  # here: engine.models.vae imports diffusers

        return 1, VAE_CHUNK, VAE_CHUNK

    def axis_sizes(self, bucket):
        sizes = self._content_sizes(bucket)
        sizes.update(rgb=3, image_height=bucket.height, image_width=bucket.width)
        return sizes

    def module(self, model, text_encoder=None):
        if model.vae is None:
            raise ValueError(f"config {self.config.name!r} is in pixel space: it has no vae_decoder")
        return VAEDecode(model.vae)


NETWORK_CLASSES = {cls.name: cls for cls in (TextEncoderNet, ContentUNetNet, MotionDiTNet, AEDecoderNet, VAEDecoderNet)}


@dataclass(frozen=True)
class NetworkCall:
    """The calls one request makes into one network: the clip size and the largest batch.
    ``batch_note`` says where that batch comes from, for error messages (e.g. "3 prompts x 2 videos,
    x 2 for guidance")."""

    network: str
    size: ClipSize
    batch: int
    batch_note: str = ""


def check_calls(networks: Dict[str, Network], calls: Sequence[NetworkCall], source: str) -> None:
    """Check, before anything runs, that graphs or plans built from these declarations (``source`` names
    them, e.g. "the graphs in 'onnx/default'") can run every call: the network is there, the clip size
    gives the input shapes of one of its buckets, and the batch lies in its batch range. A one-line
    ValueError naming the first that cannot, and how to export for it."""
    for call in calls:
        net = networks.get(call.network)
        if net is None:
            raise ValueError(f"{source} hold no {call.network} network, which this request needs; export it "
                             "(python -m export onnx --model MODEL) and build again")
        shapes = net.input_shapes(call.size, call.batch)
        if not any(net.input_shapes(bucket, call.batch) == shapes for bucket in net.buckets):
            raise ValueError(f"clip size {call.size} is outside {source}: their {net.name} network was built for "
                             f"{format_sizes(net.buckets)}; export with --bucket {call.size} for this size")
        lo, _, hi = net.batch_range()
        if not lo <= call.batch <= hi:
            note = f" ({call.batch_note})" if call.batch_note else ""
            raise ValueError(f"{source} run {net.name} on batches of {lo} to {hi}, this request needs "
                             f"{call.batch}{note}; make fewer videos per call (prompts x videos per prompt x motion "
                             f"variations: at most {net.max_batch}) or export with a larger --max-batch")


def networks_for(config: CMDConfig, buckets: Optional[Sequence[ClipSize]] = None,
                 max_batch: int = DEFAULT_MAX_BATCH, names: Optional[Sequence[str]] = None) -> List[Network]:
    """Every network of a model (the VAE decoder only in latent mode), or those named in ``names``."""
    available = [n for n in NETWORK_CLASSES if n != "vae_decoder" or config.space == "latent"]
    if names is not None:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown network {unknown[0]!r} for config {config.name!r}; choose from "
                             f"{', '.join(available)}")
        available = [n for n in available if n in names]
    return [NETWORK_CLASSES[n](config, buckets, max_batch) for n in available]


# -- the modules that get exported: thin wrappers with positional tensor inputs -------------------
class UNetStep(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]


class DiTStep(nn.Module):
    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, motion, timestep, content, text) -> torch.Tensor:
        return self.dit(motion, timestep, content, text)


class AEDecode(nn.Module):
    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(content, motion)


class VAEDecode(nn.Module):
    """Scaled latents (as the AE works with them) -> RGB; the 1/scaling_factor is part of the graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.inverse_scale = 1.0 / vae.config.scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents * self.inverse_scale, return_dict=False)[0]
