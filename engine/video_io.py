"""Writing videos (.mp4, .gif, .npy) and reading images, safely.

Every write is atomic: the file is written under a temporary name in the target folder and renamed
over the target only once complete, so an error or Ctrl-C never leaves a partial video behind.
.mp4 (H.264) and .gif go through imageio-ffmpeg's bundled ffmpeg; .npy holds the frames as a uint8
array (frames, H, W, 3). imageio-ffmpeg and imageio are imported only when used, so the GPU path
(which writes .npy) does not need them.
"""

import importlib.util
import os
from typing import Sequence, Union

import numpy as np

from engine.atomic import atomic_path, deferred_interrupts

VIDEO_FORMATS = (".mp4", ".gif", ".npy")


def output_format(path: str) -> str:
    """The extension of an output path, if it is one we write; a ValueError naming it otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_FORMATS:
        raise ValueError(f"unsupported output format {ext or '(none)'!r} in {path!r}; "
                         f"use one of {', '.join(VIDEO_FORMATS)}")
    return ext


def check_output_path(path: str) -> str:
    """Everything about an output path that can be checked before generating: format, writer
    available, not a folder, parent folder present and writable. Returns the format."""
    ext = output_format(path)
    check_writer(ext)
    if os.path.isdir(path):
        raise ValueError(f"output path is a folder: {path!r}")
    check_output_dir(os.path.dirname(os.path.abspath(path)), create=False)
    return ext


def check_writer(ext: str) -> None:
    """A ValueError if the writer for ``ext`` cannot run here (.mp4/.gif need imageio-ffmpeg)."""
    if ext in (".mp4", ".gif") and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ValueError(f"writing {ext} needs the package imageio-ffmpeg (pip install imageio-ffmpeg); "
                         "write .npy instead")


def check_output_dir(folder: str, create: bool = True) -> None:
    """A folder we can write into: present and writable, or (``create``) creatable under a writable
    parent. Nothing is created here."""
    probe = os.path.abspath(folder)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise ValueError(f"output folder is a file: {folder!r}")
    if not os.path.isdir(probe):
        if not create:
            raise ValueError(f"output folder does not exist: {folder!r}")
        while not os.path.isdir(probe):  # the nearest existing ancestor must be writable
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
            if os.path.exists(probe) and not os.path.isdir(probe):
                raise ValueError(f"cannot create output folder {folder!r}: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output folder is not writable: {probe!r}")


def _check_frames(frames) -> None:
    if len(frames) < 1:
        raise ValueError("no frames to write")
    shape = np.shape(frames[0])
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"frames must be (frames, H, W, 3), got frames of shape {shape}")


def _to_uint8(frame) -> np.ndarray:
    """A frame (H, W, 3), uint8 or float in [0, 1], as contiguous uint8."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        frame = np.round(np.clip(frame.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(frame)


def _write_ffmpeg(path: str, frames, fps: float, ext: str) -> None:
    import imageio_ffmpeg

    h, w = np.shape(frames[0])[:2]
    if ext == ".mp4":
        # yuv420p (what players expect) needs even sizes; odd sizes keep full chroma instead.
        even = h % 2 == 0 and w % 2 == 0
        opts = dict(codec="libx264", pix_fmt_out="yuv420p" if even else "yuv444p", quality=8)
    else:  # a per-clip palette: far better colours than ffmpeg's fixed GIF palette
        opts = dict(codec="gif", pix_fmt_out="pal8",
                    output_params=["-filter_complex", "split[a][b];[a]palettegen[p];[b][p]paletteuse"])
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, macro_block_size=1, ffmpeg_log_level="error",
                                         **opts)
    writer.send(None)
    try:
        for frame in frames:
            writer.send(_to_uint8(frame))
    finally:
        writer.close()


def write_video(path: str, frames: Union[np.ndarray, Sequence], fps: float = 8) -> str:
    """Write frames (L, H, W, 3), uint8 or float in [0, 1], to .mp4, .gif or .npy, atomically."""
    ext = output_format(path)
    if not (fps > 0 and np.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    _check_frames(frames)
    # The temporary name keeps the extension: ffmpeg picks the container from it. Ctrl-C included,
    # no partial file is ever left.
    with atomic_path(path, suffix=f".part{ext}") as tmp:
        if ext == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, np.stack([_to_uint8(frame) for frame in frames]))
        else:
            with deferred_interrupts():  # ffmpeg ends before the temporary file can be removed
                _write_ffmpeg(tmp, frames, fps, ext)
    return path


def read_image(path: str) -> np.ndarray:
    """An image file -> (H, W, 3) float32 in [0, 1]; grey is repeated to RGB, alpha dropped."""
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path!r}")
    try:
        import imageio.v3 as iio

        image = np.asarray(iio.imread(path))
    except Exception as e:  # imageio raises many kinds for unreadable files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read image {path!r}: {first}") from None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"cannot read image {path!r}: expected an RGB image, got an array of shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)
