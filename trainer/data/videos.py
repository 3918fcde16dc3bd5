"""Real videos for training: a folder of videos with a captions CSV, or the UCF-101 layout.

Both give items like the synthetic set: {"video": (L, 3, H, W) float in [-1, 1], "caption": str}. Each item
is a random window of ``num_frames`` frames (every ``frame_stride``-th frame) of one video, resized so that
it covers (H, W) and cropped to it (centre crop, or a random crop with ``random_crop``). The window and crop
of item i depend only on (seed, epoch, i), so a resumed run sees the same clips as an uninterrupted one.
Frames are the frames stored in the file (:func:`engine.video_io.read_video`: never resampled to a frame
rate, so a 2-frame GIF is 2 frames, too short for a 16-frame window, whatever its per-frame delays).

Before training, :meth:`VideoClips.check` probes every video without decoding it (ffmpeg counts the stored
frames) and :meth:`VideoClips.usable` keeps the usable ones, counting the others by reason ("missing",
"unreadable", "too short" for one window); with none left it raises :class:`NoUsableClips`, a ValueError
naming the folder and the counts. A video that passes the probe but then fails to decode gives ``None``
from ``__getitem__``: the trainer's collate_clips drops it and counts it (``skipped_clips`` in the log).
Decoding uses imageio-ffmpeg (its own ffmpeg binary, no system install needed).

Layouts (:func:`open_video_folder` tells them apart):

* captions CSV: ``DIR/captions.csv`` with rows ``path,caption`` (a header row ``path,caption`` is optional;
  paths relative to DIR);
* UCF-101: class folders of ``.avi`` files (``DIR/<Class>/v_<Class>_gXX_cYY.avi``, or under ``DIR/UCF-101/``),
  the split lists in ``DIR/ucfTrainTestlist/`` (``trainlist01.txt`` ...) or DIR itself; the caption is the
  class name in words ("ApplyEyeMakeup" -> "apply eye makeup"). Without split lists every video is used.
"""

import csv
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from engine.video_io import probe_video, read_video  # noqa: F401  (read_video: the one reader, re-exported)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v")
CAPTIONS_FILE = "captions.csv"


def resize_crop(frames: torch.Tensor, height: int, width: int, top: float = 0.5, left: float = 0.5) -> torch.Tensor:
    """(L, 3, H0, W0) float -> (L, 3, height, width): scale (antialiased) so the frame covers the target,
    then crop; ``top``/``left`` in [0, 1] place the crop (0.5: centre)."""
    h0, w0 = frames.shape[-2:]
    scale = max(height / h0, width / w0)
    h1, w1 = max(height, math.ceil(h0 * scale - 1e-6)), max(width, math.ceil(w0 * scale - 1e-6))
    if (h1, w1) != (h0, w0):
        frames = F.interpolate(frames, size=(h1, w1), mode="bilinear", antialias=True, align_corners=False)
    y, x = round((h1 - height) * top), round((w1 - width) * left)
    return frames[..., y:y + height, x:x + width]


SKIP_REASONS = ("missing", "unreadable", "too short")


def clip_problem(path: str, span: int) -> Tuple[Optional[str], str]:
    """(reason, detail): why ``path`` cannot give a window of ``span`` stored frames ("missing",
    "unreadable", "too short"), or (None, "") when it can. Probes without decoding (ffmpeg's packet count)."""
    try:
        info = probe_video(path)
    except ValueError as e:
        return ("missing" if not os.path.exists(path) else "unreadable"), str(e)
    if info.num_frames < span:
        return "too short", f"{path!r} has {info.num_frames} frames"
    return None, ""


class NoUsableClips(ValueError):
    """No video of a data set can give a clip (the message names the folder and the counts by reason)."""


@dataclass
class ClipCounts:
    """What :meth:`VideoClips.usable` found: ``found`` videos listed, ``skipped`` per reason, an example
    (the first problem's detail) per reason, and the window length ``span`` in stored frames."""

    root: str
    found: int
    span: int
    skipped: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> int:
        return self.found - sum(self.skipped.values())

    def add(self, reason: str, detail: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.examples.setdefault(reason, detail)

    def summary(self) -> str:
        """One line: "found 6 videos, 3 usable; skipped 1 missing, 1 unreadable, 1 too short (a window is
        7 stored frames; e.g. 'x.mp4' has 2 frames)"."""
        noun = "video" if self.found == 1 else "videos"
        text = f"found {self.found} {noun}, {self.usable} usable"
        parts = [f"{self.skipped[r]} {r}" for r in self.skipped if self.skipped[r]]
        if parts:
            text += "; skipped " + ", ".join(parts)
            notes = [f"a window is {self.span} stored frames"] if self.skipped.get("too short") else []
            first = next(r for r in self.skipped if self.skipped[r])
            notes.append(f"e.g. {self.examples[first]}")
            text += " (" + "; ".join(notes) + ")"
        return text

    def to_dict(self) -> Dict[str, object]:
        return {"root": self.root, "found": self.found, "usable": self.usable, "skipped": dict(self.skipped)}


class VideoClips(Dataset):
    """Captioned videos -> random fixed-length clips (see the module doc).

    ``entries``: (path, caption) pairs; ``root``: the folder they came from (for messages)."""

    def __init__(self, entries: Sequence[Tuple[str, str]], num_frames: int = 16, height: int = 32, width: int = 32,
                 frame_stride: int = 1, random_crop: bool = False, seed: int = 0, max_frames: int = 1024,
                 root: Optional[str] = None, cache_mb: float = 1024.0):
        if not entries:
            raise ValueError(f"no videos to train on{f' in {root!r}' if root else ''}")
        if num_frames < 1 or height < 1 or width < 1 or frame_stride < 1:
            raise ValueError(f"bad clip geometry: frames {num_frames}, size {height}x{width}, stride {frame_stride}")
        self.entries = list(entries)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.frame_stride = frame_stride
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.max_frames = max_frames  # decode at most this many frames of a long video
        # Decoded videos kept in memory (per process), up to cache_mb: a small folder (a user's few hundred
        # clips) is decoded once, not once per epoch (an ffmpeg process per clip was most of a step's time).
        self.cache_bytes = int(cache_mb * 2**20)
        self._decoded: Dict[str, np.ndarray] = {}
        self._cached_bytes = 0
        self.root = root or os.path.dirname(os.path.abspath(self.entries[0][0]))
        if self.span > max_frames:
            raise ValueError(f"a window of {num_frames} frames at stride {frame_stride} spans {self.span} frames, "
                             f"more than the {max_frames} decoded per video")

    @property
    def span(self) -> int:
        """Stored frames one window covers: (num_frames - 1) * frame_stride + 1."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def check(self, indices: Optional[Iterable[int]] = None, threads: Optional[int] = None
              ) -> Dict[int, Tuple[Optional[str], str]]:
        """index -> :func:`clip_problem` of the videos at ``indices`` (default: all), probed in ``threads``
        threads (each runs one short ffmpeg process; about 35 ms a video on one core)."""
        indices = list(range(len(self)) if indices is None else indices)
        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            found = pool.map(lambda i: clip_problem(self.entries[i][0], self.span), indices)
            return dict(zip(indices, found))

    def usable(self, problems: Optional[Mapping[int, Tuple[Optional[str], str]]] = None
               ) -> Tuple["VideoClips", ClipCounts]:
        """(the data set of the usable videos, the counts). ``problems``: :meth:`check`'s result for every
        index (computed here when not given). Raises :class:`NoUsableClips` when no video is usable."""
        problems = self.check() if problems is None else problems
        counts = ClipCounts(self.root, len(self), self.span, {r: 0 for r in SKIP_REASONS})
        keep = []
        for i in range(len(self)):
            reason, detail = problems[i]
            if reason is None:
                keep.append(self.entries[i])
            else:
                counts.add(reason, detail)
        if not keep:
            raise NoUsableClips(f"no usable clips in {self.root!r}: {counts.summary()}")
        return self.subset(keep), counts

    def subset(self, entries: Sequence[Tuple[str, str]]) -> "VideoClips":
        """The same clip geometry, seed and root over other entries."""
        return VideoClips(entries, self.num_frames, self.height, self.width, self.frame_stride, self.random_crop,
                          self.seed, self.max_frames, self.root, self.cache_bytes / 2**20)

    def _read(self, path: str) -> np.ndarray:
        """The decoded frames of ``path``, from the memory cache when it holds them."""
        frames = self._decoded.get(path)
        if frames is None:
            frames = read_video(path, self.max_frames)
            if self._cached_bytes + frames.nbytes <= self.cache_bytes:
                self._decoded[path] = frames
                self._cached_bytes += frames.nbytes
        return frames

    def __getitem__(self, index: int):
        path, caption = self.entries[index]
        span = self.span
        try:
            frames = self._read(path)
        except Exception:  # corrupt, truncated or not a video: skipped, never fatal
            return None
        if len(frames) < span:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start = int(rng.integers(0, len(frames) - span + 1))
        clip = torch.from_numpy(frames[start:start + span:self.frame_stride].copy()).permute(0, 3, 1, 2).float()
        top, left = (rng.random(), rng.random()) if self.random_crop else (0.5, 0.5)
        clip = resize_crop(clip, self.height, self.width, top, left)
        return {"video": (clip / 127.5 - 1.0).clamp(-1, 1), "caption": caption, "path": path}


def read_captions_csv(root: str) -> List[Tuple[str, str]]:
    """(absolute path, caption) rows of ``root/captions.csv``."""
    path = os.path.join(root, CAPTIONS_FILE)
    entries = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row or (line == 1 and [c.strip().lower() for c in row[:2]] == ["path", "caption"]):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{line}: expected 'path,caption', got {row!r}")
            entries.append((os.path.join(root, row[0].strip()), row[1].strip()))
    if not entries:
        raise ValueError(f"{path} lists no videos")
    return entries


def class_caption(name: str) -> str:
    """UCF-101 class name -> caption: "ApplyEyeMakeup" -> "apply eye makeup", "YoYo" -> "yo yo"."""
    return " ".join(w.lower() for w in re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", name))


def _ucf_roots(root: str) -> Tuple[str, Optional[str]]:
    """(folder holding the class folders, folder holding the split lists or None)."""
    videos = os.path.join(root, "UCF-101") if os.path.isdir(os.path.join(root, "UCF-101")) else root
    for lists in (os.path.join(root, "ucfTrainTestlist"), root, videos):
        if os.path.isfile(os.path.join(lists, "trainlist01.txt")):
            return videos, lists
    return videos, None


def is_ucf101(root: str) -> bool:
    videos, lists = _ucf_roots(root)
    if lists is not None:
        return True
    return any(os.path.isdir(os.path.join(videos, d)) and any(f.lower().endswith(".avi")
               for f in os.listdir(os.path.join(videos, d))) for d in os.listdir(videos))


def read_ucf101(root: str, split: str = "train", fold: int = 1) -> List[Tuple[str, str]]:
    """(path, caption) of the UCF-101 videos of a split ("train" or "test") and fold (1-3)."""
    if split not in ("train", "test"):
        raise ValueError(f"UCF-101 split must be 'train' or 'test', got {split!r}")
    if fold not in (1, 2, 3):
        raise ValueError(f"UCF-101 fold must be 1, 2 or 3, got {fold}")
    videos, lists = _ucf_roots(root)
    if lists is None:  # no split lists: every video of every class folder
        names = sorted(os.path.join(d, f) for d in os.listdir(videos) if os.path.isdir(os.path.join(videos, d))
                       for f in os.listdir(os.path.join(videos, d)) if f.lower().endswith(VIDEO_EXTENSIONS))
    else:
        list_file = os.path.join(lists, f"{split}list0{fold}.txt")
        if not os.path.isfile(list_file):
            raise ValueError(f"UCF-101 split list not found: {list_file!r}")
        with open(list_file) as f:
            names = [line.split()[0] for line in f if line.strip()]
    entries = [(os.path.join(videos, n), class_caption(n.replace("\\", "/").split("/")[0])) for n in names]
    if not entries:
        raise ValueError(f"no UCF-101 videos found under {root!r}")
    return entries


def open_video_folder(root: str, num_frames: int, height: int, width: int, seed: int = 0, split: str = "train",
                      fold: int = 1, frame_stride: int = 1, random_crop: bool = False) -> VideoClips:
    """A captions-CSV folder or a UCF-101 folder as a :class:`VideoClips` data set."""
    if not os.path.isdir(root):
        raise ValueError(f"video folder not found: {root!r}")
    if os.path.isfile(os.path.join(root, CAPTIONS_FILE)):
        entries = read_captions_csv(root)
    elif is_ucf101(root):
        entries = read_ucf101(root, split, fold)
    else:
        raise ValueError(f"{root!r} has no {CAPTIONS_FILE} and is not a UCF-101 folder (class folders of .avi)")
    return VideoClips(entries, num_frames, height, width, frame_stride, random_crop, seed, root=root)
