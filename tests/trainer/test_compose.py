"""trainer.compose joins networks of separately trained stages, and refuses mismatched encoders."""

import torch

from engine.models import CMDModel
from test_train_stages import tiny_config  # noqa: E402  (tests/trainer is on sys.path under pytest)
from trainer.compose import main


def _folder(path, cfg, seed):
    torch.manual_seed(seed)
    model = CMDModel.from_config(cfg)
    model.save_pretrained(str(path))
    return model


def test_compose_takes_each_network_from_its_folder(tmp_path):
    cfg = tiny_config(tmp_path / "tiny.json")
    ae = _folder(tmp_path / "ae", cfg, 0)
    content = CMDModel.from_pretrained(str(tmp_path / "ae"))
    torch.nn.init.normal_(content.content_unet.conv_in.weight)
    content.save_pretrained(str(tmp_path / "content"))
    motion = CMDModel.from_pretrained(str(tmp_path / "ae"))
    torch.nn.init.normal_(motion.motion_dit.null_text)
    motion.save_pretrained(str(tmp_path / "motion"))
    # A decoder fine-tune: same encoder, new decoder.
    torch.nn.init.normal_(ae.autoencoder.output_head.weight)
    ae.save_pretrained(str(tmp_path / "ae2"))

    assert main(["--autoencoder", str(tmp_path / "ae2"), "--content", str(tmp_path / "content"),
                 "--motion", str(tmp_path / "motion"), "--out", str(tmp_path / "out")]) == 0
    out = CMDModel.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(out.autoencoder.output_head.weight, ae.autoencoder.output_head.weight)
    assert torch.equal(out.content_unet.conv_in.weight, content.content_unet.conv_in.weight)
    assert torch.equal(out.motion_dit.null_text, motion.motion_dit.null_text)


def test_compose_refuses_another_encoder(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "tiny.json")
    _folder(tmp_path / "a", cfg, 0)
    _folder(tmp_path / "b", cfg, 1)
    assert main(["--autoencoder", str(tmp_path / "a"), "--content", str(tmp_path / "b"),
                 "--motion", str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 2
    assert "encoder differs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
