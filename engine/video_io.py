"""Writing and reading videos (.mp4, .gif, .npy, and for reading any container ffmpeg opens), reading
images, safely.

Every write is atomic: the file is written under a temporary name in the target folder and renamed
over the target only once complete, so an error or Ctrl-C never leaves a partial video behind.
.mp4 (H.264) and .gif go through imageio-ffmpeg's bundled ffmpeg; .npy holds the frames as a uint8
array (frames, H, W, 3). imageio-ffmpeg and imageio are imported only when used, so the GPU path
(which writes .npy) does not need them.

Reading (:func:`read_video`, :func:`probe_video`) is the one video reader of the project (the engine,
the trainer's data sets and the tests use it): it returns one frame per frame stored in the file, never
resampled to a frame rate (ffmpeg's default output timing repeats GIF frames, e.g. a 2-frame GIF at
500 ms a frame would read as 100 frames at GIF's 1/100 s time base); the timing is kept apart as
metadata (per-frame durations and the mean fps).
"""

import importlib.util
import logging
import os
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine.atomic import atomic_path, check_output, deferred_interrupts
from engine.cli import check_int, check_number

VIDEO_FORMATS = (".mp4", ".gif", ".npy")
#: Frame rates a written file may have: ffmpeg writes larger ones wrongly (1e9 fps reads back as about 1e6);
#: GIF stores delays in 1/100 s, so a GIF shows at most 100 frames a second.
FPS_MIN, FPS_MAX = 0.01, 1000.0


def output_format(path: str) -> str:
    """The extension of an output path, if it is one we write; a ValueError naming it otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_FORMATS:
        raise ValueError(f"unsupported output format {ext or '(none)'!r} in {path!r}; "
                         f"use one of {', '.join(VIDEO_FORMATS)}")
    return ext


def check_output_path(path: str, flag: str = "--out") -> str:
    """Everything about an output path that can be checked before generating: format, writer available, and
    (:func:`engine.atomic.check_output`, the one rule) not a folder, below a folder that exists or can be
    made. Returns the format."""
    ext = output_format(path)
    check_writer(ext)
    check_output(path, flag=flag)
    return ext


def check_writer(ext: str) -> None:
    """A ValueError if the writer for ``ext`` cannot run here (.mp4/.gif need imageio-ffmpeg)."""
    if ext in (".mp4", ".gif") and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ValueError(f"writing {ext} needs the package imageio-ffmpeg (pip install imageio-ffmpeg); "
                         "write .npy instead")


def check_output_dir(folder: str, flag: str = "--out-dir") -> None:
    """A folder we can write into: present and writable, or creatable under a writable parent
    (:func:`engine.atomic.check_output`). Nothing is created here."""
    check_output(folder, folder=True, flag=flag)


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
    check_number("fps", fps, FPS_MIN, FPS_MAX)
    _check_frames(frames)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
    """An image file -> (H, W, 3) float32 in [0, 1]: the picture an image viewer shows (EXIF orientation,
    CMYK / palette / grey as RGB, transparency over white), 8- and 16-bit files scaled by their full range
    (:func:`engine.images.to_pixels`, the one place these rules live).
    ValueError / TypeError for a missing or unreadable file or one of an unsupported kind."""
    from engine.images import to_pixels

    return to_pixels(path)[0].permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------
# Reading videos

# ffmpeg output options that keep the stored frames: no frame-rate conversion (the default would
# duplicate or drop frames to reach a constant rate), and the first video stream that is not a cover
# picture (``V``).
_PASSTHROUGH = ["-map", "0:V:0", "-fps_mode", "passthrough"]


@dataclass(frozen=True)
class VideoInfo:
    """What a video file stores, read without decoding it (:func:`probe_video`).

    ``num_frames``: stored frames (what :func:`read_video` returns, without ``max_frames``).
    ``durations``: (num_frames,) float64 seconds each frame is shown, in display order, as ffmpeg's
    demuxer reads the container's timestamps (GIF: the per-frame delays in 1/100 s; ffmpeg shows a delay
    under 2/100 s as 1/10 s, as browsers do); None where the format stores no timing (.npy).
    ``height``, ``width``: frame size in pixels (None when ffmpeg's copy probe does not report it).
    """

    num_frames: int
    durations: Optional[np.ndarray]
    height: Optional[int] = None
    width: Optional[int] = None

    @property
    def fps(self) -> Optional[float]:
        """Mean frame rate, frames / seconds shown (None without timing or with zero total time)."""
        if self.durations is None or self.num_frames == 0:
            return None
        total = float(np.sum(self.durations))
        return self.num_frames / total if total > 0 else None


def _ffmpeg_reason(text: str) -> str:
    """The first line of ffmpeg's error output, without its "[in#0 @ 0x...]" context prefix."""
    for line in text.splitlines():
        line = re.sub(r"^(\[[^\]]*\]\s*)+", "", line).strip()
        if line:
            return line
    return "ffmpeg failed"


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise ValueError(f"video not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"video path is a folder: {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read video {path!r}: the file is empty (0 bytes)")


def _load_npy(path: str, mmap: bool = False) -> np.ndarray:
    try:
        frames = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # numpy raises several kinds for a bad file
        raise ValueError(f"cannot read video {path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] < 1:
        raise ValueError(f"cannot read video {path!r}: expected uint8 frames (frames, H, W, 3), got "
                         f"{frames.dtype} {tuple(frames.shape)}")
    return frames


def _timestamps(lines: List[str]) -> Tuple[Optional[np.ndarray], Optional[int], Optional[int]]:
    """Per-frame durations (seconds, display order), height, width from ffmpeg's framecrc listing of the
    stream's packets (one packet per stored frame; decode order, so sorted by presentation time)."""
    num, den = 1, 1
    width = height = None
    pts, dur = [], []
    nopts = -(2 ** 63)
    for line in lines:
        if line.startswith("#tb 0:"):
            num, den = (int(x) for x in line.split(":", 1)[1].strip().split("/"))
        elif line.startswith("#dimensions 0:"):
            width, height = (int(x) for x in line.split(":", 1)[1].strip().split("x"))
        elif line and not line.startswith("#"):
            fields = [f.strip() for f in line.split(",")]
            dts, p, d = int(fields[1]), int(fields[2]), int(fields[3])
            pts.append(p if p != nopts else dts)
            dur.append(d)
    if not pts or nopts in pts:
        return None, height, width
    order = np.argsort(np.asarray(pts, np.int64), kind="stable")
    t = np.asarray(pts, np.float64)[order]
    last = float(np.asarray(dur, np.float64)[order][-1])
    steps = np.diff(t)
    if last <= 0:  # no stored duration for the last frame: the typical step
        last = float(np.median(steps)) if len(steps) else 0.0
    return np.append(steps, last) * num / den, height, width


def probe_video(path: str) -> VideoInfo:
    """Count a video's stored frames and read their timing without decoding (ffmpeg copies the stream's
    packets, one per frame). .npy: the array's frames, no timing. Raises ValueError naming the file
    when it is missing, empty or not a video ffmpeg can open."""
    _check_readable(path)
    if path.lower().endswith(".npy"):
        frames = _load_npy(path, mmap=True)
        return VideoInfo(int(frames.shape[0]), None, int(frames.shape[1]), int(frames.shape[2]))
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", path,
           "-map", "0:V:0", "-c", "copy", "-f", "framecrc", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    lines = proc.stdout.splitlines()
    count = sum(1 for line in lines if line and not line.startswith("#"))
    if proc.returncode != 0 or count == 0:
        reason = _ffmpeg_reason(proc.stderr) if proc.returncode != 0 else "no video frames"
        raise ValueError(f"cannot read video {path!r}: {reason}")
    durations, height, width = _timestamps(lines)
    return VideoInfo(count, durations, height, width)


def read_video(path: str, max_frames: Optional[int] = None) -> np.ndarray:
    """Decode a video to uint8 frames (N, H, W, 3), one per frame stored in the file (never resampled to
    a frame rate: see :func:`probe_video` for the timing); at most ``max_frames`` (the first ones).

    .npy: the uint8 (frames, H, W, 3) array :func:`write_video` writes. Anything else goes through
    imageio-ffmpeg (mp4, gif, webm, avi, mov, mkv, ...). Raises ValueError naming the file when it is
    missing, empty or cannot be decoded."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    _check_readable(path)
    if path.lower().endswith(".npy"):
        frames = _load_npy(path, mmap=max_frames is not None)
        return np.array(frames[:max_frames])
    import imageio_ffmpeg

    frames = []
    try:
        reader = imageio_ffmpeg.read_frames(path, output_params=list(_PASSTHROUGH))
        try:
            with _no_rotation_notice():  # logged as ffmpeg's header is parsed, at the first item
                meta = next(reader)
            width, height = meta["size"]
            for raw in reader:
                frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        finally:
            reader.close()
    except Exception:  # imageio-ffmpeg puts ffmpeg's whole log in its message: ask ffmpeg for the reason
        reason = _decode_error(path)
        raise ValueError(f"cannot read video {path!r}: {reason}") from None
    if not frames:
        raise ValueError(f"cannot read video {path!r}: no frames decoded")
    return np.stack(frames)


def clip_filters(start: int, count: int, stride: int, height: int, width: int, top: float = 0.5,
                 left: float = 0.5) -> str:
    """The ffmpeg filter chain of :func:`read_clip`: keep stored frames ``start``, ``start + stride``, ... (by
    index ``n``, so exact), scale them so that they cover ``height`` x ``width`` (aspect kept; the area
    filter, which averages like an antialiased resize), crop there at fractions ``top``, ``left``."""
    end = start + (count - 1) * stride
    return (rf"select='between(n\,{start}\,{end})*not(mod(n-{start}\,{stride}))',"
            f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=area,"
            f"crop={width}:{height}:round((iw-{width})*{left:.6f}):round((ih-{height})*{top:.6f})")


def clip_command(path: str, start: int, count: int, stride: int, size: Tuple[int, int],
                 crop: Tuple[float, float] = (0.5, 0.5), raw_size: Optional[Tuple[int, int]] = None) -> List[str]:
    """The ffmpeg command of :func:`read_clip`: the clip's frames as raw RGB on stdout. ``raw_size``:
    (height, width) of raw RGB frames on stdin (``path`` "-") instead of a file."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error"]
    if raw_size is not None:
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{raw_size[1]}x{raw_size[0]}"]
    cmd += ["-i", path, *_PASSTHROUGH, "-vf", clip_filters(start, count, stride, *size, *crop),
            "-frames:v", str(count), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    return cmd


def read_clip(path: str, start: int, count: int, stride: int = 1, size: Tuple[int, int] = (64, 64),
              crop: Tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Decode only the frames of one clip: stored frames ``start``, ``start + stride``, ... (``count`` of
    them, indices as :func:`read_video` counts them), scaled by ffmpeg while decoding so that they cover
    ``size`` = (height, width), aspect kept, and cropped to it at ``crop`` = (top, left) fractions (0.5, 0.5:
    the centre). Returns uint8 (count, height, width, 3).

    Memory is what the clip holds, whatever the video's length or resolution: no frame is kept at its stored
    size, and ffmpeg stops decoding after the last frame kept. .npy files go through the same filters (the
    kept frames only). Raises ValueError naming the file when it is missing or cannot be decoded, or holds
    fewer frames than the clip needs."""
    height, width = size
    for name, value, low in (("start", start, 0), ("count", count, 1), ("stride", stride, 1),
                             ("height", height, 1), ("width", width, 1)):
        check_int(name, value, low)
    _check_readable(path)
    stdin = None
    if path.lower().endswith(".npy"):  # the kept frames, as raw video on stdin
        frames = _load_npy(path, mmap=True)[start:start + (count - 1) * stride + 1:stride]
        stdin = np.ascontiguousarray(frames).tobytes()
        cmd = clip_command("-", 0, count, 1, size, crop, raw_size=(frames.shape[1], frames.shape[2]))
    else:
        cmd = clip_command(path, start, count, stride, size, crop)
    proc = subprocess.run(cmd, input=stdin, capture_output=True)
    if proc.returncode != 0:
        reason = _ffmpeg_reason(proc.stderr.decode("utf-8", "replace"))
        raise ValueError(f"cannot read video {path!r}: {reason}")
    got = len(proc.stdout) // (height * width * 3)
    if got < count:
        raise ValueError(f"cannot read video {path!r}: {got} of the {count} frames from frame {start} at stride "
                         f"{stride} decoded (the video is shorter)")
    return np.frombuffer(proc.stdout, np.uint8, count * height * width * 3).reshape(count, height, width, 3)


# imageio-ffmpeg logs "The frame size for reading (w, h) is different from the source frame size (h, w)." for
# every clip stored rotated (a phone video's rotation metadata): ffmpeg turns the frames upright as it decodes,
# which is what we want, so the line alarms without cause. Only that record is dropped, only while we open a clip.
_FFMPEG_LOGGER = "imageio_ffmpeg"
ROTATION_NOTICE = "The frame size for reading "


class _RotationNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ROTATION_NOTICE)


@contextmanager
def _no_rotation_notice() -> Iterator[None]:
    logger, notice = logging.getLogger(_FFMPEG_LOGGER), _RotationNoticeFilter()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _decode_error(path: str) -> str:
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", path,
           *_PASSTHROUGH, "-f", "null", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    return _ffmpeg_reason(proc.stderr) if proc.stderr.strip() else "decoding failed"
