"""CMDPipeline on a tiny random model (CPU): seeds, batches, CFG wiring, image-to-video, motion
variations, callbacks, output types and input validation."""

import os

import numpy as np
import pytest
import torch

from engine.backends.eager import EagerBackend
from engine.pipeline import CMDPipeline, check_request, size_multiple

TINY = "random:" + os.path.join(os.path.dirname(__file__), "tiny_config.json")
FAST = dict(num_inference_steps=2, motion_steps=2, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return CMDPipeline.from_pretrained(TINY)


pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/engine/conftest.py


def _spy(monkeypatch, backend, method):
    calls = []
    real = getattr(backend, method)

    def spy(*args):
        calls.append([a.clone() for a in args])
        return real(*args)

    monkeypatch.setattr(backend, method, spy)
    return calls


def test_output_shapes_and_ranges(pipe):
    cfg = pipe.config
    out = pipe("a red circle moving right", generator=0, **FAST)
    assert out.frames.shape == (1, cfg.num_frames, cfg.height, cfg.width, 3)
    assert out.frames.dtype == np.float32 and 0 <= out.frames.min() and out.frames.max() <= 1
    assert out.content.shape == (1, cfg.channels, cfg.height, cfg.width)
    assert out.motion.shape == (1, *cfg.motion_shape())
    assert set(out.timings) == {"text", "content", "motion", "decode", "total"}
    assert all(v >= 0 for v in out.timings.values())
    assert out.prompts == ["a red circle moving right"]


def test_same_seed_same_video_other_seed_other_video(pipe):
    a = pipe("a blue square", generator=7, **FAST)
    b = pipe("a blue square", generator=7, **FAST)
    c = pipe("a blue square", generator=8, **FAST)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert np.abs(a.frames - c.frames).max() > 1e-3


def test_a_batch_equals_single_runs(pipe):
    prompts = ["a red circle moving right", "a green triangle moving up"]
    batch = pipe(prompts, negative_prompt="blurry", generator=11, **FAST)
    for i, prompt in enumerate(prompts):  # generator=seed gives prompt i the seed seed + i
        single = pipe(prompt, negative_prompt="blurry", generator=11 + i, **FAST)
        np.testing.assert_allclose(batch.frames[i], single.frames[0], atol=1e-4)
        torch.testing.assert_close(batch.motion[i], single.motion[0], atol=1e-4, rtol=1e-4)
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    explicit = pipe(prompts, negative_prompt="blurry", generator=gens, **FAST)
    np.testing.assert_allclose(explicit.frames, pipe(prompts, negative_prompt="blurry", generator=3, **FAST).frames,
                               atol=1e-6)


def test_cfg_batches_hold_negative_prompt_and_null_text(pipe, monkeypatch):
    unet = _spy(monkeypatch, pipe.backend, "unet_step")
    dit = _spy(monkeypatch, pipe.backend, "dit_step")
    pipe("a red circle", negative_prompt="blurry", generator=0, guidance_scale=3.0, motion_guidance_scale=2.0, **FAST)
    assert len(unet) == 2 and len(dit) == 2
    sample, t, states = unet[0]
    assert sample.shape[0] == 2 and torch.equal(sample[0], sample[1]) and t.shape == (2,)
    prompt_states, _ = pipe.text_encoder(["a red circle"])
    negative_states, _ = pipe.text_encoder(["blurry"])
    torch.testing.assert_close(states[0], prompt_states[0])
    torch.testing.assert_close(states[1], negative_states[0])
    motion, t, content, text = dit[0]
    assert motion.shape[0] == 2 and torch.equal(content[0], content[1])  # the content frame in both halves
    _, pooled = pipe.text_encoder(["a red circle"])
    torch.testing.assert_close(text[0], pooled[0])
    torch.testing.assert_close(text[1], pipe.model.motion_dit.null_text)  # text dropped in the second half


def test_guidance_changes_the_video_and_one_means_no_cfg(pipe, monkeypatch):
    base = pipe("a red circle", negative_prompt="blurry", generator=1, **FAST)
    other_negative = pipe("a red circle", negative_prompt="a white square", generator=1, **FAST)
    assert (base.content - other_negative.content).abs().max() > 1e-4
    unet = _spy(monkeypatch, pipe.backend, "unet_step")
    pipe("a red circle", generator=1, guidance_scale=1.0, motion_guidance_scale=1.0, **FAST)
    assert unet[0][0].shape[0] == 1  # no unconditional half


def test_image_to_video_keeps_the_image_as_content_frame(pipe, monkeypatch):
    cfg = pipe.config
    rng = np.random.default_rng(0)
    image = rng.random((cfg.height, cfg.width, 3), dtype=np.float32)
    unet = _spy(monkeypatch, pipe.backend, "unet_step")
    out = pipe("moving left", image=image, generator=0, **FAST)
    assert not unet  # the content model does not run
    expected = torch.from_numpy(image).permute(2, 0, 1) * 2 - 1
    torch.testing.assert_close(out.content[0], expected)
    assert out.frames.shape == (1, cfg.num_frames, cfg.height, cfg.width, 3)
    # uint8 images of another size are resized to the requested size
    big = (rng.random((2 * cfg.height, 2 * cfg.width, 3)) * 255).astype(np.uint8)
    resized = pipe(["a", "b"], image=big, generator=0, **FAST)
    assert resized.content.shape == (2, cfg.channels, cfg.height, cfg.width)
    torch.testing.assert_close(resized.content[0], resized.content[1])


def test_motion_variations_share_content_and_differ_in_motion(pipe, monkeypatch):
    unet = _spy(monkeypatch, pipe.backend, "unet_step")
    out = pipe("a yellow circle", generator=2, motion_variations=3, **FAST)
    assert len(unet) == 2 and unet[0][0].shape[0] == 2  # one content frame (x2 for CFG), two steps
    assert out.frames.shape[0] == 3 and out.motion.shape[0] == 3
    for k in (1, 2):
        torch.testing.assert_close(out.content[k], out.content[0])
        assert (out.motion[k] - out.motion[0]).abs().max() > 1e-3
        assert np.abs(out.frames[k] - out.frames[0]).max() > 1e-4
    # several videos per prompt: each has its own content frame
    videos = pipe("a yellow circle", generator=2, num_videos_per_prompt=2, motion_variations=2, **FAST)
    assert videos.frames.shape[0] == 4
    torch.testing.assert_close(videos.content[1], videos.content[0])
    assert (videos.content[2] - videos.content[0]).abs().max() > 1e-3


def test_dpm_scheduler_odd_frames_and_output_types(pipe):
    cfg = pipe.config
    out = pipe("a circle", scheduler="dpm", num_frames=3, generator=0, output_type="pt", **FAST)
    assert isinstance(out.frames, torch.Tensor) and out.frames.shape == (1, 3, 3, cfg.height, cfg.width)
    latent = pipe("a circle", scheduler="dpm", generator=0, output_type="latent", **FAST)
    assert latent.frames is None and "decode" not in latent.timings
    wide = pipe("a circle", width=2 * cfg.width, generator=0, **FAST)
    assert wide.frames.shape[2:4] == (cfg.height, 2 * cfg.width)


def test_step_callback_sees_both_loops_and_can_replace_latents(pipe):
    seen = []

    def callback(p, step, t, kwargs):
        seen.append((kwargs["stage"], step, int(t)))
        if kwargs["stage"] == "content" and step == kwargs["num_steps"] - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return None

    out = pipe("a circle", generator=0, num_inference_steps=3, motion_steps=2, progress=False,
               callback_on_step_end=callback)
    assert [s[:2] for s in seen] == [("content", 0), ("content", 1), ("content", 2), ("motion", 0), ("motion", 1)]
    assert seen[0][2] > seen[1][2] > seen[2][2]  # timesteps count down
    assert torch.count_nonzero(out.content) == 0


def test_progress_bars_write_to_stderr(pipe, capsys):
    pipe("a circle", generator=0, num_inference_steps=2, motion_steps=2, progress=True)
    err = capsys.readouterr().err
    assert "content" in err and "motion" in err


class _DeviceSchedulerEager(EagerBackend):
    device_scheduler = True


def test_device_scheduler_tables_match_diffusers_step_end_to_end(pipe):
    """The path the cudagraph backend takes (scheduler as device tables) against eager's diffusers step."""
    for scheduler in ("ddim", "dpm"):
        pipe.set_backend("eager")
        ref = pipe("a red circle", generator=5, scheduler=scheduler, num_inference_steps=4, motion_steps=4,
                   progress=False)
        pipe.set_backend(_DeviceSchedulerEager(pipe.model))
        out = pipe("a red circle", generator=5, scheduler=scheduler, num_inference_steps=4, motion_steps=4,
                   progress=False)
        torch.testing.assert_close(out.content, ref.content, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(out.frames, ref.frames, atol=1e-4)
    pipe.set_backend("eager")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_frames=0), "num_frames"),
    (dict(num_frames=999), "999"),
    (dict(height=18), "height must be a multiple of 4"),
    (dict(width=10_000), "10000"),
    (dict(num_inference_steps=-1), "-1"),
    (dict(motion_steps=0), "motion_steps"),
    (dict(guidance_scale=float("nan")), "nan"),
    (dict(motion_guidance_scale=-2.0), "motion_guidance_scale must be a finite number >= 0, got -2"),
    (dict(scheduler="euler"), "euler"),
    (dict(output_type="gif"), "gif"),
    (dict(num_videos_per_prompt=0), "num_videos_per_prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(generator="seed"), "seed"),
])
def test_bad_inputs_raise_a_clear_value_error(pipe, kwargs, needle):
    call = dict(prompt="a circle", progress=False)
    call.update(kwargs)
    with pytest.raises(ValueError) as info:
        pipe(**call)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_supported_sizes_follow_the_config():
    from engine.configs import load_config

    assert size_multiple(load_config("sd21-512x1024")) == 64  # 8 latent pixels x VAE factor 8
    req = check_request(load_config("ucf101-64"))
    assert (req.num_frames, req.height, req.width, req.steps) == (16, 64, 64, 50)


def test_latent_mode_runs_the_image_vae_in_chunks(monkeypatch):
    """SD-style latent space: content and motion live in the VAE's latent space; frames come out of the
    image VAE, a chunk of frames per call; a given image is VAE-encoded into the content frame."""
    from engine.configs import load_config
    from engine.models import CMDModel
    from engine.models import vae as vae_module
    from engine.random_text import RandomTextEncoder

    cfg = load_config(TINY[len("random:"):])
    cfg.space, cfg.channels, cfg.vae_scale = "latent", 4, 2
    cfg.vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8], layers_per_block=1,
                   down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                   norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    cfg.autoencoder.in_channels, cfg.autoencoder.pixel_output = 4, False
    cfg.content_unet.update(in_channels=4, out_channels=4, sample_size=8)
    torch.manual_seed(0)
    pipe = CMDPipeline(CMDModel.from_config(cfg), RandomTextEncoder(32, 8))
    pipe.vae_chunk = 3
    chunks = []
    real = vae_module.decode_frames
    monkeypatch.setattr(vae_module, "decode_frames",
                        lambda vae, latents, chunk: chunks.append(chunk) or real(vae, latents, chunk=chunk))
    out = pipe("a red circle", generator=0, **FAST)
    assert out.frames.shape == (1, 4, 16, 16, 3) and "vae" in out.timings and chunks == [3]
    assert out.content.shape == (1, 4, 8, 8) and out.motion.shape == (1, *cfg.motion_shape())
    image = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    i2v = pipe("moving left", image=image, generator=0, **FAST)
    expected = vae_module.encode_frames(pipe.model.vae, torch.from_numpy(image).permute(2, 0, 1)[None, None] * 2 - 1)
    torch.testing.assert_close(i2v.content, expected[:, 0], atol=1e-5, rtol=1e-5)
