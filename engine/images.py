"""Images in the forms users hold them -> one pixel tensor (image-to-video's content frame).

Accepted, and all giving the same pixels for the same picture:

- a file path (str or ``os.PathLike``): anything imageio reads; grey is repeated to RGB, alpha dropped,
  8- and 16-bit files alike;
- a PIL image: any mode PIL converts to RGB, 16-bit grey (``I;16``) and float grey (``F``, in [0, 1]);
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

ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, "PIL.Image.Image"]  # noqa: F821


def read_image_array(path: Union[str, os.PathLike]) -> np.ndarray:
    """An image file -> its (H, W, 3) array in the file's own dtype (uint8, uint16, ...): grey repeated to
    RGB, alpha dropped. ValueError for a missing or unreadable file, or one that is not a single image."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path!r}")
    try:
        import imageio.v3 as iio

        image = np.asarray(iio.imread(path))
    except Exception as e:  # imageio raises many kinds for unreadable files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read image {path!r}: {first}") from None
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"cannot read image {path!r}: expected one grey, RGB or RGBA image, got an array of "
                         f"shape {image.shape}")
    if not (image.dtype in (np.uint8, np.uint16) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"cannot read image {path!r}: samples of type {image.dtype} are not supported (8- or "
                         "16-bit, or float in [0, 1])")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[..., :3]


def _pil_array(image) -> np.ndarray:
    """A PIL image -> (H, W, 3) array: 16-bit grey as uint16, 32-bit float grey ("F") as float32 (then held to
    [0, 1] like any float image), every other mode through PIL's own conversion to 8-bit RGB."""
    if image.mode in _PIL_16BIT or image.mode == "F":
        grey = np.array(image, dtype=np.uint16 if image.mode != "F" else np.float32)  # native byte order
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "I":
        raise TypeError("PIL images of mode 'I' (32-bit integers) have no fixed range: convert to 'RGB' or 'I;16', "
                        "or pass a float array in [0, 1]")
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def _as_tensor(image) -> torch.Tensor:
    """Any accepted form -> a CPU torch tensor (numpy arrays keep their layout; files and PIL are (H, W, 3))."""
    if isinstance(image, (str, os.PathLike)):
        return torch.from_numpy(np.ascontiguousarray(read_image_array(image)))
    if type(image).__module__.startswith("PIL.") and hasattr(image, "mode"):
        return torch.from_numpy(np.ascontiguousarray(_pil_array(image)))
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
