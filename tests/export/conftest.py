"""Shared, session-scoped exports: each graph is exported once per test run (exporting is the slow part).

- the default model (shipped weights, or ``random:default`` until they ship), all networks, float32;
- a tiny random latent-mode model (image VAE included) with two shape buckets that differ in frames,
  so the motion DiT and AE decoder graphs carry a dynamic frames axis, all networks, float32;
- float16 graphs of the default DiT and the tiny VAE decoder (GroupNorm), for the fp16 parity rows.
(Dynamic height/width axes are exercised by test_onnx_export.py's external-data export.)

Untrained DiTs have zero-initialised output layers (adaLN-Zero): their output is exactly zero and a
parity check there could not fail, so those all-zero tensors get small random values first.
"""

import pytest
import torch

from engine.configs import CMDConfig, load_config


def wake_zero_layers(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every all-zero floating-point parameter small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def tiny_latent_config(buckets=((4, 32, 32), (2, 32, 32))) -> CMDConfig:
    """The SD-scale latent config shrunk to a few thousand parameters per network: a 2-level image VAE
    (scale 2), a 2-level UNet, a 1-block DiT and AE, a 1-layer random BERT."""
    d = load_config("sd21-512x1024").to_dict()
    d.update(name="tiny-latent", num_frames=4, height=32, width=32, vae_scale=2)
    d["autoencoder"].update(hidden_size=16, encoder_depth=1, decoder_depth=1, num_heads=2, motion_dim=4)
    d["motion_dit"].update(size="tiny", depth=1, hidden_size=32, num_heads=2, patch_size=2, content_patch_size=2)
    d["content_unet"] = dict(sample_size=16, in_channels=4, out_channels=4,
                             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[16, 32],
                             layers_per_block=1, attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)
    d["vae"].update(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                    block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4, sample_size=32)
    d["text_encoder"] = dict(kind="random", max_length=8, hidden_size=32)
    d["sizes"] = [b if isinstance(b, str) else list(b) for b in buckets]  # the sizes it serves: its buckets
    return CMDConfig.from_dict(d)


@pytest.fixture(scope="session")
def default_model():
    """(model, text encoder, spec) of the default model, as the engine loads it."""
    from engine.default_model import default_model_dir
    from export.onnx_export import load_model

    try:
        default_model_dir()
        spec = "default"
    except ValueError:  # no shipped weights in this checkout yet
        spec = "random:default"
    model, text_encoder = load_model(spec)
    wake_zero_layers(model)
    return model, text_encoder, spec


@pytest.fixture(scope="session")
def default_export(default_model, tmp_path_factory):
    from export.onnx_export import export_model

    model, text_encoder, spec = default_model
    out = str(tmp_path_factory.mktemp("onnx") / "default-fp32")
    return out, export_model(model, out, text_encoder, "float32", model_spec=spec)


@pytest.fixture(scope="session")
def tiny_latent():
    from engine.models import CMDModel
    from engine.random_text import RandomTextEncoder

    cfg = tiny_latent_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CMDModel.from_config(cfg).eval().requires_grad_(False)
    wake_zero_layers(model)
    return model, RandomTextEncoder(cfg.text_encoder.hidden_size, cfg.text_encoder.max_length, num_layers=1)


@pytest.fixture(scope="session")
def tiny_latent_export(tiny_latent, tmp_path_factory):
    from export.onnx_export import export_model

    model, text_encoder = tiny_latent
    out = str(tmp_path_factory.mktemp("onnx") / "tiny-latent-fp32")
    return out, export_model(model, out, text_encoder, "float32")


@pytest.fixture(scope="session")
def fp16_exports(default_model, tiny_latent, tmp_path_factory):
    """float16 graphs: the default model's DiT, the tiny model's VAE decoder (GroupNorm)."""
    from export.onnx_export import export_model

    root = tmp_path_factory.mktemp("onnx16")
    default_dir, tiny_dir = str(root / "default-fp16"), str(root / "tiny-fp16")
    export_model(default_model[0], default_dir, None, "float16", names=["motion_dit"])
    export_model(tiny_latent[0], tiny_dir, None, "float16", names=["vae_decoder"])
    return default_dir, tiny_dir


@pytest.fixture(scope="session")
def make_tiny_latent_config():
    """The function building the tiny latent config (buckets as an argument)."""
    return tiny_latent_config
