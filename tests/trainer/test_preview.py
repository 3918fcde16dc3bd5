"""Training previews: written as the engine writes videos."""

import os

import numpy as np

from engine.video_io import read_video
from trainer.preview import write_frames


def test_a_still_preview_keeps_every_frame(tmp_path):
    rng = np.random.default_rng()
    frame = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    still = np.stack([frame] * 8)  # Pillow's GIF writer would merge these into one frame
    moving = rng.integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    for name, frames in (("still", still), ("moving", moving)):
        path = write_frames(frames, str(tmp_path / name), fps=8)
        assert path == str(tmp_path / f"{name}.gif")
        assert read_video(path).shape == frames.shape
    one = write_frames(moving[:1], str(tmp_path / "one"))
    assert one.endswith("one.png") and os.path.isfile(one)
    assert sorted(os.listdir(tmp_path)) == ["moving.gif", "one.png", "still.gif"]  # no temporary file left
