"""Tests for the procedural captioned-video data set."""

import itertools
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trainer.data import (
    ALL_MOTIONS,
    BACKGROUNDS,
    COLOUR_SYNONYMS,
    COLOURS,
    DIAGONAL_MOTIONS,
    HELDOUT_COMBOS,
    MOTION_PHRASES,
    MOTIONS,
    SHAPE_SYNONYMS,
    SHAPES,
    ClipSpec,
    SyntheticVideos,
    canonical_caption,
    collate_synthetic,
    is_heldout,
    make_caption,
    prompts_for,
    render_clip,
    sample_spec,
    split_combos,
)


def object_mask(frames, background):
    """Pixels of uint8 frames (L, H, W, 3) that differ from the background colour."""
    dist = np.abs(frames.astype(np.int32) - np.asarray(BACKGROUNDS[background])).sum(-1)
    return dist > 60


def coverage(frames, spec):
    """Per-pixel object coverage in [0, 1] recovered from the rendered colours."""
    bg, fg = np.asarray(BACKGROUNDS[spec.background]), np.asarray(COLOURS[spec.colour])
    return np.abs(frames.astype(np.float64) - bg).sum(-1) / np.abs(fg - bg).sum()


def centroids(weights):
    """Weighted centroids (x, y) of (L, H, W) weights."""
    ys, xs = np.arange(weights.shape[1]) + 0.5, np.arange(weights.shape[2]) + 0.5
    total = weights.sum(axis=(1, 2))
    cx = (weights.sum(axis=1) * xs).sum(axis=1) / total
    cy = (weights.sum(axis=2) * ys).sum(axis=1) / total
    return np.stack([cx, cy], axis=1)


def to_uint8(video):
    return np.rint((video.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)


# ---------------------------------------------------------------------------
# Vocabulary and held-out combinations
# ---------------------------------------------------------------------------


def test_vocabulary():
    assert SHAPES == ("circle", "square", "triangle")
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "white", "orange", "purple"]
    assert MOTIONS == ("left", "right", "up", "down")
    assert len(BACKGROUNDS) == 4 and "black" in BACKGROUNDS
    # Backgrounds are dark and far from every object colour.
    for bg, obj in itertools.product(BACKGROUNDS.values(), COLOURS.values()):
        assert np.linalg.norm(np.subtract(bg, obj)) > 120
    for a, b in itertools.combinations(COLOURS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > 80


def test_heldout_set_covers_every_attribute():
    assert 7 <= len(HELDOUT_COMBOS) <= 12
    assert len(set(HELDOUT_COMBOS)) == len(HELDOUT_COMBOS)
    colours, shapes, motions = zip(*HELDOUT_COMBOS)
    assert set(colours) == set(COLOURS)
    assert set(shapes) == set(SHAPES)
    assert set(motions) == set(MOTIONS)
    # Every pair inside a held-out triple still occurs in training.
    train = split_combos("train")
    assert len(train) + len(HELDOUT_COMBOS) == len(COLOURS) * len(SHAPES) * len(MOTIONS)
    for c, s, m in HELDOUT_COMBOS:
        assert any(t[:2] == (c, s) for t in train)
        assert any(t[0] == c and t[2] == m for t in train)
        assert any(t[1:] == (s, m) for t in train)


def test_train_and_heldout_are_disjoint():
    rng = np.random.default_rng(0)
    train = [sample_spec(rng, "train") for _ in range(2000)]
    assert not any(is_heldout(s) for s in train)
    assert {s.combo for s in train} == set(split_combos("train"))  # every allowed combo is reachable

    heldout = [sample_spec(rng, "heldout") for _ in range(500)]
    assert all(is_heldout(s) for s in heldout)
    assert {s.combo for s in heldout} == set(HELDOUT_COMBOS)

    ds_train = SyntheticVideos(num_clips=300, split="train", seed=3)
    ds_heldout = SyntheticVideos(num_clips=100, split="heldout", seed=3)
    assert not any(is_heldout(ds_train.spec(i)[0]) for i in range(len(ds_train)))
    assert all(is_heldout(ds_heldout[i]["attributes"]) for i in range(0, len(ds_heldout), 10))


def test_is_heldout_accepts_specs_dicts_and_tuples():
    c, s, m = HELDOUT_COMBOS[0]
    spec = ClipSpec(s, c, m, "black", 5.0, 1.0, (16.0, 16.0))
    assert is_heldout(spec) and is_heldout(spec.attributes()) and is_heldout((c, s, m))
    assert ("red", "circle", "up") not in HELDOUT_COMBOS
    assert not is_heldout(ClipSpec("circle", "red", "up", "black", 5.0, 1.0, (16.0, 16.0)))
    assert not is_heldout(("red", "circle", "up"))


def test_diagonal_motions_only_on_request():
    rng = np.random.default_rng(1)
    assert not any(sample_spec(rng).motion in DIAGONAL_MOTIONS for _ in range(300))
    motions = {sample_spec(rng, motions=ALL_MOTIONS).motion for _ in range(300)}
    assert motions == set(ALL_MOTIONS)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        SyntheticVideos(split="val")
    with pytest.raises(ValueError):
        sample_spec(np.random.default_rng(0), motions=("sideways",))
    with pytest.raises(ValueError):  # no held-out combo is diagonal
        sample_spec(np.random.default_rng(0), "heldout", motions=DIAGONAL_MOTIONS)
    with pytest.raises(IndexError):
        SyntheticVideos(num_clips=3)[3]


def test_filters_that_leave_no_clip_raise():
    """Like a video folder with no usable video: an empty synthetic set is an error at once, never a
    data set that cannot give a batch."""
    with pytest.raises(ValueError, match="no combination"):
        SyntheticVideos(split="heldout", motions=DIAGONAL_MOTIONS)
    with pytest.raises(ValueError, match="num_clips=0"):
        SyntheticVideos(num_clips=0)


# ---------------------------------------------------------------------------
# Rendering and items
# ---------------------------------------------------------------------------


def test_determinism():
    a = SyntheticVideos(num_clips=50, seed=7)
    b = SyntheticVideos(num_clips=50, seed=7)
    for i in (0, 13, 49):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"])
        assert x["caption"] == y["caption"] and x["attributes"] == y["attributes"]
    assert not torch.equal(a[0]["video"], a[1]["video"])
    assert not torch.equal(a[0]["video"], SyntheticVideos(num_clips=50, seed=8)[0]["video"])
    assert not torch.equal(a[0]["video"], SyntheticVideos(num_clips=50, seed=7, split="heldout")[0]["video"])
    # Captions differ across items too.
    assert len({a[i]["caption"] for i in range(20)}) > 10


@pytest.mark.parametrize("num_frames", [1, 16])
@pytest.mark.parametrize("height,width", [(32, 32), (32, 64), (64, 32), (16, 16)])
def test_item_shapes_and_range(num_frames, height, width):
    ds = SyntheticVideos(num_clips=4, num_frames=num_frames, height=height, width=width, seed=1)
    for i in range(len(ds)):
        item = ds[i]
        video = item["video"]
        assert video.shape == (num_frames, 3, height, width)
        assert video.dtype == torch.float32
        assert video.min() >= -1.0 and video.max() <= 1.0
        frames = to_uint8(video)
        attrs = item["attributes"]
        assert set(attrs) == {"shape", "colour", "motion", "background", "size", "speed"}
        assert all(isinstance(attrs[k], str) for k in ("shape", "colour", "motion", "background"))
        assert all(type(attrs[k]) is float for k in ("size", "speed"))
        assert 0.15 <= attrs["size"] / min(height, width) <= 0.25
        # The object is drawn in its exact colour and the background is visible.
        colour = np.asarray(COLOURS[attrs["colour"]])
        assert (np.abs(frames.astype(int) - colour).max(-1) == 0).any(axis=(1, 2)).all()
        assert (np.abs(frames[:, 0, 0].astype(int) - BACKGROUNDS[attrs["background"]]).max(-1) == 0).all()


def test_object_stays_inside_and_moves_the_right_way():
    for height, width in [(32, 32), (32, 64), (64, 32)]:
        ds = SyntheticVideos(num_clips=30, num_frames=16, height=height, width=width, seed=2)
        for i in range(len(ds)):
            spec, _ = ds.spec(i)
            frames = render_clip(spec, 16, height, width)
            mask = object_mask(frames, spec.background)
            # Whole trajectory inside the frame: the border is background only.
            border = np.concatenate([mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]], axis=1)
            assert not border.any()
            # Object area is constant (never clipped).
            cov = coverage(frames, spec)
            area = cov.sum(axis=(1, 2))
            assert area.max() - area.min() <= 0.03 * area.mean()
            c = centroids(cov)
            dx, dy = c[-1] - c[0]
            along = {"right": dx, "left": -dx, "down": dy, "up": -dy}[spec.motion]
            across = dy if spec.motion in ("left", "right") else dx
            assert along > 0.4 * min(height, width) / 4, (spec, dx, dy)
            assert abs(across) < 0.5
            np.testing.assert_allclose(along, spec.speed * 15, atol=0.5)


def test_diagonal_motion_in_pixels():
    ds = SyntheticVideos(num_clips=40, seed=4, height=32, width=48, motions=ALL_MOTIONS)
    seen = set()
    for i in range(len(ds)):
        spec, _ = ds.spec(i)
        if spec.motion not in DIAGONAL_MOTIONS:
            continue
        seen.add(spec.motion)
        c = centroids(coverage(render_clip(spec, 16, 32, 48), spec))
        dx, dy = c[-1] - c[0]
        assert np.sign(dx) == (1 if "right" in spec.motion else -1)
        assert np.sign(dy) == (1 if "down" in spec.motion else -1)
        assert abs(abs(dx) - abs(dy)) < 0.5
    assert seen


def test_shapes_in_pixels():
    """Square fills its box, the circle ~pi/4 of it, the triangle half and points up."""
    fills = {}
    for shape in ("circle", "square", "triangle"):
        spec = ClipSpec(shape, "white", "right", "black", size=12.0, speed=0.0, start=(32.0, 32.0))
        mask = object_mask(render_clip(spec, 1, 64, 64), "black")[0]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert abs(len(rows) - 24) <= 1 and abs(len(cols) - 24) <= 1
        fills[shape] = mask.sum() / (len(rows) * len(cols))
        if shape == "triangle":
            widths = mask.sum(1)[rows]
            assert widths[0] <= 3 and widths[-1] >= 22  # apex on top, base at the bottom
            assert np.all(np.diff(widths) >= 0)
    assert fills["square"] > 0.97
    assert 0.72 < fills["circle"] < 0.85
    assert 0.45 < fills["triangle"] < 0.6


def test_render_clip_any_geometry():
    spec = sample_spec(np.random.default_rng(5), num_frames=3, height=20, width=50)
    frames = render_clip(spec, 3, 20, 50)
    assert frames.shape == (3, 20, 50, 3) and frames.dtype == np.uint8
    with pytest.raises(ValueError):
        render_clip(spec, 0, 20, 50)


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


def words(caption):
    return set(re.findall(r"[a-z]+", caption))


def test_captions_mention_attributes():
    ds = SyntheticVideos(num_clips=300, seed=11)
    captions = set()
    for i in range(len(ds)):
        item = ds[i]
        caption, a = item["caption"], item["attributes"]
        captions.add(caption)
        w = words(caption)
        assert w & set(COLOUR_SYNONYMS[a["colour"]]), caption
        assert w & set(SHAPE_SYNONYMS[a["shape"]]), caption
        assert any(p in caption for p in MOTION_PHRASES[a["motion"]]), caption
        for other in COLOURS:
            if other != a["colour"]:
                assert not w & set(COLOUR_SYNONYMS[other]), caption
        for other in SHAPES:
            if other != a["shape"]:
                assert not w & set(SHAPE_SYNONYMS[other]), caption
        for other in MOTIONS:
            if other != a["motion"]:
                assert not any(p in caption for p in MOTION_PHRASES[other]), caption
        assert not re.search(r"\ba [aeiou]", caption), caption
    assert len(captions) > 200  # paraphrases vary

    canonical = SyntheticVideos(num_clips=20, seed=11, paraphrase=False)
    for i in range(len(canonical)):
        a = canonical[i]["attributes"]
        article = "an" if a["colour"][0] in "aeiou" else "a"
        assert canonical[i]["caption"] == f"{article} {a['colour']} {a['shape']} moving {a['motion']}"


def test_make_caption_uses_synonyms():
    spec = ClipSpec("circle", "red", "right", "black", 5.0, 1.0, (10.0, 10.0))
    assert canonical_caption(spec) == "a red circle moving right"
    rng = np.random.default_rng(0)
    captions = {make_caption(spec, rng) for _ in range(300)}
    colours = set().union(*(words(c) for c in captions)) & set(COLOUR_SYNONYMS["red"])
    shapes = set().union(*(words(c) for c in captions)) & set(SHAPE_SYNONYMS["circle"])
    assert colours == set(COLOUR_SYNONYMS["red"])
    assert shapes == set(SHAPE_SYNONYMS["circle"])
    assert {p for p in MOTION_PHRASES["right"] if any(p in c for c in captions)} == set(MOTION_PHRASES["right"])
    assert any("black background" in c for c in captions)


# ---------------------------------------------------------------------------
# Loading and prompts
# ---------------------------------------------------------------------------


def test_dataloader_with_collate_synthetic():
    ds = SyntheticVideos(num_clips=10, num_frames=4, height=32, width=64)
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_synthetic))
    assert [b["video"].shape for b in batches] == [(4, 4, 3, 32, 64)] * 2 + [(2, 4, 3, 32, 64)]
    first = batches[0]
    assert first["video"].dtype == torch.float32
    assert first["caption"] == [ds[i]["caption"] for i in range(4)]
    assert first["attributes"] == [ds[i]["attributes"] for i in range(4)]
    assert torch.equal(first["video"][2], ds[2]["video"])


def test_prompts_for():
    prompts = prompts_for("heldout", 16, seed=0)
    assert len(prompts) == 16
    assert all(is_heldout(spec) for _, spec in prompts)
    assert sorted(spec.combo for _, spec in prompts) == sorted(list(HELDOUT_COMBOS) * 2)  # even coverage
    assert all(caption == canonical_caption(spec) for caption, spec in prompts)
    assert [c for c, _ in prompts] == [c for c, _ in prompts_for("heldout", 16, seed=0)]
    assert [c for c, _ in prompts] != [c for c, _ in prompts_for("heldout", 16, seed=1)]

    train = prompts_for("train", 100, seed=0, paraphrase=True)
    assert not any(is_heldout(spec) for _, spec in train)
    assert len({spec.combo for _, spec in train}) == 76
    assert any(caption != canonical_caption(spec) for caption, spec in train)
