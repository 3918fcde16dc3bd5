"""Images in the forms users hold them -> one pixel tensor (image-to-video's content frame).

Accepted, and all giving the same pixels for the same picture:

- a file path (str or ``os.PathLike``): any image file PIL reads, and
- a PIL image: both decoded to the picture an image viewer shows (:func:`viewer_array`: EXIF orientation,
  CMYK / palette / grey converted to RGB, transparency composited over :data:`BACKGROUND`), 8-bit, 16-bit
  grey (``I;16``) or float grey (``F``, in [0, 1]);
- a numpy array or torch tensor of one image, ``(H, W, 3)`` or ``(3, H, W)``, or a batch ``(N, H, W, 3)`` /
  ``(N, 3, H, W)`` (N = 1, or one per prompt), of dtype uint8 (0-255), uint16 (0-65535) or float (0-1: any
  numpy float, torch float16 / bfloat16 / float32 / float64).

When both the first and the last axis have 3 entries (a 3-pixel-wide image), numpy arrays are read as
channels-last (the numpy/PIL convention) and torch tensors as channels-first (the torch convention).
Anything else (another dtype such as int64, float values outside [0, 1], NaN, other channel counts, other
types) is a one-line TypeError / ValueError naming what was given: a silent rescale or clamp would turn the
picture white or black without a word.
"""

import os
from typing import Union

import numpy as np
import torch

ACCEPTED = ("a file path, a PIL image, or a numpy array / torch tensor (H, W, 3), (3, H, W) or a batch (N, H, W, 3) / "
            "(N, 3, H, W) of uint8 (0-255), uint16 (0-65535) or float (0-1)")
# Full scale of each integer dtype we accept; floats are already in [0, 1].
_INT_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PIL_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# What a transparent pixel is shown over (RGB, 0-255): white, a page's and most viewers' colour.
BACKGROUND = (255, 255, 255)

ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, "PIL.Image.Image"]  # noqa: F821


def read_image_array(path: Union[str, os.PathLike]) -> np.ndarray:
    """An image file -> the (H, W, 3) array a viewer shows (:func:`viewer_array`), in the file's own sample
    type (uint8, uint16 for 16-bit grey, float32 for float grey). ValueError for a missing file or one PIL
    cannot read as an image."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path!r}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, with the file's name
            return viewer_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # PIL's kinds for a bad file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read image {path!r}: {first}") from None


def viewer_array(image) -> np.ndarray:
    """A PIL image -> the (H, W, 3) picture an image viewer shows of it, the one rule for files and PIL images:

    - turned by its EXIF orientation (a phone photo taken upright comes out upright);
    - colour converted by PIL to RGB: CMYK (PIL's JPEG decoder already undoes Adobe's inverted CMYK), YCbCr,
      LAB, palette, 1-bit and grey (grey repeated to RGB);
    - transparency (an alpha channel, or a palette's / grey's transparent colour) composited over
      :data:`BACKGROUND`, as a viewer shows it over a page: dropping alpha would bring back whatever colour
      the transparent pixels happen to store;
    - 16-bit grey kept as uint16 and 32-bit float grey ("F") as float32 (then held to [0, 1] like any float
      image); every other mode is 8-bit.

    TypeError for mode "I" (32-bit integers have no fixed full scale)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in _PIL_16BIT or image.mode == "F":
        grey = np.array(image, dtype=np.uint16 if image.mode != "F" else np.float32)  # native byte order
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "I":
        raise TypeError("PIL images of mode 'I' (32-bit integers) have no fixed range: convert to 'RGB' or 'I;16', "
                        "or pass a float array in [0, 1]")
    if _has_transparency(image):
        rgba = image.convert("RGBA")  # premultiplied modes (RGBa, La) and palettes with transparency included
        page = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return np.array(Image.alpha_composite(page, rgba).convert("RGB"))
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def _has_transparency(image) -> bool:
    """Whether a viewer would show part of ``image`` see-through: an alpha band, or a transparent colour."""
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _as_tensor(image) -> torch.Tensor:
    """Any accepted form -> a CPU torch tensor (numpy arrays keep their layout; files and PIL are (H, W, 3))."""
    if isinstance(image, (str, os.PathLike)):
        return torch.from_numpy(np.ascontiguousarray(read_image_array(image)))
    if type(image).__module__.startswith("PIL.") and hasattr(image, "mode"):
        return torch.from_numpy(np.ascontiguousarray(viewer_array(image)))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16 or image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating):
            return torch.from_numpy(np.ascontiguousarray(image))
        raise TypeError(f"image arrays of dtype {image.dtype} are not supported: use uint8 (0-255), uint16 "
                        "(0-65535) or float (0-1)")
    if isinstance(image, torch.Tensor):
        return image.detach().cpu()
    raise TypeError(f"unsupported image of type {type(image).__name__}: use {ACCEPTED}")


def to_pixels(image: ImageLike) -> torch.Tensor:
    """One image (or a batch) in any accepted form (module docstring) -> float32 pixels (N, 3, H, W) in [0, 1]
    on the CPU. TypeError for an unsupported type or dtype, ValueError for an unsupported shape or range."""
    channels_last = not isinstance(image, torch.Tensor)  # numpy's convention; files and PIL come back (H, W, 3)
    t = _as_tensor(image)
    try:
        return _normalise(t, channels_last)
    except ValueError as e:
        if isinstance(image, (str, os.PathLike)):
            raise ValueError(f"image {os.fspath(image)!r}: {e}") from None
        raise


def _normalise(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """dtype scale and range check, then layout: -> float32 (N, 3, H, W) in [0, 1]."""
    if t.dtype in _INT_SCALE:
        pixels = t.to(torch.float32) / _INT_SCALE[t.dtype]
    elif t.dtype in _FLOATS:
        pixels = t.to(torch.float32)
        if pixels.numel() and not (torch.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
            finite = pixels[torch.isfinite(pixels)]
            span = f"[{finite.min().item():.4g}, {finite.max().item():.4g}]" if finite.numel() else "no finite values"
            extra = "" if finite.numel() == pixels.numel() else " and NaN/inf"
            raise ValueError(f"float images must hold values in [0, 1], got {span}{extra} ({t.dtype}): scale "
                             "them (uint8 and uint16 images are scaled by their full range)")
    else:
        raise TypeError(f"image tensors of dtype {t.dtype} are not supported: use uint8 (0-255), uint16 "
                        "(0-65535) or a float dtype (0-1)")
    shape = tuple(t.shape)
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.dim() != 4:
        raise ValueError(f"images must be (H, W, 3), (3, H, W), (N, H, W, 3) or (N, 3, H, W), got shape {shape}")
    first, last = pixels.shape[1] == 3, pixels.shape[3] == 3
    if last and (not first or channels_last):
        pixels = pixels.permute(0, 3, 1, 2)
    elif not first:
        raise ValueError(f"images need 3 colour channels, first or last: (H, W, 3) or (3, H, W), got shape {shape}")
    if pixels.shape[0] == 0 or pixels.shape[2] == 0 or pixels.shape[3] == 0:
        raise ValueError(f"empty image of shape {shape}")
    return pixels.contiguous()
