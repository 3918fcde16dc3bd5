"""Tests for pixel-based attribute measurement."""

import numpy as np
import pytest
import torch

from trainer.attributes import largest_component, measure_attributes, to_uint8_frames
from trainer.data import ALL_MOTIONS, BACKGROUNDS, DIAGONAL_MOTIONS, ClipSpec, SyntheticVideos, render_clip, sample_spec

KEYS = ("colour", "shape", "motion")


def accuracy(pairs):
    """Per-attribute fraction of (measured, truth) pairs that agree."""
    return {k: np.mean([m[k] == t[k] for m, t in pairs]) for k in KEYS}


@pytest.mark.parametrize("height,width", [(32, 32), (64, 64), (32, 64)])
def test_measures_generator_clips(height, width):
    """100% on 60 clean clips per geometry, train and held-out, from the model-space tensor."""
    pairs = []
    for split, seed in (("train", 0), ("heldout", 1)):
        ds = SyntheticVideos(num_clips=30, num_frames=16, height=height, width=width, split=split, seed=seed)
        for i in range(len(ds)):
            item = ds[i]
            measured = measure_attributes(item["video"])
            assert measured["background"] == item["attributes"]["background"]
            assert measured["object_frames"] == 16
            pairs.append((measured, item["attributes"]))
    assert accuracy(pairs) == {k: 1.0 for k in KEYS}
    # The truth is diverse, so matching it is not trivial.
    for k in KEYS:
        assert len({t[k] for _, t in pairs}) >= 3


def test_measures_diagonal_motions():
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(30):
        spec = sample_spec(rng, motions=DIAGONAL_MOTIONS, height=32, width=40)
        pairs.append((measure_attributes(render_clip(spec, 16, 32, 40), motions=ALL_MOTIONS), spec.attributes()))
    assert accuracy(pairs) == {k: 1.0 for k in KEYS}


def test_robust_to_mild_noise():
    rng = np.random.default_rng(4)
    pairs = []
    for _ in range(60):
        spec = sample_spec(rng, height=32, width=32)
        frames = render_clip(spec, 16, 32, 32).astype(np.float32)
        noisy = np.clip(frames + rng.normal(0.0, 8.0, frames.shape), 0, 255).astype(np.uint8)
        pairs.append((measure_attributes(noisy), spec.attributes()))
    acc = accuracy(pairs)
    assert all(v >= 0.95 for v in acc.values()), acc


def test_single_frame_has_no_motion():
    rng = np.random.default_rng(5)
    for _ in range(20):
        spec = sample_spec(rng, num_frames=1, height=32, width=64)
        measured = measure_attributes(render_clip(spec, 1, 32, 64))
        assert measured["motion"] is None and measured["displacement"] is None
        assert measured["colour"] == spec.colour and measured["shape"] == spec.shape


def test_static_object_has_no_motion():
    spec = ClipSpec("square", "green", "right", "dark_gray", size=6.0, speed=0.0, start=(16.0, 16.0))
    measured = measure_attributes(render_clip(spec, 8, 32, 32))
    assert measured["motion"] is None
    assert abs(measured["displacement"][0]) < 1e-6 and abs(measured["displacement"][1]) < 1e-6
    assert (measured["colour"], measured["shape"]) == ("green", "square")


def test_each_motion_is_told_apart():
    for motion in ("left", "right", "up", "down"):
        spec = ClipSpec("circle", "white", motion, "black", size=6.0, speed=1.0, start=(24.0, 24.0))
        measured = measure_attributes(render_clip(spec, 9, 48, 48))
        assert measured["motion"] == motion
        assert measured["motion_confidence"] > 0.99


def test_empty_clip():
    frames = np.broadcast_to(np.asarray(BACKGROUNDS["dark_teal"], np.uint8), (4, 32, 32, 3))
    measured = measure_attributes(frames)
    assert measured["colour"] is None and measured["shape"] is None and measured["motion"] is None
    assert measured["background"] == "dark_teal" and measured["object_frames"] == 0


def test_ignores_small_distractor():
    spec = ClipSpec("triangle", "orange", "down", "black", size=8.0, speed=1.0, start=(40.0, 12.0))
    frames = render_clip(spec, 16, 48, 64)
    frames[:, 30:32, 8:10] = 255  # 2x2 white speck far from the object
    measured = measure_attributes(frames)
    assert (measured["colour"], measured["shape"], measured["motion"]) == ("orange", "triangle", "down")


def test_largest_component():
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[0, 1:4, 1:4] = True  # 9 pixels
    mask[0, 6, 6] = True
    mask[0, 5:7, 0:2] = True  # 4 pixels
    mask[1, 0, :] = True  # 8 pixels, touching the border
    mask[1, 3:5, 3:5] = True
    out = largest_component(mask)
    expected = np.zeros_like(mask)
    expected[0, 1:4, 1:4] = True
    expected[1, 0, :] = True
    np.testing.assert_array_equal(out, expected)
    assert not largest_component(np.zeros((1, 4, 4), dtype=bool)).any()


def test_input_layouts_agree():
    spec = sample_spec(np.random.default_rng(6), height=32, width=64)
    frames = render_clip(spec, 16, 32, 64)
    as_float = frames.astype(np.float64) / 255.0
    as_model = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    for video in (frames, as_float, as_float.astype(np.float32), as_model, as_model.half(), as_model.to(torch.uint8)):
        if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
            video = torch.from_numpy(frames).permute(0, 3, 1, 2)
        out = to_uint8_frames(video)
        assert out.dtype == np.uint8 and out.shape == (16, 32, 64, 3)
        assert np.abs(out.astype(int) - frames).max() <= 1
    # Single frames and out-of-range floats.
    assert to_uint8_frames(frames[0]).shape == (1, 32, 64, 3)
    assert to_uint8_frames(as_model[0]).shape == (1, 32, 64, 3)
    assert to_uint8_frames(np.full((1, 2, 2, 3), 1.5)).max() == 255
    assert to_uint8_frames(torch.full((1, 3, 2, 2), -3.0)).max() == 0
    measured = [measure_attributes(v) for v in (frames, as_float, as_model)]
    assert all(m[k] == measured[0][k] for m in measured for k in KEYS)
    assert [measured[0][k] for k in KEYS] == [spec.colour, spec.shape, spec.motion]


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3, 8, 8), np.uint8), torch.zeros(2, 8, 8, 3), np.zeros((2, 8, 8, 3), np.int64), np.zeros((8, 8))],
)
def test_bad_layouts_raise(bad):
    with pytest.raises(ValueError):
        to_uint8_frames(bad)
