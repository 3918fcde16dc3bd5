"""A few steps of each training stage on a tiny config lower a fixed-draw loss, and the three stages
chained through one run folder leave a complete model folder that the engine loads and runs."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from engine.models import CMDModel
from trainer import checkpoint as ckpt
from trainer.data import SyntheticVideos
from trainer.stages import make_stage
from trainer.text_cache import CaptionEmbeddings
from trainer.train import Indexed, build_parser, collate_clips, stage_model, main

STEPS = {"autoencoder": 12, "content": 12, "motion": 20}


def tiny_config(path):
    """4 frames of 16x16, every network a few thousand parameters (runs under the Triton interpreter)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "engine", "configs", "default.json")) as f:
        d = json.load(f)
    d.update(name="tiny-test", num_frames=4, height=16, width=16, sizes=["4x16x16"])
    d["autoencoder"].update(patch_size=2, hidden_size=32, encoder_depth=1, decoder_depth=1, num_heads=2)
    d["motion_dit"].update(depth=1, hidden_size=64, num_heads=2, content_patch_size=4)
    d["content_unet"].update(sample_size=16, block_out_channels=[32, 32], norm_num_groups=8, attention_head_dim=4,
                             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    d["sampling"].update(steps=2, motion_steps=2)
    for section in d["train"].values():
        section.update(lr=2e-3, batch_size=4, warmup_steps=0)
    with open(path, "w") as f:
        json.dump(d, f)
    return str(path)


def run(stage, out, config, steps, *extra):
    argv = ["--stage", stage, "--config", config, "--data", "synthetic", "--out", str(out), "--steps", str(steps),
            "--num-clips", "4", "--checkpoint-every", str(steps), "--log-every", "1", "--sample-every", "0",
            "--no-progress", "--threads", "1", *extra]
    assert main(argv) == 0


def fixed_loss(stage_name, config, out, weights=None, draws=6):
    """Mean loss of the stage's network over fixed batches and fixed noise draws (the same for every call)."""
    args = build_parser().parse_args(["--stage", stage_name, "--config", config, "--out", str(out)])
    model = stage_model(args, stage_name, str(out))  # the initial network the run started from
    text = None
    if stage_name != "autoencoder":
        from engine.models.text import TextEncoder

        text = CaptionEmbeddings(lambda: TextEncoder.from_config(model.config.text_encoder))
    stage = make_stage(stage_name, model, {"text_dropout": 0.0}, torch.device("cpu"), text)
    if weights is not None:
        stage.network.load_state_dict(weights)
    data = Indexed(SyntheticVideos(4, 4, 16, 16, seed=0))
    batch = collate_clips([data[i] for i in range(4)])
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        inputs = stage.prepare(batch)
        return sum(stage.loss(stage.network.eval(), inputs, generator)[0].item() for _ in range(draws)) / draws


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The three stages, one after the other, in one run folder (as the README tells users to run them)."""
    root = tmp_path_factory.mktemp("stages")
    config = tiny_config(root / "tiny.json")
    out = root / "run"
    losses = {}
    snapshots = {}
    for stage in ("autoencoder", "content", "motion"):
        before = fixed_loss(stage, config, out)
        run(stage, out, config, STEPS[stage])
        final = ckpt.latest_checkpoint(str(out / "checkpoints" / stage))
        after = fixed_loss(stage, config, out, load_file(os.path.join(final, "model.safetensors")))
        losses[stage] = (before, after)
        snapshots[stage] = load_file(os.path.join(final, "ema.safetensors"))
    return out, config, losses, snapshots


@pytest.mark.parametrize("stage", ["autoencoder", "content", "motion"])
def test_a_few_steps_lower_the_loss(trained, stage):
    _, _, losses, _ = trained
    before, after = losses[stage]
    print(f"{stage}: fixed-draw loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, f"{stage}: fixed-draw loss {before:.4f} -> {after:.4f}"


def test_logs_record_every_step(trained):
    out = trained[0]
    for stage, steps in STEPS.items():
        records = [json.loads(line) for line in open(out / "logs" / f"{stage}.jsonl")]
        logged = [r["step"] for r in records if "loss" in r]
        assert logged == list(range(1, steps + 1))
        assert records[-1]["event"] == "done"
        assert all(r["clips_per_s"] > 0 for r in records if "loss" in r)


def test_final_folder_is_a_complete_model_the_engine_runs(trained):
    from engine.pipeline import CMDPipeline

    out, _, _, snapshots = trained
    model = CMDModel.from_pretrained(str(out / "model"))
    # Each stage wrote its EMA network; the later stages kept the earlier ones frozen.
    for stage, net in (("autoencoder", model.autoencoder), ("content", model.content_unet),
                       ("motion", model.motion_dit)):
        state = net.state_dict()
        for name, value in snapshots[stage].items():
            assert torch.equal(state[name], value), f"{stage}: {name} differs from the stage's EMA weights"
    assert model.config.name == "tiny-test"
    from engine.models.text import TextEncoder

    pipe = CMDPipeline(model, TextEncoder.from_config(model.config.text_encoder))
    frames = pipe("a red circle moving right", num_inference_steps=2, motion_steps=2, generator=0,
                  progress=False).frames
    assert frames.shape == (1, 4, 16, 16, 3)
    assert frames.min() >= 0 and frames.max() <= 1


def test_later_stage_needs_the_stage_one_folder(tmp_path, capsys):
    config = tiny_config(tmp_path / "tiny.json")
    code = main(["--stage", "motion", "--config", config, "--out", str(tmp_path / "empty"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage-1 model folder" in err[0]


@pytest.mark.parametrize("resume", [False, True], ids=["again", "resume"])
def test_stage_one_refuses_an_out_holding_later_stages(trained, capsys, resume):
    """Stage 1 from the config into a run folder where the content and motion stages have run would write
    untrained networks over theirs in model/: one line, exit 2, the folder as it was."""
    out, config, _, _ = trained
    model = out / "model"
    before = {str(p.relative_to(model)): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    argv = ["--stage", "autoencoder", "--config", config, "--data", "synthetic", "--out", str(out), "--steps", "2",
            "--num-clips", "4", "--no-progress", "--threads", "1"] + (["--resume"] if resume else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "content and motion stage's networks" in err[0] and str(model) in err[0], err
    assert {str(p.relative_to(model)): p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_an_out_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    code = main(["--stage", "autoencoder", "--config", tiny_config(tmp_path / "tiny.json"), "--out", str(a_file),
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out is a folder" in err[0], err
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--batch-size", "-1"), ("--config", "no-such-config")])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flag, value):
    argv = ["--stage", "autoencoder", "--config", tiny_config(tmp_path / "tiny.json"), "--out", str(tmp_path / "o"),
            "--no-progress", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and value in err[0]
    assert not (tmp_path / "o" / "model").exists()


def test_previews_sample_with_the_config_defaults(trained, monkeypatch):
    """Preview loops take steps, guidance and scheduler from the config's sampling section by the request's
    rule (motion values left out follow the content ones), as the engine samples."""
    import random

    import numpy as np

    from engine.models.text import TextEncoder
    from engine.pipeline import CMDPipeline
    from trainer.preview import preview

    seen = {}
    for name in ("generate_content", "generate_motion"):
        real = getattr(CMDPipeline, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            seen[_name] = args[3:6]  # steps, guidance, scheduler
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(CMDPipeline, name, spy)
    out = trained[0]
    model = CMDModel.from_pretrained(str(out / "model"))
    guidance = round(random.uniform(1.5, 6.0), 3)
    sampling = model.config.sampling
    sampling.steps, sampling.motion_steps, sampling.guidance, sampling.motion_guidance = 2, None, guidance, None
    text = CaptionEmbeddings(lambda: TextEncoder.from_config(model.config.text_encoder))
    data = Indexed(SyntheticVideos(4, 4, 16, 16, seed=0))
    batch = collate_clips([data[i] for i in range(2)])
    for stage_name in ("content", "motion"):
        stage = make_stage(stage_name, model, {}, torch.device("cpu"), text)
        frames = preview(stage, stage.network, batch)
        assert frames.dtype == np.uint8 and frames.shape[-1] == 3
    assert seen["generate_content"] == (2, guidance, sampling.scheduler)
    assert seen["generate_motion"] == (2, guidance, sampling.scheduler)
