"""Video writers (.mp4, .gif, .npy; atomic, Ctrl-C safe) and image reading."""

import os

import numpy as np
import pytest

from engine.video_io import check_output_dir, check_output_path, read_image, write_video


def _frames(n=6, h=16, w=24, seed=0):
    """Smooth colour gradients that change over time (codecs keep those; random noise they would not)."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    colours = rng.random((3, 3))
    frames = [np.stack([c[0] * y + c[1] * x * (1 - t / n) + c[2] * t / n for c in colours], -1) for t in range(n)]
    return np.clip(np.stack(frames) / 2, 0, 1).astype(np.float32)


def test_npy_holds_uint8_frames(tmp_path):
    frames = _frames()
    path = write_video(str(tmp_path / "v.npy"), frames)
    data = np.load(path)
    assert data.dtype == np.uint8 and data.shape == (6, 16, 24, 3)
    np.testing.assert_array_equal(data, np.round(frames * 255).astype(np.uint8))
    assert os.listdir(tmp_path) == ["v.npy"]


@pytest.mark.parametrize("ext", [".mp4", ".gif"])
def test_mp4_and_gif_decode_to_the_frames(tmp_path, ext):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="mp4/gif writing needs imageio-ffmpeg")

    frames = _frames()
    path = write_video(str(tmp_path / f"v{ext}"), frames, fps=6)
    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    decoded = [np.frombuffer(f, np.uint8).reshape(16, 24, 3) for f in reader]
    assert meta["size"] == (24, 16) and len(decoded) == 6
    err = np.abs(np.stack(decoded).astype(np.float32) / 255 - frames).mean()
    assert err < 0.02, err  # lossy codecs, but the same picture (reversed time would be ~0.07)
    assert os.listdir(tmp_path) == [f"v{ext}"]


class _InterruptedFrames:
    """Frames whose fourth read raises KeyboardInterrupt, as Ctrl-C in the middle of writing would."""

    def __init__(self, frames):
        self.frames = frames

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        if i == 3:
            raise KeyboardInterrupt
        return self.frames[i]


@pytest.mark.parametrize("ext", [".mp4", ".npy"])
def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(tmp_path, ext):
    if ext == ".mp4":
        pytest.importorskip("imageio_ffmpeg", reason="mp4 writing needs imageio-ffmpeg")
    path = tmp_path / f"v{ext}"
    with pytest.raises(KeyboardInterrupt):
        write_video(str(path), _InterruptedFrames(_frames()))
    assert os.listdir(tmp_path) == []
    write_video(str(path), _frames(seed=1))
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        write_video(str(path), _InterruptedFrames(_frames(seed=2)))
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == before


def test_bad_outputs_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="'.avi'"):
        check_output_path(str(tmp_path / "v.avi"))
    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(str(tmp_path / "missing" / "v.mp4"))
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        check_output_path(str(tmp_path / "d.mp4"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(str(tmp_path / "file" / "sub"))
    check_output_dir(str(tmp_path / "new" / "deeper"))  # creatable: fine, and nothing created
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="fps"):
        write_video(str(tmp_path / "v.npy"), _frames(), fps=0)
    with pytest.raises(ValueError, match=r"\(frames, H, W, 3\)"):
        write_video(str(tmp_path / "v.npy"), np.zeros((4, 8, 8)))
    assert sorted(os.listdir(tmp_path)) == ["d.mp4", "file"]


def test_read_image_rgb_grey_rgba_and_errors(tmp_path):
    import imageio.v3 as iio

    rgb = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    np.testing.assert_allclose(read_image(str(tmp_path / "rgb.png")), rgb / 255.0, atol=1e-6)
    iio.imwrite(tmp_path / "grey.png", rgb[..., 0])
    assert read_image(str(tmp_path / "grey.png")).shape == (12, 10, 3)
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 128, np.uint8)], axis=2)
    iio.imwrite(tmp_path / "rgba.png", rgba)
    np.testing.assert_allclose(read_image(str(tmp_path / "rgba.png")), rgb / 255.0, atol=1e-6)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        read_image(str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="image not found"):
        read_image(str(tmp_path / "nope.png"))
