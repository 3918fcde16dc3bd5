"""Measure colour, shape and motion of a single-object clip from its pixels.

Works on real clips from :mod:`trainer.data.synthetic` and on generated ones:
nothing but the frames is used. The pipeline is

1. background: per-frame median colour of the border pixels;
2. rough object colour: median of the pixels far from their frame's background;
3. object mask: pixels closer to the rough object colour than to the background
   (and not too close to the background), keeping the largest 4-connected blob;
4. colour: nearest :data:`COLOURS` entry to the median colour of the mask core
   (the half of the mask pixels farthest from the background, which drops
   anti-aliased edge pixels), over all frames;
5. motion: least-squares line through the mask centroid track; the motion
   whose direction best matches the fitted displacement;
6. shape: from two bounding-box statistics of the mask, medians over the frames
   where the object is fully inside: the fill ratio (triangle ~1/2, circle
   ~pi/4, square 1) and the height of the mask centroid in the box measured
   from the top (1/2 for circle and square, 2/3 for the upward triangle). The
   centroid height separates triangles even for tiny objects where the fill
   ratio alone is ambiguous; the fill ratio then separates circle and square.
"""

import math
from typing import Dict, Mapping, Sequence

import numpy as np
import torch

from trainer.data.synthetic import BACKGROUNDS, COLOURS, MOTION_VECTORS, MOTIONS

# Expected fill ratio (mask area / bounding box area) of each shape.
FILL_RATIOS = {"triangle": 0.5, "circle": math.pi / 4.0, "square": 1.0}
# Expected centroid height in the bounding box, from the top, as a fraction of its height.
CENTROID_HEIGHTS = {"triangle": 2.0 / 3.0, "circle": 0.5, "square": 0.5}
# Decision thresholds, about midway between the expected values; the fill ratio
# one sits a bit above pi/8 + 1/2 ~ 0.89 because tiny pixelated circles reach 0.9.
TRIANGLE_CENTROID_HEIGHT = 0.58
SQUARE_FILL_RATIO = 0.92

# RGB L2 distances in uint8 units.
SEED_THRESHOLD = 60.0  # seeds the object colour estimate
MIN_CONTRAST = 30.0  # a mask pixel must be at least this far from the background


def to_uint8_frames(video) -> np.ndarray:
    """Converts a clip to uint8 frames of shape (L, H, W, 3).

    Accepted inputs (a single frame without the leading L axis is also accepted):

    * ``np.ndarray`` uint8, (L, H, W, 3), values in [0, 255];
    * ``np.ndarray`` float, (L, H, W, 3), values in [0, 1];
    * ``torch.Tensor`` float, (L, 3, H, W), values in [-1, 1] (model space);
    * ``torch.Tensor`` uint8, (L, 3, H, W), values in [0, 255].

    Out-of-range float values are clipped.
    """
    if isinstance(video, torch.Tensor):
        x = video.detach().cpu()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"torch video must be (L, 3, H, W), got {tuple(video.shape)}")
        if x.dtype not in (torch.uint8, torch.float32, torch.float64):
            x = x.float()  # e.g. half / bfloat16
        x = x.numpy().transpose(0, 2, 3, 1)
        if x.dtype == np.uint8:
            return np.ascontiguousarray(x)
        return np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)

    x = np.asarray(video)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"numpy video must be (L, H, W, 3), got {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"numpy video must be uint8 or float in [0, 1], got {x.dtype}")
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def border_pixels(frames: np.ndarray) -> np.ndarray:
    """Border pixels of each frame: (L, N, C)."""
    top, bottom = frames[:, 0], frames[:, -1]
    left, right = frames[:, 1:-1, 0], frames[:, 1:-1, -1]
    return np.concatenate([top, bottom, left, right], axis=1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keeps the largest 4-connected component of each (H, W) mask in (L, H, W)."""
    out = np.zeros_like(mask, dtype=bool)
    if not mask.any():
        return out
    # Work inside the bounding box of all masks.
    rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    sub = mask[box]
    ids = np.arange(1, sub[0].size + 1, dtype=np.int32).reshape(sub.shape[1:])
    labels = np.where(sub, ids, 0)
    # Max-label propagation: converges to one label per component.
    while True:
        new = labels.copy()
        np.maximum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.maximum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        np.maximum(new[:, :, 1:], labels[:, :, :-1], out=new[:, :, 1:])
        np.maximum(new[:, :, :-1], labels[:, :, 1:], out=new[:, :, :-1])
        new *= sub
        if np.array_equal(new, labels):
            break
        labels = new
    for t in range(len(sub)):
        values, counts = np.unique(labels[t][labels[t] > 0], return_counts=True)
        if len(values):
            out[box][t] = labels[t] == values[np.argmax(counts)]
    return out


def _distance(x: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """RGB L2 distance of every pixel of x (..., 3) to rgb (broadcastable)."""
    d = x - rgb
    return np.sqrt(np.einsum("...c,...c->...", d, d))


def segment_object(frames: np.ndarray):
    """Segments the object in uint8 frames (L, H, W, 3).

    Returns background colours (L, 3), distance of every pixel to its frame's
    background (L, H, W) and the object masks (L, H, W) (all False if no object).
    """
    x = frames.astype(np.float32)
    background = np.median(border_pixels(x), axis=1)
    dist_bg = _distance(x, background[:, None, None])
    seeds = dist_bg > SEED_THRESHOLD
    if not seeds.any():
        return background, dist_bg, np.zeros(dist_bg.shape, dtype=bool)
    rough = np.median(x[seeds], axis=0)
    mask = (_distance(x, rough) < dist_bg) & (dist_bg > MIN_CONTRAST)
    return background, dist_bg, largest_component(mask)


def nearest_name(rgb, palette: Dict[str, Sequence[int]]):
    """(name, distance) of the palette entry nearest to ``rgb``."""
    names = list(palette)
    dists = np.linalg.norm(np.asarray([palette[n] for n in names], np.float32) - np.asarray(rgb, np.float32), axis=-1)
    k = int(np.argmin(dists))
    return names[k], float(dists[k])


def classify_shape(fill_ratio: float, centroid_height: float) -> str:
    """Shape from the bounding-box fill ratio and centroid height (see module doc)."""
    if centroid_height > TRIANGLE_CENTROID_HEIGHT:
        return "triangle"
    return "square" if fill_ratio > SQUARE_FILL_RATIO else "circle"


def box_statistics(mask: np.ndarray):
    """Fill ratio, centroid height (fraction from the top) and "fully inside" flag of a (H, W) mask."""
    height, width = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box_h, box_w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    area = mask.sum()
    fill = area / (box_h * box_w)
    centroid_y = (mask.sum(axis=1) * np.arange(height)).sum() / area + 0.5
    centroid_height = (centroid_y - rows[0]) / box_h
    inside = rows[0] > 0 and cols[0] > 0 and rows[-1] < height - 1 and cols[-1] < width - 1
    return float(fill), float(centroid_height), bool(inside)


def measure_attributes(video, motions: Sequence[str] = MOTIONS, min_displacement: float = 1.0,
                       colours: Mapping[str, Sequence[int]] = COLOURS) -> Dict[str, object]:
    """Measures the attributes of a single-object clip from its pixels.

    Args:
        video: a clip in one of the layouts of :func:`to_uint8_frames`.
        motions: candidate motion names (keys of ``MOTION_VECTORS``).
        min_displacement: fitted displacement over the clip (pixels) below which
            no motion is reported (always the case for a single frame).
        colours: the palette the colour is named from (name -> RGB); default the
            training colours, :data:`~trainer.data.synthetic.ALL_COLOURS` adds cyan.

    Returns:
        dict with ``colour``, ``shape``, ``motion`` (None when not measurable),
        ``background`` (nearest :data:`BACKGROUNDS` name) and diagnostics:
        ``object_rgb``, ``colour_distance`` (to the chosen palette colour),
        ``fill_ratio``, ``centroid_height``, ``displacement`` (dx, dy over the
        whole clip, pixels), ``motion_confidence`` (cosine between displacement
        and chosen motion direction), ``object_frames`` (frames with an object).
    """
    frames = to_uint8_frames(video)
    num_frames, height, width, _ = frames.shape
    background, dist_bg, mask = segment_object(frames)
    area = mask.sum(axis=(1, 2))
    present = np.flatnonzero(area > 0)
    result = {
        "colour": None,
        "shape": None,
        "motion": None,
        "background": nearest_name(np.median(background, axis=0), BACKGROUNDS)[0],
        "object_rgb": None,
        "colour_distance": None,
        "fill_ratio": None,
        "centroid_height": None,
        "displacement": None,
        "motion_confidence": 0.0,
        "object_frames": len(present),
    }
    if len(present) == 0:
        return result

    # Colour: median over the mask core of all frames.
    core = mask & (dist_bg >= np.median(dist_bg[mask]))
    rgb = np.median(frames[core].astype(np.float32), axis=0)
    result["object_rgb"] = tuple(float(v) for v in rgb)
    result["colour"], result["colour_distance"] = nearest_name(rgb, colours)

    # Shape: box statistics over the frames where the object is fully inside.
    stats = np.array([box_statistics(mask[t]) for t in present])
    inside = stats[:, 2] > 0
    fill, centroid_height = np.median(stats[inside] if inside.any() else stats, axis=0)[:2]
    result["fill_ratio"], result["centroid_height"] = float(fill), float(centroid_height)
    result["shape"] = classify_shape(fill, centroid_height)

    # Motion: slope of a line fitted to the centroid track.
    if len(present) >= 2:
        xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
        cx = (mask[present].sum(axis=1) * xs).sum(axis=1) / area[present]
        cy = (mask[present].sum(axis=2) * ys).sum(axis=1) / area[present]
        disp = np.array([np.polyfit(present, cx, 1)[0], np.polyfit(present, cy, 1)[0]]) * (num_frames - 1)
        result["displacement"] = (float(disp[0]), float(disp[1]))
        norm = float(np.linalg.norm(disp))
        if norm >= min_displacement:
            cosines = {m: float(np.dot(MOTION_VECTORS[m], disp)) / norm for m in motions}
            best = max(cosines, key=cosines.get)
            result["motion"], result["motion_confidence"] = best, cosines[best]
    return result


__all__ = [
    "CENTROID_HEIGHTS",
    "FILL_RATIOS",
    "border_pixels",
    "box_statistics",
    "classify_shape",
    "largest_component",
    "measure_attributes",
    "nearest_name",
    "segment_object",
    "to_uint8_frames",
]
