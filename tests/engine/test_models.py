"""The CMD networks: shapes for every config (meta device at scale), the paper's parameter counts,
the AE's content/motion structure, and the DiT's use of its text condition."""

import os

import pytest
import torch

from engine.configs import available_configs, load_config
from engine.models import CMDModel, TextEncoder


def _counts(model):
    return {name: sum(p.numel() for p in getattr(model, name).parameters())
            for name in ("autoencoder", "motion_dit", "content_unet")}


@pytest.mark.parametrize("name", ["default", "ucf101-64", "sd21-512x1024"])
def test_every_network_shapes_on_meta(name):
    cfg = load_config(name)
    model = CMDModel.from_config(cfg, device="meta")
    c, h, w, frames = cfg.channels, cfg.latent_height, cfg.latent_width, cfg.num_frames
    with torch.device("meta"):
        video = torch.empty(2, frames, c, h, w)
        content, motion = model.autoencoder.encode(video)
        assert content.shape == (2, c, h, w)
        assert motion.shape == (2, *cfg.motion_shape())
        assert model.autoencoder.decode(content, motion).shape == video.shape
        eps = model.motion_dit(motion, torch.empty(2), content, torch.empty(2, cfg.text_encoder.hidden_size))
        assert eps.shape == motion.shape
        states = torch.empty(2, cfg.text_encoder.max_length, cfg.text_encoder.hidden_size)
        assert model.content_unet(content, torch.empty(2), encoder_hidden_states=states).sample.shape == content.shape
        if cfg.space == "latent":
            assert model.vae.decode(torch.empty(1, c, h, w)).sample.shape == (1, 3, cfg.height, cfg.width)


def test_sd21_parameter_counts_match_the_paper():
    counts = _counts(CMDModel.from_config("sd21-512x1024", device="meta"))
    print({k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
    for name, expected in {"motion_dit": 675e6, "autoencoder": 70e6, "content_unet": 865e6}.items():
        assert abs(counts[name] / expected - 1) < 0.05, (name, counts[name])


def test_configs_are_data():
    assert {"default", "ucf101-64", "sd21-512x1024"} <= set(available_configs())
    cfg = load_config("sd21-512x1024")
    assert cfg.motion_shape() == (8, 16, 96)  # 32 + 64: H' + W' of the 64x128 latent
    with pytest.raises(ValueError, match="nope"):
        load_config("nope")


def test_decoder_input_is_the_broadcast_sum(monkeypatch):
    torch.manual_seed(0)
    ae = CMDModel.from_config("default").autoencoder
    p = ae.config.patch_size
    hp, wp = 32 // p, 64 // p
    content, motion = torch.rand(1, 3, 32, 64) * 2 - 1, torch.rand(1, 8, 4, hp + wp) * 2 - 1
    seen = {}
    import cmd_kernels

    real = cmd_kernels.decoder_fusion

    def spy(c, th, tw, *args, **kw):
        seen.update(content=c, th=th, tw=tw)
        out = real(c, th, tw, *args, **kw)
        seen["cube"] = out[0]
        return out

    monkeypatch.setattr(cmd_kernels, "decoder_fusion", spy)
    ae.decode(content, motion)
    cube = seen["cube"]
    assert cube.shape == (1, 4, hp, wp, ae.config.hidden_size)
    l, h, w = 3, hp - 1, wp - 2
    torch.testing.assert_close(cube[0, l, h, w], seen["content"][0, h, w] + seen["th"][0, l, h] + seen["tw"][0, l, w])
    # The time-height plane comes from the first H' motion positions, the time-width plane from the other W'.
    planes = motion.permute(0, 2, 3, 1)
    torch.testing.assert_close(seen["tw"], ae.motion_embed_width(planes[:, :, hp:]))


def test_non_square_round_trip_and_content_frame():
    torch.manual_seed(0)
    ae = CMDModel.from_config("default").autoencoder
    video = torch.rand(2, 16, 3, 32, 64) * 2 - 1
    content, motion = ae.encode(video)
    p = ae.config.patch_size
    assert content.shape == (2, 3, 32, 64) and motion.shape == (2, 8, 16, 32 // p + 64 // p)
    assert motion.abs().max() <= 1
    # Content frame: per pixel within the frames' range over time.
    assert torch.all(content <= video.max(1).values + 1e-5) and torch.all(content >= video.min(1).values - 1e-5)
    recon = ae.decode(content, motion)
    assert recon.shape == video.shape and recon.abs().max() <= 1


def test_encoder_sees_positions():
    """The official encoder had no positional information in effect (rotary built, never applied), so
    its motion planes could not tell a video from its mirror image. Ours can."""
    torch.manual_seed(0)
    ae = CMDModel.from_config("default").autoencoder
    video = torch.rand(1, 4, 3, 32, 64) * 2 - 1
    _, motion = ae.encode(video)
    _, motion_mirrored = ae.encode(video.flip(-1))
    p = ae.config.patch_size
    # The time-height plane averages over width: a mirror changes it only through positions.
    assert not torch.allclose(motion[..., : 32 // p], motion_mirrored[..., : 32 // p], atol=1e-5)


def test_motion_dit_uses_its_text_condition():
    torch.manual_seed(0)
    dit = CMDModel.from_config("default").motion_dit
    for p in dit.parameters():  # leave adaLN-Zero's zero init, as after training
        torch.nn.init.normal_(p, std=0.05)
    z, content, t = torch.randn(2, 8, 16, 16), torch.rand(2, 3, 32, 32), torch.tensor([3, 700])
    a = dit(z, t, content, torch.randn(2, 384))
    b = dit(z, t, content, torch.randn(2, 384))
    assert not torch.allclose(a, b, atol=1e-4)
    uncond = dit(z, t, content, None)
    dropped = dit(z, t, content, torch.randn(2, 384), drop_text=torch.tensor([True, True]))
    torch.testing.assert_close(uncond, dropped)
    half = dit(z, t, content, torch.randn(2, 384), drop_text=torch.tensor([True, False]))
    torch.testing.assert_close(half[0], uncond[0])
    # The content frame conditions too, and only the z positions are returned.
    assert not torch.allclose(a, dit(z, t, content.flip(-1), None), atol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CMDModel.from_config("default")
    model.save_pretrained(str(tmp_path / "m"))
    assert (tmp_path / "m" / "autoencoder" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    loaded = CMDModel.from_pretrained(str(tmp_path / "m"))
    for name in ("autoencoder", "motion_dit", "content_unet"):
        a, b = getattr(model, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Saving again over the folder is atomic, leaves no temporary folders behind and keeps what the folder
    # held besides the model (a model card, notes); a network folder the new model lacks goes.
    (tmp_path / "m" / "README.md").write_text("model card")
    (tmp_path / "m" / "notes").mkdir()
    (tmp_path / "m" / "notes" / "a.txt").write_text("a")
    (tmp_path / "m" / "vae").mkdir()  # e.g. left from a latent-space model saved here before
    model.save_pretrained(str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert sorted(os.listdir(tmp_path / "m")) == ["README.md", "autoencoder", "cmd_config.json", "content_unet",
                                                  "motion_dit", "notes"]
    assert (tmp_path / "m" / "README.md").read_text() == "model card"
    assert (tmp_path / "m" / "notes" / "a.txt").read_text() == "a"
    with pytest.raises(ValueError, match="not a CMD model folder"):
        CMDModel.from_pretrained(str(tmp_path))


def test_minilm_loads_offline_and_separates_prompts():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    enc = TextEncoder.minilm(max_length=16)
    states, pooled = enc(["a red circle moving right", "a red ball moving to the right",
                          "the stock market fell sharply on tuesday"])
    assert states.shape == (3, 16, 384) and pooled.shape == (3, 384)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2]  # a paraphrase is nearer than an unrelated sentence


TINY_CONFIG = os.path.join(os.path.dirname(__file__), "tiny_config.json")


@pytest.mark.parametrize("name", ["default", "sd21-512x1024"])
def test_every_network_is_built_from_its_config_section(name):
    """One source for the hyper-parameters: each network's constructor arguments are its config section
    (the DiT's channels are the autoencoder's, the clip's and the text encoder's); the network classes
    hold no defaults of their own."""
    import dataclasses

    from engine.models import CMDAutoencoder, MotionDiT
    from engine.models.bundle import NETWORKS, check_network_config, network_kwargs

    cfg = load_config(name)
    model = CMDModel.from_config(cfg, device="meta")
    assert network_kwargs(cfg, "autoencoder") == dataclasses.asdict(cfg.autoencoder)
    dit = dict(network_kwargs(cfg, "motion_dit"))
    assert (dit.pop("motion_channels"), dit.pop("content_channels"), dit.pop("text_dim")) == (
        cfg.autoencoder.motion_dim, cfg.channels, cfg.text_encoder.hidden_size)
    assert dit == {k: v for k, v in dataclasses.asdict(cfg.motion_dit).items() if k != "size"}
    for net in NETWORKS:
        if getattr(model, net) is not None:
            if net in ("autoencoder", "motion_dit"):
                kwargs = network_kwargs(cfg, net)
                assert {k: getattr(model, net).config[k] for k in kwargs} == kwargs
            check_network_config(cfg, net, getattr(model, net).config, "here")  # diffusers' sections too
    for cls in (CMDAutoencoder, MotionDiT):
        with pytest.raises(TypeError):
            cls()


def _saved(tmp_path):
    cfg = load_config(TINY_CONFIG)
    torch.manual_seed(int(torch.randint(0, 1000, ())))
    model = CMDModel.from_config(cfg)
    folder = tmp_path / "m"
    model.save_pretrained(str(folder))
    return model, folder


def _edit(path, **changes):
    import json

    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (data[section] if section else data)[name] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("where, edit, key", [
    ("motion_dit/config.json", {"mlp_ratio": 3.0}, "mlp_ratio=3.0 but cmd_config.json has motion_dit.mlp_ratio=2.0"),
    ("cmd_config.json", {"autoencoder.num_heads": 1}, "autoencoder/config.json has num_heads=2 but cmd_config.json has "
                                                      "autoencoder.num_heads=1"),
    ("cmd_config.json", {"text_encoder.hidden_size": 48}, "motion_dit/config.json has text_dim=32 but cmd_config.json "
                                                          "has text_encoder.hidden_size=48"),
    ("content_unet/config.json", {"norm_num_groups": 4}, "content_unet/config.json has norm_num_groups=4 but "
                                                         "cmd_config.json has content_unet.norm_num_groups=8"),
])
def test_load_refuses_copies_that_disagree(tmp_path, where, edit, key):
    """A saved model holds its hyper-parameters twice (cmd_config.json and each network's config.json):
    loading checks that they agree, before any weights, with one line naming the key."""
    model, folder = _saved(tmp_path)
    assert CMDModel.from_pretrained(str(folder)) is not None
    _edit(folder / where, **edit)
    with pytest.raises(ValueError) as info:
        CMDModel.from_pretrained(str(folder))
    message = str(info.value)
    assert key in message and message.startswith(str(folder)) and "\n" not in message, message


def test_save_refuses_a_config_the_networks_do_not_follow(tmp_path):
    model, folder = _saved(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")}
    model.config.motion_dit.mlp_ratio = 3.0  # the DiT was built with the tiny config's 2.0
    with pytest.raises(ValueError, match=r"^cannot save the model: motion_dit/config.json has mlp_ratio=2.0 but "
                                         r"cmd_config.json has motion_dit.mlp_ratio=3.0"):
        model.save_pretrained(str(folder))
    assert {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # nothing written
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_saved_network_configs_hold_no_machine_paths(tmp_path):
    """diffusers records where a network was loaded from (``_name_or_path``): a model folder never keeps it,
    neither the shipped weights nor a folder saved after loading."""
    import glob
    import json

    from engine.default_model import default_model_dir

    shipped = glob.glob(os.path.join(default_model_dir(), "*", "config.json"))
    assert shipped and all("_name_or_path" not in json.load(open(p)) for p in shipped)
    model, folder = _saved(tmp_path)
    loaded = CMDModel.from_pretrained(str(folder))
    assert "_name_or_path" in loaded.autoencoder.config  # what diffusers adds on load ...
    loaded.save_pretrained(str(tmp_path / "again"))
    for path in glob.glob(str(tmp_path / "again" / "*" / "config.json")):
        data = json.load(open(path))
        assert "_name_or_path" not in data and data["_class_name"], path  # ... and the save leaves out
