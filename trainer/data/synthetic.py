"""Procedural captioned videos: one coloured shape moving over a plain background.

Every clip is fully described by a :class:`ClipSpec` (shape, colour, motion,
background, size, speed, start position) and rendered with :func:`render_clip`.
Captions are paraphrased from templates and synonyms (:func:`make_caption`) or
given in a fixed canonical form (:func:`canonical_caption`).

A fixed set of (colour, shape, motion) triples, :data:`HELDOUT_COMBOS`, is never
produced by the ``"train"`` split. The ``"heldout"`` split produces only those
triples, so it measures compositional generalisation: every colour, shape and
motion of a held-out triple is seen in training, only the combination is new.

Geometry convention: pixel coordinates, x to the right, y downwards, pixel
``(row i, col j)`` has its centre at ``(x, y) = (j + 0.5, i + 0.5)``. "up" means
towards row 0.
"""

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

# -----------------------------------------------------------------------------
# Attribute vocabularies
# -----------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 60, 240),
    "yellow": (240, 230, 30),
    "white": (245, 245, 245),
    "orange": (255, 140, 0),
    "purple": (150, 40, 200),
}

# Colours outside the default training mix: the adapters' worked example (trainer/recipes/cyan.md) teaches
# cyan. Kept apart so that the synthetic data set, its held-out split and its random draws stay as they were.
EXTRA_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "cyan": (0, 230, 230),
}
ALL_COLOURS: Dict[str, Tuple[int, int, int]] = {**COLOURS, **EXTRA_COLOURS}

# Cardinal motions form the default training mix; diagonal ones only on request.
MOTIONS = ("left", "right", "up", "down")
DIAGONAL_MOTIONS = ("up-left", "up-right", "down-left", "down-right")
ALL_MOTIONS = MOTIONS + DIAGONAL_MOTIONS

# Dark backgrounds, far (>= 150 in RGB L2 distance) from every object colour.
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark_gray": (50, 50, 50),
    "dark_brown": (60, 40, 20),
    "dark_teal": (10, 50, 50),
}

# Unit displacement per motion, in image coordinates (y points down).
_S = 1.0 / math.sqrt(2.0)
MOTION_VECTORS: Dict[str, Tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_S, -_S),
    "up-right": (_S, -_S),
    "down-left": (-_S, _S),
    "down-right": (_S, _S),
}

# -----------------------------------------------------------------------------
# Caption vocabulary (the canonical word comes first in every list)
# -----------------------------------------------------------------------------

COLOUR_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "yellow": ("yellow", "golden"),
    "white": ("white", "snowy"),
    "orange": ("orange", "amber"),
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "aqua", "turquoise"),
}

SHAPE_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
}

MOTION_PHRASES: Dict[str, Tuple[str, ...]] = {
    "left": ("moving left", "sliding to the left", "going leftward", "travelling left", "drifting leftward"),
    "right": ("moving right", "sliding to the right", "going rightward", "travelling right", "drifting rightward"),
    "up": ("moving up", "sliding upward", "going upward", "travelling up", "rising"),
    "down": ("moving down", "sliding downward", "going downward", "travelling down", "falling"),
    "up-left": ("moving up-left", "drifting up and to the left", "heading to the top left"),
    "up-right": ("moving up-right", "drifting up and to the right", "heading to the top right"),
    "down-left": ("moving down-left", "drifting down and to the left", "heading to the bottom left"),
    "down-right": ("moving down-right", "drifting down and to the right", "heading to the bottom right"),
}

BACKGROUND_NAMES: Dict[str, Tuple[str, ...]] = {
    "black": ("black",),
    "dark_gray": ("dark gray", "dark grey"),
    "dark_brown": ("dark brown",),
    "dark_teal": ("dark teal",),
}

_TEMPLATES = (
    "{a} {colour} {shape} {motion}",
    "{colour} {shape} {motion}",
    "{a} {colour} {shape} {motion} on {bg_a} {bg} background",
    "the {colour} {shape} is {motion}",
    "video of {a} {colour} {shape} {motion}",
    "{a} {colour} {shape} {motion} across {bg_a} {bg} background",
)

# -----------------------------------------------------------------------------
# Held-out combinations
# -----------------------------------------------------------------------------

# Eight (colour, shape, motion) triples never produced by the "train" split.
# Together they cover all 7 colours, all 3 shapes and all 4 cardinal motions,
# and every pair inside a triple (colour-shape, colour-motion, shape-motion)
# still occurs in training with a different third attribute.
HELDOUT_COMBOS: Tuple[Tuple[str, str, str], ...] = (
    ("red", "triangle", "up"),
    ("green", "circle", "left"),
    ("blue", "square", "down"),
    ("yellow", "triangle", "right"),
    ("white", "circle", "up"),
    ("orange", "square", "left"),
    ("purple", "circle", "right"),
    ("purple", "triangle", "down"),
)
_HELDOUT_SET = frozenset(HELDOUT_COMBOS)

SPLITS = ("train", "heldout")

# Object half-size as a fraction of min(height, width).
SIZE_RANGE = (0.15, 0.25)
# Fraction of the free room (frame minus object and margins) covered over the whole clip.
TRAVEL_RANGE = (0.5, 1.0)


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip.

    Geometry is in pixels of the frame the spec was sampled for: ``size`` is the
    circle radius / square and triangle half-size, ``speed`` the displacement per
    frame along the motion direction, ``start`` the object centre (x, y) in the
    first frame (the centre of the bounding box, also for triangles).
    """

    shape: str
    colour: str
    motion: str
    background: str
    size: float
    speed: float
    start: Tuple[float, float]

    @property
    def combo(self) -> Tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)

    def attributes(self) -> Dict[str, object]:
        """Plain python attribute dict (no start position)."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "motion": self.motion,
            "background": self.background,
            "size": float(self.size),
            "speed": float(self.speed),
        }

    def centres(self, num_frames: int) -> np.ndarray:
        """Object centres (x, y) per frame, shape (num_frames, 2)."""
        t = np.arange(num_frames, dtype=np.float64)[:, None]
        direction = np.asarray(MOTION_VECTORS[self.motion], dtype=np.float64)
        return np.asarray(self.start, dtype=np.float64)[None] + t * self.speed * direction[None]


def is_heldout(spec) -> bool:
    """True if the (colour, shape, motion) triple of ``spec`` is held out.

    Accepts a :class:`ClipSpec`, an attribute dict or a (colour, shape, motion) tuple.
    """
    if isinstance(spec, ClipSpec):
        key = spec.combo
    elif isinstance(spec, dict):
        key = (spec["colour"], spec["shape"], spec["motion"])
    else:
        key = tuple(spec)
    return key in _HELDOUT_SET


def split_combos(split: str = "train", motions: Sequence[str] = MOTIONS) -> List[Tuple[str, str, str]]:
    """All (colour, shape, motion) triples a split may produce, in a fixed order."""
    _check_split(split)
    for m in motions:
        if m not in MOTION_VECTORS:
            raise ValueError(f"unknown motion {m!r}; expected one of {ALL_MOTIONS}")
    combos = [
        (c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, motions) if is_heldout((c, s, m)) == (split == "heldout")
    ]
    if not combos:
        raise ValueError(f"split {split!r} has no combination with motions {tuple(motions)}")
    return combos


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# -----------------------------------------------------------------------------
# Sampling
# -----------------------------------------------------------------------------


def sample_geometry(
    rng: np.random.Generator, motion: str, num_frames: int = 16, height: int = 32, width: int = 32
) -> Tuple[float, float, Tuple[float, float]]:
    """Draws (size, speed, start) so the object stays fully inside the frame.

    The whole trajectory keeps a one-pixel margin between the object (including
    its anti-aliased edge) and the frame border.
    """
    size = float(rng.uniform(*SIZE_RANGE) * min(height, width))
    margin = size + 1.0
    ux, uy = MOTION_VECTORS[motion]
    room_x, room_y = width - 2.0 * margin, height - 2.0 * margin
    # Longest travel along the direction that keeps the whole trajectory inside.
    max_travel = min(room_x / abs(ux) if ux else math.inf, room_y / abs(uy) if uy else math.inf)
    travel = float(rng.uniform(*TRAVEL_RANGE)) * max_travel
    speed = travel / max(num_frames - 1, 1)

    start = []
    for u, extent in ((ux, width), (uy, height)):
        d = travel * u
        lo, hi = margin + max(0.0, -d), extent - margin - max(0.0, d)
        if hi < lo:  # cannot fit: centre the trajectory
            lo = hi = 0.5 * (extent - d)
        start.append(float(rng.uniform(lo, hi)))
    return size, speed, (start[0], start[1])


def sample_spec(
    rng: np.random.Generator,
    split: str = "train",
    motions: Sequence[str] = MOTIONS,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    combo: Optional[Tuple[str, str, str]] = None,
) -> ClipSpec:
    """Draws a random clip spec of ``split`` for frames of the given geometry.

    ``"train"`` never returns a held-out (colour, shape, motion) triple and
    ``"heldout"`` only returns held-out ones; the triple is uniform over the
    split's allowed combinations (see :func:`split_combos`). Pass ``combo`` to
    fix the triple and only draw background and geometry.
    """
    if combo is None:
        combos = split_combos(split, motions)
        combo = combos[int(rng.integers(len(combos)))]
    colour, shape, motion = combo
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size, speed, start = sample_geometry(rng, motion, num_frames, height, width)
    return ClipSpec(shape, colour, motion, background, size, speed, start)


# -----------------------------------------------------------------------------
# Rendering
# -----------------------------------------------------------------------------


def shape_coverage(shape: str, cx: np.ndarray, cy: np.ndarray, size: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` centred at (cx[k], cy[k]).

    Uses a signed distance to the outline (positive inside) and a one-pixel ramp.
    Returns float32 (K, height, width).
    """
    x = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :] - np.asarray(cx, np.float32)[:, None, None]
    y = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None] - np.asarray(cy, np.float32)[:, None, None]
    s = np.float32(size)
    if shape == "circle":
        dist = s - np.sqrt(x * x + y * y)
    elif shape == "square":
        dist = np.minimum(s - np.abs(x), s - np.abs(y))
    elif shape == "triangle":
        # Upward isosceles: apex (0, -s), base corners (+-s, s).
        slanted = (-2.0 * np.abs(x) + (y + s)) / np.float32(math.sqrt(5.0))
        dist = np.minimum(slanted, s - y)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.clip(dist + 0.5, 0.0, 1.0)


def render_clip(spec: ClipSpec, num_frames: int = 16, height: int = 32, width: int = 32) -> np.ndarray:
    """Renders ``spec`` as uint8 frames of shape (num_frames, height, width, 3)."""
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"bad clip geometry {(num_frames, height, width)}")
    centres = spec.centres(num_frames)
    cov = shape_coverage(spec.shape, centres[:, 0], centres[:, 1], spec.size, height, width)[..., None]
    bg = np.asarray(BACKGROUNDS[spec.background], np.float32)
    fg = np.asarray(ALL_COLOURS[spec.colour], np.float32)
    frames = bg * (1.0 - cov) + fg * cov
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


# -----------------------------------------------------------------------------
# Captions
# -----------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def canonical_caption(spec: ClipSpec) -> str:
    """Fixed caption form, e.g. ``"a red circle moving right"``."""
    return f"{_article(spec.colour)} {spec.colour} {spec.shape} moving {spec.motion}"


def make_caption(spec: ClipSpec, rng: np.random.Generator) -> str:
    """Random paraphrase of ``spec``, e.g. ``"a crimson disc drifting rightward"``."""
    colour = _choice(rng, COLOUR_SYNONYMS[spec.colour])
    bg = _choice(rng, BACKGROUND_NAMES[spec.background])
    return _choice(rng, _TEMPLATES).format(
        a=_article(colour),
        colour=colour,
        shape=_choice(rng, SHAPE_SYNONYMS[spec.shape]),
        motion=_choice(rng, MOTION_PHRASES[spec.motion]),
        bg_a=_article(bg),
        bg=bg,
    )


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# -----------------------------------------------------------------------------
# Dataset
# -----------------------------------------------------------------------------


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (L, H, W, 3) -> float32 tensor (L, 3, H, W) in [-1, 1]."""
    video = np.asarray(frames, dtype=np.float32).transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(video))


class SyntheticVideos(Dataset):
    """Infinite-style procedural data set of captioned clips.

    Item ``i`` depends only on ``(seed, split, i)``. Each item is a dict with
    ``video`` (float32 (num_frames, 3, height, width) in [-1, 1]), ``caption``
    (paraphrased or canonical) and ``attributes`` (see :meth:`ClipSpec.attributes`).
    """

    def __init__(
        self,
        num_clips: int = 10000,
        num_frames: int = 16,
        height: int = 32,
        width: int = 32,
        split: str = "train",
        seed: int = 0,
        paraphrase: bool = True,
        motions: Sequence[str] = MOTIONS,
    ):
        _check_split(split)
        split_combos(split, motions)  # validates motions early; a filter that leaves no combination raises
        if num_clips < 1:
            raise ValueError(f"a synthetic data set needs at least one clip, got num_clips={num_clips}")
        self.num_clips = num_clips
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.split = split
        self.seed = seed
        self.paraphrase = paraphrase
        self.motions = tuple(motions)

    def __len__(self) -> int:
        return self.num_clips

    def spec(self, index: int) -> Tuple[ClipSpec, np.random.Generator]:
        """Spec of item ``index`` and the generator to continue drawing from."""
        if not 0 <= index < self.num_clips:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        spec = sample_spec(rng, self.split, self.motions, self.num_frames, self.height, self.width)
        return spec, rng

    def __getitem__(self, index: int) -> Dict[str, object]:
        spec, rng = self.spec(index)
        caption = make_caption(spec, rng) if self.paraphrase else canonical_caption(spec)
        frames = render_clip(spec, self.num_frames, self.height, self.width)
        return {"video": frames_to_tensor(frames), "caption": caption, "attributes": spec.attributes()}


def collate_synthetic(batch: List[Dict[str, object]]) -> Dict[str, object]:
    """DataLoader collate: stacked ``video`` (B, L, 3, H, W), lists of captions and attributes."""
    return {
        "video": torch.stack([item["video"] for item in batch]),
        "caption": [item["caption"] for item in batch],
        "attributes": [item["attributes"] for item in batch],
    }


def prompts_for(
    split: str = "heldout",
    n: int = 16,
    seed: int = 0,
    paraphrase: bool = False,
    motions: Sequence[str] = MOTIONS,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
) -> List[Tuple[str, ClipSpec]]:
    """Evaluation prompts: ``n`` (caption, ClipSpec) pairs of ``split``.

    Combinations are covered evenly: the split's triples are shuffled once and
    cycled, so every triple appears ``n // len(combos)`` or one more times.
    The specs give the ground truth attributes (and a reference clip via
    :func:`render_clip`) for each caption.
    """
    combos = split_combos(split, motions)
    rng = np.random.default_rng([seed, SPLITS.index(split), 1 << 20])
    order = rng.permutation(len(combos))
    prompts = []
    for k in range(n):
        spec = sample_spec(rng, split, motions, num_frames, height, width, combo=combos[order[k % len(combos)]])
        caption = make_caption(spec, rng) if paraphrase else canonical_caption(spec)
        prompts.append((caption, spec))
    return prompts


__all__ = [
    "ALL_COLOURS",
    "ALL_MOTIONS",
    "EXTRA_COLOURS",
    "BACKGROUNDS",
    "BACKGROUND_NAMES",
    "COLOURS",
    "COLOUR_SYNONYMS",
    "ClipSpec",
    "DIAGONAL_MOTIONS",
    "HELDOUT_COMBOS",
    "MOTIONS",
    "MOTION_PHRASES",
    "MOTION_VECTORS",
    "SHAPES",
    "SHAPE_SYNONYMS",
    "SPLITS",
    "SyntheticVideos",
    "canonical_caption",
    "collate_synthetic",
    "frames_to_tensor",
    "is_heldout",
    "make_caption",
    "prompts_for",
    "render_clip",
    "sample_geometry",
    "sample_spec",
    "shape_coverage",
    "split_combos",
]
