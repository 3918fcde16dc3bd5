"""The evaluator: attribute measurement is right on generator clips with known attributes, generation is
independent of how prompts are sharded, and a whole evaluation runs on a tiny model folder."""

import json
import os

import pytest
import torch

from engine.models import CMDModel
from trainer.data import frames_to_tensor, prompts_for, render_clip
from trainer.evaluate import attribute_accuracy, generate, main
from test_metrics import tiny_clip_folder  # noqa: E402  (tests/trainer is on sys.path under pytest)
from test_train_stages import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def heldout_clips():
    pairs = prompts_for("heldout", 16, seed=0)
    return [frames_to_tensor(render_clip(spec)) for _, spec in pairs], [spec for _, spec in pairs]


def test_attribute_accuracy_on_generator_clips(heldout_clips):
    videos, specs = heldout_clips
    result = attribute_accuracy(videos, specs)
    assert result == {"colour_accuracy": 1.0, "shape_accuracy": 1.0, "motion_accuracy": 1.0, "all_accuracy": 1.0,
                      "content_stability": 1.0, "clips": 16}


def test_content_stability_sees_an_object_that_changes(heldout_clips):
    videos, specs = heldout_clips
    # Second half of each clip replaced by another clip's frames (another colour or shape).
    spliced = []
    for k, v in enumerate(videos):
        other = next(o for o, s in zip(videos, specs)
                     if (s.colour, s.shape) != (specs[k].colour, specs[k].shape))
        spliced.append(torch.cat([v[:8], other[8:]]))
    assert attribute_accuracy(spliced, specs)["content_stability"] <= 0.75


def test_attribute_accuracy_sees_wrong_motion(heldout_clips):
    videos, specs = heldout_clips
    # Mirrored left-right: circles, squares and upward triangles keep their look, left and right swap.
    mirrored = [v.flip(-1) for v in videos]
    horizontal = sum(s.motion in ("left", "right") for s in specs) / len(specs)
    result = attribute_accuracy(mirrored, specs)
    assert 0 < horizontal < 1
    assert result["colour_accuracy"] == 1.0 and result["shape_accuracy"] == 1.0
    assert result["motion_accuracy"] == pytest.approx(1 - horizontal)
    # Wrong labels: every clip's colour claimed to be another one.
    relabelled = [{"colour": "white" if s.colour != "white" else "red", "shape": s.shape, "motion": s.motion}
                  for s in specs]
    assert attribute_accuracy(videos, relabelled)["colour_accuracy"] == 0.0


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    CMDModel.from_config(tiny_config(root / "tiny.json")).save_pretrained(str(root / "model"))
    return root / "model"


def test_generation_does_not_depend_on_sharding(model_folder):
    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained(str(model_folder))
    prompts = ["a red circle moving left", "a blue square moving up", "a green triangle moving down"]
    kwargs = dict(num_inference_steps=2, motion_steps=2)  # batch size changes float rounding, not the noise
    whole = generate(pipe, prompts, [0, 1, 2], seed=5, batch_size=3, **kwargs)
    rank0 = generate(pipe, prompts[0::2], [0, 2], seed=5, batch_size=1, **kwargs)
    rank1 = generate(pipe, prompts[1::2], [1], seed=5, batch_size=1, **kwargs)
    assert whole.shape == (3, 4, 3, 16, 16) and -1 <= whole.min() and whole.max() <= 1
    assert torch.allclose(whole[0], rank0[0], atol=1e-3) and torch.allclose(whole[2], rank0[1], atol=1e-3)
    assert torch.allclose(whole[1], rank1[0], atol=1e-3)


def test_full_evaluation_writes_json(tmp_path, model_folder):
    from safetensors.torch import save_file

    from trainer.i3d import InceptionI3d

    torch.manual_seed(0)
    i3d = tmp_path / "i3d.safetensors"
    save_file({k: v.contiguous() for k, v in InceptionI3d(num_classes=16).state_dict().items()}, str(i3d))
    out = tmp_path / "eval.json"
    code = main(["--model", str(model_folder), "--data", "synthetic", "--num-clips", "4", "--batch-size", "2",
                 "--steps", "2", "--motion-steps", "2", "--i3d", str(i3d), "--i3d-size", "32",
                 "--clip", tiny_clip_folder(tmp_path / "clip"), "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["clips"] == 4 and len(results["attribute_rows"]) == 4
    assert results["model"] == os.path.abspath(str(model_folder))
    assert 0 < results["recon_psnr"] < 60 and -1 <= results["recon_ssim"] <= 1
    assert set(results["attributes"]) == {"colour_accuracy", "shape_accuracy", "motion_accuracy", "all_accuracy",
                                          "content_stability", "clips"}
    assert results["fvd"] >= 0 and -1 <= results["clipsim"] <= 1


@pytest.mark.parametrize("extra,needle", [(["--metrics", "fvd"], "--i3d"), (["--metrics", "bleu"], "bleu"),
                                          (["--num-clips", "1"], "1"),
                                          (["--out", "TMP"], "--out is a file")])  # before the evaluation
def test_bad_evaluation_input_is_one_line(tmp_path, model_folder, capsys, extra, needle):
    extra = [str(tmp_path) if a == "TMP" else a for a in extra]
    assert main(["--model", str(model_folder), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_evaluation_at_a_given_size(tmp_path, model_folder, monkeypatch, capsys):
    """--size: clips rendered and videos generated at that size (a size is declared in a config only once
    evaluated there); the results name the size and whether the model serves it already."""
    import trainer.evaluate as evaluate_module

    shapes = []
    real = evaluate_module.generate

    def spy(pipe, *args, **kwargs):
        videos = real(pipe, *args, **kwargs)
        shapes.append(tuple(videos.shape))
        return videos

    monkeypatch.setattr(evaluate_module, "generate", spy)
    out = tmp_path / "eval.json"
    common = ["--model", str(model_folder), "--metrics", "recon,attributes", "--num-clips", "2", "--steps", "1",
              "--motion-steps", "1", "--out", str(out)]
    assert main(common + ["--size", "2x16x32"]) == 0
    results = json.loads(out.read_text())
    assert (results["size"], results["served"]) == ("2x16x32", False)
    assert shapes == [(2, 2, 3, 16, 32)] and 0 < results["recon_psnr"] < 60
    assert main(common) == 0  # default: the model's own size, which it serves
    results = json.loads(out.read_text())
    assert (results["size"], results["served"]) == ("4x16x16", True) and shapes[-1] == (2, 4, 3, 16, 16)
    capsys.readouterr()
    assert main(common + ["--size", "4x18x16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4x18x16" in err[0]
