"""Video folders for training: captions CSV and UCF-101 layouts, windows/crops of stored frames, corrupt,
missing and too-short videos left out before training and counted (an error naming the folder and the
counts when none is usable, never a wait), and latent mode's per-video VAE latent cache."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine.video_io import write_video as write_any
from trainer.data.videos import NoUsableClips, class_caption, open_video_folder, read_video, resize_crop
from trainer.train import main
from test_train_stages import tiny_config  # noqa: E402  (tests/trainer is on sys.path under pytest)

H, W = 20, 24  # a frame size that is neither square nor the clip size


def write_video(path, num_frames, codec=None):
    """Frame i is a flat grey of level 12 * i with a white 6x6 square moving right: the level tells the
    frame index back after lossy coding."""
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), (W, H), fps=8, codec=codec, macro_block_size=1,
                                         ffmpeg_log_level="error")
    writer.send(None)
    for i in range(num_frames):
        frame = np.full((H, W, 3), 12 * i, np.uint8)
        frame[2:8, 2 + i:8 + i] = 255
        writer.send(frame.tobytes())
    writer.close()


@pytest.fixture(scope="module")
def csv_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        write_video(root / name, 12)
    write_video(root / "short.mp4", 2)
    (root / "broken.mp4").write_bytes(os.urandom(3000))
    rows = ["path,caption", "a.mp4,a white square moving right", "b.mp4,second clip", "broken.mp4,corrupt file",
            "c.mp4,third clip", "short.mp4,too short", "missing.mp4,not there"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_read_video_and_levels(csv_folder):
    frames = read_video(str(csv_folder / "a.mp4"))
    assert frames.shape == (12, H, W, 3) and frames.dtype == np.uint8
    levels = frames[:, H - 2, W // 2].mean(axis=-1)
    assert np.allclose(levels, 12 * np.arange(12), atol=4)


def test_csv_items_windows_and_skips(csv_folder):
    data = open_video_folder(str(csv_folder), num_frames=4, height=16, width=16, seed=0, frame_stride=2)
    assert len(data) == 6
    items = [data[i] for i in range(len(data))]
    good = [it for it in items if it is not None]
    assert [it["caption"] for it in good] == ["a white square moving right", "second clip", "third clip"]
    assert [it is None for it in items] == [False, False, True, False, True, True]
    for it in good:
        video = it["video"]
        assert video.shape == (4, 3, 16, 16) and video.dtype == torch.float32
        assert -1 <= video.min() and video.max() <= 1
        # Consecutive window frames are 2 source frames apart (stride 2): levels step by 24.
        level = (video[:, :, -1, 8].mean(dim=1) + 1) * 127.5
        assert torch.allclose(level[1:] - level[:-1], torch.full((3,), 24.0), atol=5)
    # The window depends only on (seed, epoch, index).
    again = data[0]["video"]
    assert torch.equal(again, items[0]["video"])
    starts = set()
    for epoch in range(8):
        data.set_epoch(epoch)
        starts.add(round(float((data[0]["video"][0, :, -1, 8].mean() + 1) * 127.5 / 12)))
    assert len(starts) > 1, "windows should move between epochs"




def test_resize_crop_covers_and_centres():
    frames = torch.arange(20 * 24, dtype=torch.float32).reshape(1, 1, 20, 24).expand(2, 3, 20, 24)
    out = resize_crop(frames, 16, 16)
    assert out.shape == (2, 3, 16, 16)
    flat = resize_crop(torch.full((1, 3, 20, 24), 7.0), 8, 12)
    assert flat.shape == (1, 3, 8, 12) and torch.allclose(flat, torch.tensor(7.0))


def test_bad_csv_row_names_the_line(tmp_path):
    (tmp_path / "captions.csv").write_text("path,caption\nonly-a-path.mp4\n")
    with pytest.raises(ValueError, match="captions.csv', line 2: expected 2 fields"):
        open_video_folder(str(tmp_path), 4, 16, 16)


def test_not_a_video_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="captions.csv"):
        open_video_folder(str(tmp_path), 4, 16, 16)


def test_ucf101_layout(tmp_path):
    videos = tmp_path / "UCF-101"
    for cls, n in (("ApplyEyeMakeup", 2), ("YoYo", 1)):
        (videos / cls).mkdir(parents=True)
        for k in range(n):
            write_video(videos / cls / f"v_{cls}_g0{k + 1}_c01.avi", 6, codec="mpeg4")
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\nYoYo/v_YoYo_g01_c01.avi 2\n")
    (lists / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi\n")
    train = open_video_folder(str(tmp_path), 4, 16, 16)
    assert [c for _, c in train.entries] == ["apply eye makeup", "yo yo"]
    item = train[1]
    assert item["caption"] == "yo yo" and item["video"].shape == (4, 3, 16, 16)
    test = open_video_folder(str(tmp_path), 4, 16, 16, split="test")
    assert [os.path.basename(p) for p, _ in test.entries] == ["v_ApplyEyeMakeup_g02_c01.avi"]


def test_class_captions():
    assert class_caption("ApplyEyeMakeup") == "apply eye makeup"
    assert class_caption("CleanAndJerk") == "clean and jerk"
    assert class_caption("YoYo") == "yo yo"


def test_training_on_a_folder_skips_and_counts_bad_videos(tmp_path, csv_folder):
    config = tiny_config(tmp_path / "tiny.json")
    out = tmp_path / "run"
    code = main(["--stage", "autoencoder", "--config", config, "--data", str(csv_folder), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--workers", "0", "--log-every", "1", "--sample-every", "0",
                 "--no-progress", "--threads", "1"])
    assert code == 0
    records = [json.loads(line) for line in open(out / "logs" / "autoencoder.jsonl")]
    done = records[-1]
    # The bad videos are left out before training and counted by reason (in the start and done records),
    # so every batch keeps its size; no clip fails at load time.
    counts = {"root": str(csv_folder), "found": 6, "usable": 3,
              "skipped": {"missing": 1, "unreadable": 1, "too short": 1}}
    assert records[0]["event"] == "start" and records[0]["data"] == counts
    assert done["event"] == "done" and done["data"] == counts and done["skipped_clips"] == 0
    steps = [r for r in records if "loss" in r]
    assert [r["batch_clips"] for r in steps] == [2, 2, 2]
    assert all(np.isfinite(r["loss"]) for r in steps)


def _gif(path, levels, duration_ms):
    """A GIF (Pillow) whose frame i is a flat grey of ``levels[i]`` (distinct: Pillow merges equal neighbours)."""
    from PIL import Image

    images = [Image.fromarray(np.full((H, W, 3), level, np.uint8)) for level in levels]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def test_clips_are_windows_of_stored_frames(tmp_path):
    """GIFs and mp4s at several delays and rates: a window is 16 consecutive stored frames, never a frame
    repeated to fill a rate; files with fewer stored frames are too short, left out and counted."""
    rng = np.random.default_rng()
    _gif(tmp_path / "still.gif", [40, 200], 500)  # 2 frames at 500 ms: ffmpeg's default timing made it 100
    long_levels = 10 * np.arange(20) + int(rng.integers(0, 50))
    _gif(tmp_path / "slow.gif", long_levels, [int(d) for d in rng.integers(2, 40, 20) * 10])  # varied delays
    _gif(tmp_path / "tripled.gif", 12 * np.arange(8), 130)  # 130 ms: came back as 3 frames each
    write_any(str(tmp_path / "one.gif"), np.full((1, H, W, 3), 90, np.uint8), fps=8)  # our own 1-frame GIF
    write_video(tmp_path / "fast.mp4", 12)  # 30 fps below (write_video here writes 8 fps): 12 stored frames
    write_video(tmp_path / "long.mp4", 18)
    rows = ["still.gif,a", "slow.gif,b", "tripled.gif,c", "one.gif,d", "fast.mp4,e", "long.mp4,f"]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    clips = open_video_folder(str(tmp_path), num_frames=16, height=16, width=16, seed=int(rng.integers(1000)))
    usable, counts = clips.usable()
    assert counts.to_dict() == {"root": str(tmp_path), "found": 6, "usable": 2,
                                "skipped": {"missing": 0, "unreadable": 0, "too short": 4}}
    assert [c for _, c in usable.entries] == ["b", "f"]
    assert "4 too short" in counts.summary() and "16 stored frames" in counts.summary()
    for epoch in range(3):
        usable.set_epoch(epoch)
        gif = usable[0]["video"]
        levels = ((gif[:, :, H // 2, W // 2].mean(dim=1) + 1) * 127.5).round()
        start = int(np.argmin(np.abs(long_levels - levels[0].item())))
        np.testing.assert_allclose(levels.numpy(), long_levels[start:start + 16], atol=1.5)
        mp4 = usable[1]["video"]
        steps = ((mp4[1:, :, -1, 8] - mp4[:-1, :, -1, 8]).mean(dim=1) * 127.5).numpy()
        np.testing.assert_allclose(steps, 12.0, atol=4)  # consecutive stored frames: level steps of 12
    # Without the check, the too-short ones give None (dropped and counted by the trainer's collate_clips).
    assert [clips[i] is None for i in range(len(clips))] == [True, False, True, True, True, False]


def _train(data, out, config, *extra):
    return main(["--stage", "autoencoder", "--config", config, "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--workers", "0", "--log-every", "1", "--sample-every", "0", "--no-progress",
                 "--threads", "1", *extra])


def _one_line_error(capsys, start):
    """The error line (the last of stderr; before it at most the note on the videos left out)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and all(line.startswith("note: ") for line in lines[:-1]), lines
    assert time.perf_counter() - start < 60, "an error about the data must come before any training"
    return lines[-1]


def test_zero_byte_video_is_an_error_not_a_wait(tmp_path):
    """The reported case, through the CLI: the only video is a zero-byte mp4. It ran forever without a
    word; now one line naming the folder and the counts, exit code 2, in seconds."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "clip.mp4").write_bytes(b"")
    (data / "captions.csv").write_text("path,caption\nclip.mp4,a red circle moving right\n")
    config = tiny_config(tmp_path / "tiny.json")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--stage", "autoencoder", "--config", config,
                           "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "1", "--no-progress",
                           "--threads", "1"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: no usable clips in {str(data)!r}: found 1 video, 0 usable; skipped 1 unreadable")
    assert "clip.mp4" in err and "empty" in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_filter_that_leaves_no_clip_is_an_error(tmp_path, csv_folder, capsys):
    """--frame-stride 4 needs 13 stored frames for 4-frame clips; the folder's longest video has 12."""
    config = tiny_config(tmp_path / "tiny.json")
    start = time.perf_counter()
    assert _train(csv_folder, tmp_path / "run", config, "--frame-stride", "4") == 2
    err = _one_line_error(capsys, start)
    assert f"no usable clips in {str(csv_folder)!r}: found 6 videos, 0 usable; skipped 1 missing, 1 unreadable, " \
           "4 too short (a window is 13 stored frames" in err


def test_ucf101_split_of_missing_videos_is_an_error(tmp_path, capsys):
    videos = tmp_path / "UCF-101" / "YoYo"
    videos.mkdir(parents=True)
    write_video(videos / "v_YoYo_g01_c01.avi", 6, codec="mpeg4")
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "trainlist01.txt").write_text("YoYo/v_YoYo_g02_c01.avi 1\nYoYo/v_YoYo_g03_c01.avi 1\n")
    config = tiny_config(tmp_path / "tiny.json")
    start = time.perf_counter()
    assert _train(tmp_path, tmp_path / "run", config) == 2
    err = _one_line_error(capsys, start)
    assert f"no usable clips in {str(tmp_path)!r}: found 2 videos, 0 usable; skipped 2 missing" in err


def test_fewer_usable_clips_than_a_batch_is_an_error(tmp_path, csv_folder, capsys):
    config = tiny_config(tmp_path / "tiny.json")
    start = time.perf_counter()
    assert _train(csv_folder, tmp_path / "run", config, "--batch-size", "4") == 2
    err = _one_line_error(capsys, start)
    assert "fewer than one batch of 4" in err and "found 6 videos, 3 usable" in err


def test_clips_that_fail_after_the_check_end_the_run(tmp_path, csv_folder, capsys, monkeypatch):
    """Videos that pass the probe but never decode (a damaged stream): a whole epoch of empty batches
    ends the run with an error instead of taking batches forever."""
    import trainer.data.videos as videos

    def broken(path, *args, **kwargs):
        raise ValueError(f"cannot read video {path!r}: damaged stream")

    monkeypatch.setattr(videos, "read_clip", broken)
    config = tiny_config(tmp_path / "tiny.json")
    start = time.perf_counter()
    assert _train(csv_folder, tmp_path / "run", config, "--batch-size", "1") == 2
    err = _one_line_error(capsys, start)
    assert f"no clip loaded in {str(csv_folder)!r} in the last 6 batches of 1" in err  # two epochs' worth


def test_resume_after_batches_that_loaded_nothing(tmp_path, csv_folder, monkeypatch):
    """Two of the three usable videos fail to decode at load time, so steps take more than one batch: a
    resumed run continues from the saved data position, with the losses of an uninterrupted run."""
    import trainer.data.videos as videos

    real = videos.read_clip

    def flaky(path, *args, **kwargs):
        if os.path.basename(path) in ("b.mp4", "c.mp4"):
            raise ValueError(f"cannot read video {path!r}: damaged stream")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(videos, "read_clip", flaky)
    config = tiny_config(tmp_path / "tiny.json")
    full, part = tmp_path / "full", tmp_path / "part"
    every = ("--batch-size", "1", "--log-every", "1", "--checkpoint-every")
    assert _train(csv_folder, full, config, "--steps", "5", *every, "5") == 0
    assert _train(csv_folder, part, config, "--steps", "2", *every, "2") == 0
    saved = json.load(open(part / "checkpoints" / "autoencoder" / "step-00000002" / "state.json"))
    assert saved["data_batches"][0] > 2, "the interruption should come after an empty batch"
    assert _train(csv_folder, part, config, "--steps", "5", *every, "5", "--resume") == 0

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, open(out / "logs" / "autoencoder.jsonl")) if "loss" in r}

    a, b = losses(full), losses(part)
    assert [b[step] for step in (3, 4, 5)] == [a[step] for step in (3, 4, 5)]


# ---------------------------------------------------------------------------------------- latent mode


def tiny_vae_folder(path):
    """A random 1-level AutoencoderKL (no downsampling, 4 latent channels): stands in for an SD VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(path / "vae"))
    return str(path)


def latent_config(path, vae_kwargs):
    config = json.load(open(tiny_config(path)))
    config.update(name="tiny-latent", space="latent", channels=4, vae=vae_kwargs, vae_scale=1)
    config["autoencoder"].update(in_channels=4, pixel_output=False)
    config["content_unet"].update(in_channels=4, out_channels=4)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(path)


def test_latent_cache_serves_vae_windows(tmp_path, csv_folder):
    from engine.models.vae import encode_frames, load_vae
    from trainer.data.latents import LatentCache, LatentClips, cached_clips, fill_latent_cache

    vae = load_vae(tiny_vae_folder(tmp_path))
    clips = open_video_folder(str(csv_folder), 4, 16, 16, seed=0)
    cache = LatentCache(str(tmp_path / "cache"), vae, 16, 16)
    assert fill_latent_cache(clips, cache) == (4, 2)  # a, b, c, short encoded; broken and missing fail
    assert fill_latent_cache(clips, cache) == (0, 2)  # the good ones are cached now
    latents = LatentClips(clips, cache)
    usable, counts = clips.usable()
    assert len(cached_clips(usable, cache, counts)) == 3 and counts.usable == 3
    item, pixels = latents[0], clips[0]
    assert item["latents"].shape == (4, 4, 16, 16) and item["caption"] == pixels["caption"]
    # The same window as the pixel data set picks, encoded by the VAE (fp16 storage).
    expected = encode_frames(vae, pixels["video"][None])[0]
    assert torch.allclose(item["latents"], expected, atol=2e-2 * expected.abs().max().item())
    assert latents[2] is None and latents[4] is None  # broken; too short for a window
    # Nothing cached (every encode failed): an error naming the folder and the counts.
    empty = LatentCache(str(tmp_path / "empty"), vae, 16, 16)
    usable, counts = clips.usable()
    with pytest.raises(NoUsableClips, match=r"found 6 videos, 0 usable; skipped 1 missing, 4 unreadable"):
        cached_clips(usable, empty, counts)


def test_latent_mode_training_with_cache_and_pretrained_unet(tmp_path, csv_folder):
    from diffusers import UNet2DConditionModel

    from engine.configs import load_config
    from trainer.train import build_parser, stage_model

    sd = tiny_vae_folder(tmp_path / "sd")
    vae_kwargs = json.load(open(os.path.join(sd, "vae", "config.json")))
    vae_kwargs = {k: v for k, v in vae_kwargs.items() if not k.startswith("_")}
    config = latent_config(tmp_path / "latent.json", vae_kwargs)
    out = tmp_path / "run"
    common = ["--config", config, "--data", str(csv_folder), "--out", str(out), "--batch-size", "2", "--workers", "0",
              "--log-every", "1", "--sample-every", "0", "--no-progress", "--threads", "1",
              "--latent-cache", str(tmp_path / "latents")]
    assert main(["--stage", "autoencoder", "--steps", "2", "--vae", sd, *common]) == 0
    # a, b and c: the too-short video is left out before encoding (it can give no window)
    assert len([f for f in os.listdir(tmp_path / "latents") if f.endswith(".safetensors")]) == 3
    # Fine-tuning the UNet of a local SD folder: the content stage starts from its weights.
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**load_config(config).content_unet)
    unet.save_pretrained(str(tmp_path / "sd" / "unet"))
    args = build_parser().parse_args(["--stage", "content", "--pretrained-unet", sd, *common])
    model = stage_model(args, "content", str(out))
    for name, value in unet.state_dict().items():
        assert torch.equal(model.content_unet.state_dict()[name], value)
    assert model.vae is not None
    assert main(["--stage", "content", "--steps", "2", "--pretrained-unet", sd, *common]) == 0


# captions.csv as spreadsheets and editors save it (engine.text_files.read_csv): the BOM file lost its
# first video ('\ufefftestsrc.mp4' not found) or counted its header as a missing video.
@pytest.mark.parametrize("name,data", [
    ("bom, no header", b"\xef\xbb\xbfa.mp4,first\nb.mp4,second\n"),
    ("bom and header, crlf", b"\xef\xbb\xbfpath,caption\r\na.mp4,first\r\nb.mp4,second\r\n"),
    ("excel: header names, quotes, empty columns, blank tail",
     b'\xef\xbb\xbfVideo,Caption,,\r\n"a.mp4","first",,\r\nb.mp4,"second",,\r\n,,,\r\n\r\n\r\n'),
    ("filename,text header", b"filename,text\na.mp4,first\nb.mp4,second\n\n\n"),
    ("free-text header", b"Clip file,What happens\na.mp4,first\nb.mp4,second\n"),
])
def test_captions_csv_as_users_save_it(tmp_path, name, data):
    from trainer.data.videos import read_captions_csv

    (tmp_path / "captions.csv").write_bytes(data)
    for video in ("a.mp4", "b.mp4"):
        (tmp_path / video).write_bytes(b"")
    assert read_captions_csv(str(tmp_path)) == [(str(tmp_path / "a.mp4"), "first"),
                                                (str(tmp_path / "b.mp4"), "second")]


def test_captions_with_commas_and_quotes_stay_whole(tmp_path):
    from trainer.data.videos import read_captions_csv

    (tmp_path / "captions.csv").write_text('path,caption\na.mp4,"a dog, then a cat, running"\n'
                                           'b.mp4,"the sign reads ""stop"""\n')
    assert [c for _, c in read_captions_csv(str(tmp_path))] == ["a dog, then a cat, running", 'the sign reads "stop"']


def test_a_missing_first_video_is_not_taken_for_a_header(tmp_path):
    from trainer.data.videos import read_captions_csv

    (tmp_path / "captions.csv").write_text("gone.mp4,not there\na.mp4,first\n")
    assert [os.path.basename(p) for p, _ in read_captions_csv(str(tmp_path))] == ["gone.mp4", "a.mp4"]


@pytest.mark.parametrize("data,needle", [
    (b"path,caption\na.mp4,ok\nb.mp4,a caption, with a comma\n", "line 3: expected 2 fields"),
    (b"path,caption\na.mp4,ok\n\nb.mp4,\n", "line 4: expected 2 fields"),
    (b'a.mp4,ok\nb.mp4,"never closed\n', "line 2: "),
    (b"a.mp4,ok\nb.mp4,caf\xe9\n", "line 2: not UTF-8 text"),
    (b"path,caption\n\n\n", "lists no videos"),
])
def test_captions_csv_faults_name_the_file_and_line(tmp_path, data, needle):
    (tmp_path / "captions.csv").write_bytes(data)
    with pytest.raises(ValueError) as e:
        open_video_folder(str(tmp_path), 4, 16, 16)
    message = str(e.value)
    assert "\n" not in message and "captions.csv" in message and needle in message, message


def test_ucf_split_list_with_bom_and_crlf(tmp_path):
    from trainer.data.videos import read_ucf101

    (tmp_path / "ApplyEyeMakeup").mkdir()
    (tmp_path / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi").write_bytes(b"")
    (tmp_path / "trainlist01.txt").write_bytes(b"\xef\xbb\xbfApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\r\n\r\n")
    assert read_ucf101(str(tmp_path)) == [(str(tmp_path / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi"),
                                           "apply eye makeup")]


# Only the sampled frames are decoded, scaled by ffmpeg while decoding (engine.video_io.read_clip): the right
# frames, and memory that does not grow with the video's length or resolution.
def test_read_clip_decodes_exactly_the_window(tmp_path):
    from engine.video_io import read_clip

    path = tmp_path / "levels.mp4"
    write_video(path, 20)  # frame i: grey level 12 * i (a white square in the top rows)
    clip = read_clip(str(path), 5, 4, 3, (10, 12))  # frames 5, 8, 11, 14 at half size
    assert clip.shape == (4, 10, 12, 3) and clip.dtype == np.uint8
    levels = clip[:, -1, :, :].mean(axis=(1, 2))
    assert np.allclose(levels, 12 * np.array([5, 8, 11, 14]), atol=4), levels
    full = read_video(str(path))
    ref = resize_crop(torch.from_numpy(full[5:15:3].copy()).permute(0, 3, 1, 2).float(), 10, 12)
    got = torch.from_numpy(clip.copy()).permute(0, 3, 1, 2).float()
    assert (got - ref).abs().mean() < 6, "ffmpeg's scaling should match the old resize within coding noise"
    with pytest.raises(ValueError, match="2 of the 4 frames from frame 15"):
        read_clip(str(path), 15, 4, 3, (10, 12))  # 15 and 18 exist; 21 and 24 do not


def test_read_clip_npy_is_exact_and_crops_where_asked(tmp_path):
    from engine.video_io import read_clip

    frames = np.zeros((9, 8, 16, 3), np.uint8)
    frames += (np.arange(16, dtype=np.uint8) * 10)[None, None, :, None]  # column c: value 10 c
    frames += (np.arange(9, dtype=np.uint8))[:, None, None, None]  # frame i: + i
    path = tmp_path / "v.npy"
    np.save(path, frames)
    left = read_clip(str(path), 2, 3, 3, (8, 8), crop=(0.5, 0.0))  # frames 2, 5, 8; columns 0..7
    right = read_clip(str(path), 2, 3, 3, (8, 8), crop=(0.5, 1.0))  # columns 8..15
    assert np.array_equal(left, frames[2::3, :, :8]) and np.array_equal(right, frames[2::3, :, 8:])


def test_items_decode_the_window_at_the_clip_size(csv_folder, monkeypatch):
    import trainer.data.videos as videos

    calls = []
    real = videos.read_clip

    def spy(path, start, count, stride, size, crop):
        calls.append((os.path.basename(path), start, count, stride, size))
        return real(path, start, count, stride, size, crop)

    monkeypatch.setattr(videos, "read_clip", spy)
    data = open_video_folder(str(csv_folder), num_frames=4, height=16, width=16, seed=0, frame_stride=2)
    item = data[0]
    (name, start, count, stride, size), = calls
    assert (name, count, stride, size) == ("a.mp4", 4, 2, (16, 16)) and 0 <= start <= 12 - 7
    levels = item["video"][:, :, -1, :].mean(dim=(1, 2))  # [-1, 1]: level / 127.5 - 1
    assert torch.allclose((levels + 1) * 127.5, 12 * torch.tensor([start, start + 2, start + 4, start + 6.]),
                          atol=5), levels


MEMORY_CHILD = """
import resource, sys
from trainer.data.videos import VideoClips
clips = VideoClips([(sys.argv[1], "x")], num_frames=16, height=32, width=32)
assert clips[0]["video"].shape == (16, 3, 32, 32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_item_memory_does_not_grow_with_length_or_resolution(tmp_path):
    """A 1280x720 clip 8x as long as a 160x120 one: one item costs the same memory (decoding it whole used
    to hold 128 frames of 2.6 MiB, twice: over 600 MiB)."""
    from benchmarks.video_memory import make_clip

    small, large = str(tmp_path / "small.mp4"), str(tmp_path / "large.mp4")
    make_clip(small, 2, 160, 120, 8)
    make_clip(large, 16, 1280, 720, 8)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")

    def peak(path):
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, path], capture_output=True, text=True, env=env,
                             cwd=root, timeout=300)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert peak(large) - peak(small) < 40  # MiB: measurement noise, not 128 full frames
