"""One clip geometry (engine.geometry): the shapes every consumer reads, the sizes a model serves (its
config's ``sizes``), one rule for requests and for export, fewer frames as the first frames of a
served clip, and a one-line error naming the served sizes for anything else."""

import json
import os
import random

import numpy as np
import pytest
import torch

from engine.configs import CMDConfig, available_configs, load_config
from engine.default_model import DEFAULT_MODEL_DIR
from engine.flops import measure
from engine.geometry import ClipSize, check_fits, check_served, frame_step, size_step
from engine.networks import networks_for
from engine.pipeline import CMDPipeline, check_request
from engine.run import main as run_main

TINY = os.path.join(os.path.dirname(__file__), "tiny_config.json")
FAST = dict(num_inference_steps=2, motion_steps=2, progress=False)

pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/engine/conftest.py

# Geometry by hand from the config files (DESIGN 3): (size step, h, w, H', W', motion tokens, content tokens).
EXPECTED = {
    # p 4, DiT patch 2, content patch 4, 3 UNet levels: step lcm(8, 4, 4) = 8; H' = W' = 32 / 4 = 8;
    # z (8, 16, 16) -> (16/2) * (16/2) = 64 tokens; xbar 32x32 / 4 -> 64 tokens.
    ("default", "16x32x32"): (8, 32, 32, 8, 8, 64, 64),
    # p 2, DiT patch 2, content patch 4, 4 UNet levels: step lcm(4, 4, 8) = 8; H' = W' = 32;
    # z (8, 16, 64) -> 8 * 32 = 256 tokens; xbar 64x64 / 4 -> 256 tokens.
    ("ucf101-64", "16x64x64"): (8, 64, 64, 32, 32, 256, 256),
    # SD latent (VAE /8): step lcm(4, 8, 8) * 8 = 64; h, w = 64, 128; H', W' = 32, 64;
    # z (8, 16, 96) -> 8 * 48 = 384 tokens; xbar 64x128 / 8 -> 128 tokens.
    ("sd21-512x1024", "16x512x1024"): (64, 64, 128, 32, 64, 384, 128),
    ("sd21-512x1024", "16x512x512"): (64, 64, 64, 32, 32, 256, 64),
}


@pytest.mark.parametrize("name, size", list(EXPECTED))
def test_one_geometry_read_by_pipeline_networks_and_flops(name, size):
    cfg = load_config(name)
    step, h, w, hp, wp, motion_tokens, content_tokens = EXPECTED[(name, size)]
    size = ClipSize.parse(size)
    geo = cfg.geometry(size)
    assert size in cfg.served_sizes
    assert size_step(cfg) == step and frame_step(cfg) == cfg.motion_dit.patch_size
    assert (geo.latent_height, geo.latent_width, geo.grid_height, geo.grid_width) == (h, w, hp, wp)
    assert geo.content_shape == (cfg.channels, h, w)
    assert geo.motion_shape == (cfg.autoencoder.motion_dim, size.frames, hp + wp)
    assert (geo.motion_tokens, geo.content_tokens, geo.video_tokens) == (motion_tokens, content_tokens,
                                                                        size.frames * hp * wp)
    # The pipeline's request, the exported networks' shapes and the FLOP counter's inputs are these shapes.
    req = check_request(cfg, num_frames=size.frames, height=size.height, width=size.width)
    assert req.geometry == geo
    nets = {n.name: n for n in networks_for(cfg, buckets=[size])}
    assert nets["content_unet"].input_shapes(size, 1)["sample"] == (1, *geo.content_shape)
    assert nets["motion_dit"].input_shapes(size, 1)["motion"] == (1, *geo.motion_shape)
    assert nets["ae_decoder"].output_shapes(size, 1)["frames"] == (1, size.frames, *geo.content_shape)
    if name == "default":  # counting FLOPs takes seconds per config: one is enough to see it reads the geometry
        costs = measure(cfg)
        assert costs["content_unet"].shape == (1, *geo.content_shape)
        assert costs["motion_dit"].shape == (1, *geo.motion_shape)


def test_request_rule_and_network_rule_agree_on_random_sizes():
    """The issue's example (16x36x36 for default: networks said yes, requests no; odd frames the other
    way) and random sizes: the networks run exactly the sizes that fit, and every request the model
    accepts runs the networks at one of its declared sizes."""
    rng = random.Random(os.urandom(8))
    for name in available_configs():
        cfg = load_config(name)
        step = size_step(cfg)
        served = cfg.served_sizes
        sizes = [ClipSize(16, 36, 36), ClipSize(15, 32, 32)]
        sizes += [ClipSize(rng.randint(1, 2 * s.frames), rng.choice([s.height, s.height + step, s.height // 2 + 1]),
                           rng.choice([s.width, s.width - step, s.width + 4])) for s in served for _ in range(20)]
        for size in sizes:
            fits = size.height % step == 0 and size.width % step == 0 and size.frames % frame_step(cfg) == 0
            if fits:
                check_fits(cfg, size)
                networks_for(cfg, buckets=[size], names=["motion_dit"])
            else:
                with pytest.raises(ValueError, match=str(size)):
                    networks_for(cfg, buckets=[size], names=["motion_dit"])
            holders = [s for s in served
                       if (s.height, s.width) == (size.height, size.width) and s.frames >= size.frames]
            if holders:
                req = check_request(cfg, num_frames=size.frames, height=size.height, width=size.width)
                assert req.geometry.size == min(holders)  # the shortest served clip that holds the frames
                networks_for(cfg, buckets=[req.geometry.size])
            else:
                with pytest.raises(ValueError) as info:
                    check_request(cfg, num_frames=size.frames, height=size.height, width=size.width)
                message = str(info.value)
                assert "\n" not in message and all(str(s) in message for s in served), message


def test_default_model_serves_only_what_was_evaluated():
    """The shipped model was evaluated at 16x32x32 and 16x64x64 (its model card): that is all it serves. 48x48
    (evaluated: half the directions wrong), a mixed 64x32, the old '4x the training size' and sizes off the grid
    are refused, naming the sizes it serves."""
    for cfg in (load_config("default"), load_config(os.path.join(DEFAULT_MODEL_DIR, "cmd_config.json"))):
        assert cfg.sizes == ["16x32x32", "16x64x64"]
        for kwargs, bad in ((dict(height=48, width=48), "48"), (dict(height=64, width=32), "32"),
                            (dict(width=128), "128"), (dict(height=40), "40"), (dict(height=36, width=36), "36"),
                            (dict(num_frames=17), "17")):
            with pytest.raises(ValueError) as info:
                check_request(cfg, **kwargs)
            message = str(info.value)
            assert "16x32x32" in message and "16x64x64" in message, message
            assert f"got {bad}" in message and "\n" not in message, message
        assert check_request(cfg, num_frames=5).geometry.size == ClipSize(16, 32, 32)
        assert check_request(cfg, num_frames=5, height=64, width=64).geometry.size == ClipSize(16, 64, 64)


def test_a_height_alone_takes_the_width_it_is_served_with():
    """--height 64 on the default model means 64x64 (the one width served at that height), not 64 x the default
    width (refused); where a height is served at several widths the config's own width stays the default."""
    cfg = load_config("default")
    assert check_request(cfg, height=64).geometry.size == ClipSize(16, 64, 64)
    assert check_request(cfg, width=64, num_frames=8).geometry.size == ClipSize(16, 64, 64)
    assert check_request(cfg).geometry.size == ClipSize(16, 32, 32)
    sd = load_config("sd21-512x1024")  # serves 16x512x1024 and 16x512x512
    assert check_request(sd, height=512).geometry.size == ClipSize(16, 512, 1024)
    assert check_request(sd, width=512).geometry.size == ClipSize(16, 512, 512)


def test_cli_refuses_unserved_sizes_before_loading(capsys, tmp_path):
    out = str(tmp_path / "v.npy")
    assert run_main(["--prompt", "a red circle", "--height", "48", "--width", "48", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: height must be 32 or 64") and "16x64x64" in err and "got 48" in err
    assert "\n" not in err and not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_pipe():
    return CMDPipeline.from_pretrained("random:" + TINY)


def test_fewer_frames_are_the_first_frames_of_a_served_clip(tiny_pipe):
    """tiny_config serves 4x16x16, 2x16x16 and 4x16x32: 3 frames are the first 3 of the 4-frame clip
    (same seed), 2 frames a native 2-frame clip, and 16x32 only with 4 frames or fewer."""
    seed = int.from_bytes(os.urandom(2), "little")
    full = tiny_pipe("a red circle", generator=seed, **FAST)
    three = tiny_pipe("a red circle", generator=seed, num_frames=3, **FAST)
    assert three.frames.shape[1] == 3 and three.motion.shape[2] == 4
    np.testing.assert_allclose(three.frames, full.frames[:, :3], atol=1e-6)
    two = tiny_pipe("a red circle", generator=seed, num_frames=2, **FAST)
    assert two.frames.shape[1] == 2 and two.motion.shape[2] == 2  # generated at the declared 2x16x16
    wide = tiny_pipe("a red circle", generator=seed, num_frames=1, width=32, **FAST)
    assert wide.frames.shape[1:4] == (1, 16, 32) and wide.motion.shape[2] == 4
    with pytest.raises(ValueError, match=r"width must be 16 or 32 at height 16 .*4x16x16, 2x16x16, 4x16x32.*got 24"):
        tiny_pipe("a red circle", width=24, **FAST)


def _config_dict(**changes):
    d = load_config(TINY).to_dict()
    d.update(changes)
    return d


def test_config_declares_sizes_and_checks_them():
    assert CMDConfig.from_dict(_config_dict(sizes=[])).sizes == ["4x16x16"]  # nothing declared: its own size
    assert CMDConfig.from_dict(_config_dict(sizes=[[4, 16, 16], "2x32x16"])).sizes == ["4x16x16", "2x32x16"]
    for sizes, needle in ((["4x16x16", "4x18x16"], "4x18x16"), (["4x16x16", "3x16x16"], "3x16x16"),
                          (["2x16x16"], "own size 4x16x16"), (["4x16x16", "4x16x16"], "twice"),
                          ("4x16x16", "list"), (["4x16"], "4x16")):
        with pytest.raises(ValueError, match=needle):
            CMDConfig.from_dict(_config_dict(sizes=sizes))
    # Earlier configs named them sampling["buckets"] (export's shape buckets): the same declaration.
    old = _config_dict()
    del old["sizes"]
    old["sampling"]["buckets"] = ["4x16x16", [2, 16, 16]]
    cfg = CMDConfig.from_dict(old)
    assert cfg.sizes == ["4x16x16", "2x16x16"] and "buckets" not in cfg.sampling
    # A saved config keeps them; a copy at another size serves that size alone.
    assert CMDConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).sizes == cfg.sizes
    other = cfg.with_size("2x32x32")
    assert (other.num_frames, other.height, other.width, other.sizes) == (2, 32, 32, ["2x32x32"])


def test_check_served_takes_exactly_the_declared_sizes():
    """Calibration and export take served sizes only (not fewer frames of one): one line naming both."""
    cfg = load_config(TINY)
    for size in cfg.served_sizes:
        assert check_served(cfg, size) == size
    for size in (ClipSize(4, 32, 32), ClipSize(3, 16, 16), ClipSize(2, 16, 32)):
        with pytest.raises(ValueError, match=rf"^size {size} is not one model 'tiny-test' serves "
                                             r"\(4x16x16, 2x16x16, 4x16x32\): graphs$"):
            check_served(cfg, size, "graphs")


def test_model_folder_without_sizes_serves_its_own_size(tmp_path):
    """Model folders written before sizes were declared: their config's own size."""
    d = _config_dict()
    del d["sizes"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    cfg = load_config(str(path))
    assert cfg.served_sizes == [ClipSize(4, 16, 16)]
    with pytest.raises(ValueError, match="4x16x16"):
        check_request(cfg, width=32)


@pytest.mark.parametrize("name", ["default", "ucf101-64", "sd21-512x1024"])
def test_kernel_benchmark_shapes_are_the_geometry(name):
    """kernels/bench.py may not import engine and reads the config files itself: its shapes must be the
    geometry's (the DiT's tokens are the motion and the content tokens; the AE's grid is H' x W')."""
    from cmd_kernels.bench import config_shapes

    cfg = load_config(name)
    geo = cfg.geometry()
    shapes = config_shapes(name, ae_batch=1, dit_batch=1)
    assert shapes.attention[2] == geo.motion_tokens + geo.content_tokens
    assert shapes.decoder_fusion[1:4] == (geo.frames, geo.grid_height, geo.grid_width)
    assert shapes.content_frame[1:] == (geo.frames, *geo.content_shape)
