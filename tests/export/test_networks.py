"""The network declarations (engine.networks): buckets, shapes, dynamic axes, profiles, hashes.
No export here: these run in well under a second each (the tiny model's forward passes aside)."""

import pytest
import torch

from engine.configs import load_config
from engine.artefacts import weights_hash, weights_hashes
from engine.networks import ShapeBucket, networks_for, shape_buckets
from cmd_kernels import force_impl


def test_default_model_buckets_are_its_served_sizes():
    cfg = load_config("default")
    assert shape_buckets(cfg) == [ShapeBucket(16, 32, 32), ShapeBucket(16, 64, 64)]
    names = [n.name for n in networks_for(cfg)]
    assert names == ["text_encoder", "content_unet", "motion_dit", "ae_decoder"]  # no VAE in pixel mode


def test_latent_configs_add_the_vae_decoder(make_tiny_latent_config):
    assert [n.name for n in networks_for(make_tiny_latent_config())][-1] == "vae_decoder"
    assert "vae_decoder" in [n.name for n in networks_for(load_config("sd21-512x1024"))]


def test_buckets_from_config_and_bad_ones_named(make_tiny_latent_config):
    cfg = make_tiny_latent_config([(4, 32, 32), "4x32x64"])
    assert shape_buckets(cfg) == [ShapeBucket(4, 32, 32), ShapeBucket(4, 32, 64)]
    with pytest.raises(ValueError, match="4x30x32"):
        networks_for(cfg, buckets=[ShapeBucket(4, 30, 32)])
    with pytest.raises(ValueError, match="3x32x32"):
        networks_for(cfg, buckets=[ShapeBucket(3, 32, 32)])  # odd frames do not split into DiT patches
    with pytest.raises(ValueError, match="16by32"):
        ShapeBucket.parse("16by32")
    with pytest.raises(ValueError, match="'vae_decoder'"):
        networks_for(load_config("default"), names=["vae_decoder"])


def test_one_bucket_means_only_the_batch_is_dynamic():
    for net in networks_for(load_config("default"), buckets=[ShapeBucket(16, 32, 32)]):
        assert net.dynamic_symbols() == ["batch"], net.name
        for name, axes in net.dynamic_axes().items():
            assert list(axes.values()) == ["batch"] and list(axes) == [0], (net.name, name)


def test_axes_that_differ_across_buckets_are_dynamic(make_tiny_latent_config):
    nets = {n.name: n for n in networks_for(make_tiny_latent_config([(4, 32, 32), (4, 32, 64)]))}
    assert nets["content_unet"].dynamic_axes()["sample"] == {0: "batch", 3: "width"}
    assert nets["motion_dit"].dynamic_axes()["motion"] == {0: "batch", 3: "motion_len"}
    assert nets["vae_decoder"].dynamic_axes()["images"] == {0: "batch", 3: "image_width"}
    assert nets["text_encoder"].dynamic_symbols() == ["batch"]  # its shapes do not depend on the clip size


def test_declared_shapes_match_the_model(make_tiny_latent_config):
    """Every declared output shape is what the network really returns, in each bucket."""
    from engine.models import CMDModel
    from engine.random_text import RandomTextEncoder

    cfg = make_tiny_latent_config([(4, 32, 32), (2, 32, 64)])
    torch.manual_seed(0)
    model = CMDModel.from_config(cfg).eval()
    text = RandomTextEncoder(cfg.text_encoder.hidden_size, cfg.text_encoder.max_length, num_layers=1)
    for net in networks_for(cfg):
        module = net.module(model, text)
        for bucket in net.buckets:
            inputs = net.sample_inputs(bucket, batch=3)
            assert {k: tuple(v.shape) for k, v in inputs.items()} == net.input_shapes(bucket, 3)
            with torch.no_grad(), force_impl("reference"):  # shapes only: skip interpreted Triton
                outs = module(*inputs.values())
            outs = outs if isinstance(outs, tuple) else (outs,)
            assert [tuple(o.shape) for o in outs] == list(net.output_shapes(bucket, 3).values()), (net.name, bucket)
    # and the motion latent is the config's own motion shape
    dit = networks_for(cfg, names=["motion_dit"])[0]
    assert dit.input_shapes(ShapeBucket(4, 32, 64), 1)["motion"][1:] == cfg.motion_shape(4, 32, 64)


def test_profiles_one_per_bucket_batch_spans_its_range(make_tiny_latent_config):
    cfg = make_tiny_latent_config([(4, 32, 32), (4, 32, 64)])
    unet = networks_for(cfg, names=["content_unet"], max_batch=3)[0]
    profiles = unet.profiles()
    assert [str(p.bucket) for p in profiles] == ["4x32x32", "4x32x64"]
    assert profiles[1].min["sample"] == (1, 4, 16, 32)
    assert profiles[1].opt["sample"] == (2, 4, 16, 32)  # one video with its CFG twin
    assert profiles[1].max["sample"] == (6, 4, 16, 32)  # 3 videos x CFG
    assert unet.find_profile(unet.input_shapes(ShapeBucket(4, 32, 64), 5)) == 1
    with pytest.raises(ValueError, match="fit no shape bucket"):
        unet.find_profile(unet.input_shapes(ShapeBucket(4, 32, 64), 7))  # batch past the profile
    with pytest.raises(ValueError, match="fit no shape bucket"):
        unet.find_bucket(unet.input_shapes(ShapeBucket(4, 64, 64), 1))


def test_sample_inputs_types_and_masks():
    text = networks_for(load_config("default"), names=["text_encoder"])[0]
    inputs = text.sample_inputs(batch=5, generator=torch.Generator().manual_seed(3))
    assert inputs["input_ids"].dtype == torch.int64 and inputs["attention_mask"].dtype == torch.int64
    lengths = inputs["attention_mask"].sum(1)
    assert lengths.min() >= 1 and lengths[0] == text.config.text_encoder.max_length
    unet = networks_for(load_config("default"), names=["content_unet"])[0]
    fp16 = unet.sample_inputs(dtype=torch.float16)
    assert fp16["sample"].dtype == torch.float16 and fp16["timestep"].dtype == torch.float32


def test_weights_hash_sees_every_change():
    lin = torch.nn.Linear(4, 3)
    base = weights_hash(lin)
    assert weights_hash(lin) == base
    with torch.no_grad():
        lin.bias[1] += 1e-6
    assert weights_hash(lin) != base
    hashes = weights_hashes(lin)
    assert hashes["float32"] == weights_hash(lin)
    assert hashes["float16"] == weights_hash(lin.half())  # what the same model hashes to once cast
    assert len(set(hashes.values())) == 3
