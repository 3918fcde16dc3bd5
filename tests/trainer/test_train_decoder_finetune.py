"""Decoder fine-tuning: the autoencoder stage continued from a model folder with the encoder frozen
changes the decoder only, so the content frames and motion latents the diffusion stages saw stay valid."""

import torch

from engine.configs import load_config
from engine.models import CMDModel
from trainer.train import main


def _tiny_config(path):
    cfg = load_config("default")
    cfg.num_frames, cfg.height, cfg.width = 4, 16, 16
    cfg.sizes = ["4x16x16"]  # the sizes it serves: its own
    a = cfg.autoencoder
    a.hidden_size, a.encoder_depth, a.decoder_depth, a.num_heads = 32, 1, 1, 2
    cfg.save(str(path))
    return str(path)


def test_freeze_encoder_trains_only_the_decoder(tmp_path):
    cfg = _tiny_config(tmp_path / "tiny.json")
    common = ["--data", "synthetic", "--batch-size", "2", "--num-clips", "16", "--no-progress",
              "--sample-every", "0", "--threads", "1"]
    assert main(["--stage", "autoencoder", "--config", cfg, "--out", str(tmp_path / "a"), "--steps", "2"] + common) == 0
    before = CMDModel.from_pretrained(str(tmp_path / "a" / "model")).autoencoder
    assert main(["--stage", "autoencoder", "--init", str(tmp_path / "a" / "model"), "--freeze-encoder",
                 "--out", str(tmp_path / "b"), "--steps", "3", "--lr", "1e-2"] + common) == 0
    after = CMDModel.from_pretrained(str(tmp_path / "b" / "model")).autoencoder
    video = torch.rand(1, 4, 3, 16, 16) * 2 - 1
    for x, y in zip(before.encode(video), after.encode(video)):
        torch.testing.assert_close(x, y)
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert changed and all(not n.startswith(("patch_embed", "encoder_", "importance_head", "motion_head"))
                           for n in changed)
