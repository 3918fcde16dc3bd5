"""Clip geometry: the one place that turns a clip size into the shapes every network sees, and the
rule for which sizes a model serves.

A clip size is frames x height x width in pixels (:class:`ClipSize`, written ``16x32x32``). For a
config, a size fits the networks when (DESIGN 3)

- height and width are multiples of the **size step** (:func:`size_step`): the AE patch p times the
  DiT's motion patch (so that H' + W' splits into DiT patches), the DiT's content patch and the content
  UNet's downsampling, in latent pixels, times the image VAE's factor;
- frames are a multiple of the **frame step** (:func:`frame_step`), the DiT's patch along time.

:class:`ClipGeometry` derives everything else from the size: the content frame (C, h, w) with
h = H / vae_scale, the AE's patch grid H' = h / p and W' = w / p, the motion latent (D, L, H' + W'),
and the token counts of the motion DiT (motion and content tokens) and of the AE decoder. The pipeline,
the network declarations (export), the FLOP counts and the benchmarks all read shapes from here.

Which sizes a model **serves** is config data: the config's ``sizes`` list (``"FxHxW"`` strings; by
default its own size ``num_frames x height x width``). A model should declare only sizes it was
evaluated at (``python -m trainer.evaluate --size FxHxW``). A request may also ask for fewer frames
than a served size has: those are the first frames of a clip generated at the smallest served length
that holds them (:func:`resolve_size`), so they are exactly what the evaluation measured.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # configs imports this module
    from engine.configs import CMDConfig


@dataclass(frozen=True, order=True)
class ClipSize:
    """One clip size: frames x height x width, in pixels (frames of the video, not of a latent)."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> "ClipSize":
        """``"16x32x32"`` -> ClipSize(16, 32, 32); a one-line ValueError naming the text otherwise."""
        try:
            frames, height, width = (int(v) for v in str(text).lower().split("x"))
        except ValueError:
            raise ValueError(f"a clip size is FRAMESxHEIGHTxWIDTH, e.g. 16x32x32, got {text!r}") from None
        return cls(frames, height, width)

    @classmethod
    def coerce(cls, value: Union["ClipSize", str, Sequence[int]]) -> "ClipSize":
        """A ClipSize, an ``"FxHxW"`` string or a [frames, height, width] list."""
        if isinstance(value, ClipSize):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if (isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            return cls(*value)
        raise ValueError(f"a clip size is 'FxHxW' or [frames, height, width], got {value!r}")


def _unet_levels(config: "CMDConfig") -> int:
    """Resolution levels of the content UNet (diffusers' UNet2DConditionModel has 4 by default)."""
    unet = config.content_unet
    blocks = unet.get("down_block_types") or unet.get("block_out_channels")
    return len(blocks) if blocks else 4


def size_step(config: "CMDConfig") -> int:
    """Heights and widths (pixels) a config's networks run are multiples of this (8 for ``default``,
    64 for ``sd21-512x1024``)."""
    latent = math.lcm(config.autoencoder.patch_size * config.motion_dit.patch_size,
                      config.motion_dit.content_patch_size, 2 ** (_unet_levels(config) - 1))
    return latent * config.vae_scale


def frame_step(config: "CMDConfig") -> int:
    """Frame counts the networks run are multiples of this: the motion DiT's patch along time."""
    return config.motion_dit.patch_size


def check_fits(config: "CMDConfig", size: ClipSize) -> ClipSize:
    """``size`` if the config's networks can run a clip of it; a one-line ValueError naming it otherwise."""
    step, fstep = size_step(config), frame_step(config)
    if min(size.frames, size.height, size.width) < 1 or size.height % step or size.width % step:
        raise ValueError(f"clip size {size} does not fit config {config.name!r}: height and width must be "
                         f"positive multiples of {step}")
    if size.frames % fstep:
        raise ValueError(f"clip size {size} does not fit config {config.name!r}: frames must be a multiple of "
                         f"the motion DiT's time patch {fstep}")
    return size


@dataclass(frozen=True)
class ClipGeometry:
    """Every shape of one clip of ``size`` for a config (arithmetic only; :func:`clip_geometry` also
    checks that the size fits). Latent sizes in latent pixels; ``content_shape`` and ``motion_shape``
    exclude the batch."""

    size: ClipSize
    channels: int  # C: RGB in pixel mode, the VAE's latent channels in latent mode
    vae_scale: int
    patch: int  # the AE's patch p
    motion_dim: int  # D
    motion_patch: int  # the DiT's patch over (L, H' + W')
    content_patch: int  # the DiT's patch over the content frame

    @classmethod
    def of(cls, config: "CMDConfig", size: ClipSize) -> "ClipGeometry":
        return cls(size, config.channels, config.vae_scale, config.autoencoder.patch_size,
                   config.autoencoder.motion_dim, config.motion_dit.patch_size, config.motion_dit.content_patch_size)

    @property
    def frames(self) -> int:
        return self.size.frames

    @property
    def latent_height(self) -> int:
        """h: the content frame's height, H / vae_scale."""
        return self.size.height // self.vae_scale

    @property
    def latent_width(self) -> int:
        return self.size.width // self.vae_scale

    @property
    def grid_height(self) -> int:
        """H' = h / p: rows of the AE's patch grid."""
        return self.latent_height // self.patch

    @property
    def grid_width(self) -> int:
        """W' = w / p."""
        return self.latent_width // self.patch

    @property
    def motion_length(self) -> int:
        """H' + W': positions along the motion latent's two planes (time-height and time-width)."""
        return self.grid_height + self.grid_width

    @property
    def content_shape(self) -> Tuple[int, int, int]:
        """(C, h, w) of the content frame xbar."""
        return (self.channels, self.latent_height, self.latent_width)

    @property
    def motion_shape(self) -> Tuple[int, int, int]:
        """(D, L, H' + W') of the motion latent z."""
        return (self.motion_dim, self.frames, self.motion_length)

    @property
    def motion_tokens(self) -> int:
        """Tokens of z in the motion DiT: (L / p_m) * ((H' + W') / p_m)."""
        return (self.frames // self.motion_patch) * (self.motion_length // self.motion_patch)

    @property
    def content_tokens(self) -> int:
        """Tokens of xbar in the motion DiT: (h / p_c) * (w / p_c)."""
        return (self.latent_height // self.content_patch) * (self.latent_width // self.content_patch)

    @property
    def video_tokens(self) -> int:
        """Tokens of the AE decoder: L * H' * W'."""
        return self.frames * self.grid_height * self.grid_width


def clip_geometry(config: "CMDConfig", size: Optional[ClipSize] = None) -> ClipGeometry:
    """The geometry of a clip of ``size`` (default: the config's own size), checked to fit its networks."""
    return ClipGeometry.of(config, check_fits(config, size or config.default_size))


def format_sizes(sizes: Sequence[ClipSize]) -> str:
    return ", ".join(map(str, sizes))


def check_served(config: "CMDConfig", size: ClipSize, why: str = "") -> ClipSize:
    """``size`` if it is one of the sizes the config serves (``sizes``, exactly: not fewer frames of one);
    a one-line ValueError naming it and the served sizes otherwise (``why``, if given, ends it)."""
    served = config.served_sizes
    if size not in served:
        raise ValueError(f"size {size} is not one model {config.name!r} serves ({format_sizes(served)})"
                         + (f": {why}" if why else ""))
    return size


def _only(values) -> Optional[int]:
    """The one element of a set, else None."""
    return next(iter(values)) if len(values) == 1 else None


def resolve_size(config: "CMDConfig", frames: Optional[int] = None, height: Optional[int] = None,
                 width: Optional[int] = None) -> Tuple[ClipSize, ClipSize]:
    """(requested, generated) sizes of a request, defaults from the config's own size; a one-line
    ValueError naming the bad value and the sizes the model serves if it serves no such clip.

    Height and width must be those of a served size; ``frames`` any count up to that size's frames:
    the clip is generated at the smallest served length >= frames and its first frames kept. A height
    given without a width takes the width of the served sizes of that height where there is one (and
    the other way round), else the config's own. Values must already be positive integers."""
    sizes = config.served_sizes
    if width is None and height is not None:
        width = _only({s.width for s in sizes if s.height == height})
    if height is None and width is not None:
        height = _only({s.height for s in sizes if s.width == width})
    frames = config.num_frames if frames is None else frames
    height = config.height if height is None else height
    width = config.width if width is None else width
    served = f"model {config.name!r} serves {format_sizes(sizes)} (frames x height x width)"
    step = size_step(config)
    for name, value in (("height", height), ("width", width)):
        if value % step:
            raise ValueError(f"{name} must be a multiple of {step} for this model and one of its sizes ({served}), "
                             f"got {value}")
    heights = sorted({s.height for s in sizes})
    if height not in heights:
        raise ValueError(f"height must be {' or '.join(map(str, heights))} for this model ({served}), got {height}")
    widths = sorted({s.width for s in sizes if s.height == height})
    if width not in widths:
        raise ValueError(f"width must be {' or '.join(map(str, widths))} at height {height} for this model "
                         f"({served}), got {width}")
    lengths = sorted(s.frames for s in sizes if (s.height, s.width) == (height, width))
    if frames > lengths[-1]:
        raise ValueError(f"num_frames must be at most {lengths[-1]} at {height}x{width} for this model ({served}; "
                         f"fewer frames are the first frames of a served clip), got {frames}")
    generated = next(n for n in lengths if n >= frames)
    return ClipSize(frames, height, width), ClipSize(generated, height, width)


def parse_sizes(config: "CMDConfig", sizes: Sequence) -> List[str]:
    """Validate a config's ``sizes`` declaration: each fits the networks, none twice, the config's own
    size among them. Returns them as ``"FxHxW"`` strings (the config's stored form)."""
    if isinstance(sizes, str) or not isinstance(sizes, (list, tuple)):
        raise ValueError(f"config {config.name!r}: sizes is a list of 'FxHxW' sizes, got {sizes!r}")
    parsed = [check_fits(config, ClipSize.coerce(s)) for s in sizes]
    seen = set()
    for size in parsed:
        if size in seen:
            raise ValueError(f"config {config.name!r}: size {size} is declared twice")
        seen.add(size)
    if config.default_size not in seen:
        raise ValueError(f"config {config.name!r}: its own size {config.default_size} (num_frames x height x width, "
                         f"the default) is not among its sizes {format_sizes(parsed)}; list it in 'sizes'")
    return [str(s) for s in parsed]
