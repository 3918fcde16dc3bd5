"""Video writers (.mp4, .gif, .npy; atomic, Ctrl-C safe), the one video reader (one frame per stored
frame, the timing as metadata) and image reading."""

import os
import subprocess

import numpy as np
import pytest

from engine.video_io import check_output_dir, check_output_path, probe_video, read_image, read_video, write_video


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
    pytest.importorskip("imageio_ffmpeg", reason="mp4/gif writing needs imageio-ffmpeg")

    frames = _frames()
    path = write_video(str(tmp_path / f"v{ext}"), frames, fps=6)
    decoded = read_video(path)
    assert decoded.shape == (6, 16, 24, 3) and decoded.dtype == np.uint8
    err = np.abs(decoded.astype(np.float32) / 255 - frames).mean()
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
    check_output_path(str(tmp_path / "missing" / "v.mp4"))  # a folder that can be made: fine, nothing made
    assert not (tmp_path / "missing").exists()
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ValueError, match="which is a folder"):
        check_output_path(str(tmp_path / "d.mp4"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="'.*file' is not a writable folder"):
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
    iio.imwrite(tmp_path / "rgba.png", rgba)  # half transparent: shown over white, as a viewer does
    np.testing.assert_allclose(read_image(str(tmp_path / "rgba.png")), (rgb.astype(np.float64) * 128 + 255 * 127) / 255 / 255,
                               atol=1 / 255)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        read_image(str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="image not found"):
        read_image(str(tmp_path / "nope.png"))


# ---------------------------------------------------------------------------------------------- reading


def _distinct_frames(n, h, w, rng):
    """n frames that differ from each other (a GIF writer merges equal neighbours), each a flat random
    colour with a random 4x4 block of another: few colours, so a GIF palette keeps them exactly."""
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        frames[i, y:y + 4, x:x + 4] = rng.integers(0, 256, 3)
    return frames


def _pil_gif(path, frames, durations_ms):
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=list(durations_ms), loop=0)


@pytest.mark.parametrize("case", range(6))
def test_gif_reads_one_frame_per_stored_frame_with_its_delay(tmp_path, case):
    """GIFs with varied per-frame delays: ffmpeg at its default output rate repeats frames (a 2-frame GIF
    at 500 ms read as 100 frames); the reader returns each stored frame once and its delay as metadata."""
    pytest.importorskip("imageio_ffmpeg")
    rng = np.random.default_rng()
    if case == 0:  # the reported one: 2 frames at 500 ms
        n, durations = 2, np.array([500, 500])
    elif case == 1:  # 130 ms (came back tripled)
        n, durations = 5, np.full(5, 130)
    else:  # random lengths and delays, 20 ms to 2 s in GIF's 10 ms steps
        n = int(rng.integers(1, 9))
        durations = rng.integers(2, 201, n) * 10
    h, w = int(rng.integers(8, 40)), int(rng.integers(8, 40))
    frames = _distinct_frames(n, h, w, rng)
    path = str(tmp_path / "v.gif")
    _pil_gif(path, frames, durations)
    decoded = read_video(path)
    assert decoded.shape == (n, h, w, 3), (durations, decoded.shape)
    np.testing.assert_array_equal(decoded, frames)
    info = probe_video(path)
    assert info.num_frames == n and (info.height, info.width) == (h, w)
    np.testing.assert_allclose(info.durations, durations / 1000, atol=1e-9)
    assert info.fps == pytest.approx(n / (durations.sum() / 1000))
    assert read_video(path, max_frames=1).shape == (1, h, w, 3)


@pytest.mark.parametrize("ext,fps", [(".gif", 8), (".gif", 25), (".mp4", 6), (".mp4", 8), (".mp4", 30), (".npy", 8)])
def test_written_videos_read_back_frame_for_frame(tmp_path, ext, fps):
    """Our own files: N frames written, N read (a 1-frame GIF at 8 fps read back as 13 frames), the rate
    kept (GIF delays are whole 1/100 s: 1/8 s is stored as 0.12 or 0.13)."""
    if ext != ".npy":
        pytest.importorskip("imageio_ffmpeg")
    rng = np.random.default_rng()
    for n in (1, 2, int(rng.integers(3, 12))):
        frames = _frames(n, 16, 24, seed=int(rng.integers(1 << 30)))
        path = write_video(str(tmp_path / f"v{n}{ext}"), frames, fps=fps)
        decoded = read_video(path)
        assert decoded.shape == (n, 16, 24, 3), decoded.shape
        assert np.abs(decoded.astype(np.float32) / 255 - frames).mean() < 0.02
        info = probe_video(path)
        assert info.num_frames == n
        if ext == ".npy":
            assert info.durations is None and info.fps is None
            np.testing.assert_array_equal(decoded, np.round(frames * 255).astype(np.uint8))
        elif ext == ".gif":
            assert np.all(np.abs(info.durations - 1 / fps) <= 0.0051), info.durations
        else:
            np.testing.assert_allclose(info.durations, 1 / fps, rtol=1e-6)
            assert info.fps == pytest.approx(fps)


@pytest.mark.parametrize("ext,codec,fps", [(".avi", "mpeg4", 25), (".webm", "libvpx-vp9", 12), (".mkv", "libx264", 10),
                                           (".mov", "libx264", 24)])
def test_other_containers_read_frame_for_frame(tmp_path, ext, codec, fps):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    n = int(np.random.default_rng().integers(3, 12))
    frames = (_frames(n, 16, 24) * 255).round().astype(np.uint8)
    path = str(tmp_path / f"v{ext}")
    writer = imageio_ffmpeg.write_frames(path, (24, 16), fps=fps, codec=codec, macro_block_size=1,
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(frame.tobytes())
    writer.close()
    decoded = read_video(path)
    assert decoded.shape == (n, 16, 24, 3)
    assert np.abs(decoded.astype(np.float32) - frames).mean() < 8
    info = probe_video(path)
    assert info.num_frames == n and info.fps == pytest.approx(fps, rel=0.01)


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_variable_rate_video_keeps_its_frames_and_timestamps(tmp_path, ext):
    """A GIF with varied delays turned into a variable-rate H.264 video by ffmpeg (passthrough timing, the
    GIF's 1/100 s time base): its stored frames, each with its own duration."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    rng = np.random.default_rng()
    n = int(rng.integers(3, 8))
    durations = rng.integers(2, 60, n) * 10
    frames = _distinct_frames(n, 16, 24, rng)
    _pil_gif(str(tmp_path / "v.gif"), frames, durations)
    path = str(tmp_path / f"v{ext}")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(tmp_path / "v.gif"), "-fps_mode",
                    "passthrough", "-enc_time_base", "demux", "-c:v", "libx264", "-pix_fmt", "yuv444p", path],
                   check=True)
    decoded = read_video(path)
    assert decoded.shape == (n, 16, 24, 3)
    assert np.abs(decoded.astype(np.float32) - frames).mean() < 8
    info = probe_video(path)
    assert info.num_frames == n
    np.testing.assert_allclose(info.durations, durations / 1000, atol=1e-9)


def test_unreadable_videos_are_one_line_errors(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng().bytes(3000))
    (tmp_path / "folder.mp4").mkdir()
    np.save(tmp_path / "floats.npy", np.zeros((2, 4, 4, 3), np.float32))
    cases = {"empty.mp4": "empty", "junk.mp4": "cannot read video", "missing.gif": "video not found",
             "folder.mp4": "is a folder", "floats.npy": "expected uint8"}
    for name, words in cases.items():
        for reader in (read_video, probe_video):
            with pytest.raises(ValueError) as e:
                reader(str(tmp_path / name))
            message = str(e.value)
            assert words in message and name in message and "\n" not in message, message
    with pytest.raises(ValueError, match="max_frames"):
        read_video(str(tmp_path / "junk.mp4"), max_frames=0)
