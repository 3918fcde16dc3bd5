"""Mixed-size training (``--sizes``): each batch holds one size, the sizes follow the run's batch count
(across epochs and a resume), the (xbar, z) cache keeps a clip per size, bad sizes are one-line errors."""

import json
import os

import pytest
import torch

from trainer.data import SyntheticVideos
from trainer.stages import make_stage
from trainer.text_cache import CaptionEmbeddings
from trainer.train import Indexed, build_parser, collate_clips, stage_model, main
from test_train_resume import argv, logged, losses, stage_one  # noqa: E402,F401  (tests/trainer is on sys.path)
from test_train_stages import tiny_config  # noqa: E402

# argv(): 6 clips in batches of 2, 3 batches an epoch, so the 2-size cycle starts epoch 2 with the second size.
SIZES = "4x16x16,4x32x32"


def logged_sizes(out, stage):
    return logged(out, stage, "size")


def test_batches_take_the_sizes_in_turn_and_resume_exactly(tmp_path, stage_one):
    config, init = stage_one
    mixed = ("--init", init, "--sizes", SIZES)
    assert main(argv("motion", tmp_path / "full", config, 5, 5, *mixed)) == 0
    assert logged_sizes(tmp_path / "full", "motion") == {1: "4x16x16", 2: "4x32x32", 3: "4x16x16",
                                                         4: "4x32x32", 5: "4x16x16"}
    assert main(argv("motion", tmp_path / "part", config, 3, 3, *mixed)) == 0  # "interrupted" mid-cycle
    assert main(argv("motion", tmp_path / "part", config, 5, 5, "--resume", *mixed)) == 0
    full, part = losses(tmp_path / "full", "motion"), losses(tmp_path / "part", "motion")
    assert logged_sizes(tmp_path / "part", "motion") == logged_sizes(tmp_path / "full", "motion")
    for step in (4, 5):
        assert part[step] == full[step], f"step {step}: {part[step]} != {full[step]}"


def test_a_size_repeated_in_the_list_weights_it(tmp_path, stage_one):
    config, init = stage_one
    assert main(argv("content", tmp_path / "w", config, 4, 4, "--init", init, "--sizes", "4x32x32,4x16x16,4x16x16")) == 0
    assert list(logged_sizes(tmp_path / "w", "content").values()) == ["4x32x32", "4x16x16", "4x16x16", "4x32x32"]


def test_the_encoding_cache_keeps_each_clip_per_size(tmp_path, stage_one):
    config, init = stage_one
    args = build_parser().parse_args(["--stage", "motion", "--config", config, "--out", str(tmp_path), "--init", init])
    model = stage_model(args, "motion", str(tmp_path))
    from engine.models.text import TextEncoder

    text = CaptionEmbeddings(lambda: TextEncoder.from_config(model.config.text_encoder))
    stage = make_stage("motion", model, {}, torch.device("cpu"), text, cache_encodings=True)
    data = Indexed([SyntheticVideos(4, 4, 16, 16, seed=3), SyntheticVideos(4, 4, 32, 32, seed=3)])
    small, large = data[(2, 0)], data[(2, 1)]
    assert small["caption"] == large["caption"]  # one scene, rendered at each size
    assert small["video"].shape == (4, 3, 16, 16) and large["video"].shape == (4, 3, 32, 32)
    for k, size in enumerate(("4x16x16", "4x32x32")):
        content, motion = stage.encode(collate_clips([data[(i, k)] for i in (2, 1)]))
        geometry = model.config.geometry(size)
        assert content.shape == (2, *geometry.content_shape) and motion.shape == (2, *geometry.motion_shape)
    assert set(stage._encoded) == {(2, 0), (1, 0), (2, 1), (1, 1)}
    # The cached value is the clip's own encoding at its size.
    want_c, want_m = stage._encode(collate_clips([data[(1, 1)]]))
    got_c, got_m = stage.encode(collate_clips([data[(1, 1)]]))
    torch.testing.assert_close(got_c, want_c, atol=1e-2, rtol=0)
    torch.testing.assert_close(got_m, want_m, atol=1e-2, rtol=0)


@pytest.mark.parametrize("sizes,needle", [("4x18x18", "4x18x18"), ("3x16x16", "3x16x16"), ("4x16", "4x16"),
                                          ("4x16x16,", "4x16x16,")])
def test_bad_sizes_are_one_line_exit_2(tmp_path, capsys, sizes, needle):
    config = tiny_config(tmp_path / "tiny.json")
    assert main(argv("autoencoder", tmp_path / "o", config, 1, 1, "--sizes", sizes)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o" / "model").exists()


@pytest.mark.parametrize("stage,network", [("content", "content_unet"), ("motion", "motion_dit")])
def test_finetune_starts_from_the_init_folders_network(tmp_path, stage_one, stage, network):
    """--finetune continues the --init folder's network (here at a learning rate too small to move it);
    without it the stage starts from a fresh one."""
    from engine.models import CMDModel

    config, init = stage_one
    assert main(argv(stage, tmp_path / "first", config, 2, 2, "--init", init)) == 0
    first = str(tmp_path / "first" / "model")
    start = getattr(CMDModel.from_pretrained(first), network).state_dict()
    for flag, same in (("--finetune", True), (None, False)):
        out = tmp_path / f"second-{flag}"
        extra = ("--init", first, "--lr", "1e-12") + ((flag,) if flag else ())
        assert main(argv(stage, out, config, 1, 1, *extra)) == 0
        got = getattr(CMDModel.from_pretrained(str(out / "model")), network).state_dict()
        close = all(torch.allclose(got[k], start[k], atol=1e-6) for k in start)
        assert close == same, f"{flag}: the network {'should' if same else 'should not'} be the init folder's"


@pytest.mark.parametrize("extra,needle", [(("--stage", "autoencoder"), "--finetune applies"),
                                          (("--pretrained-unet", "x"), "give one")])
def test_finetune_bad_combinations_are_one_line_exit_2(tmp_path, stage_one, capsys, extra, needle):
    config, init = stage_one
    args = argv("content", tmp_path / "o", config, 1, 1, "--init", init, "--finetune", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
