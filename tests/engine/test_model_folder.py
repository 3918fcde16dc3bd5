"""engine.model_folder: a model folder with a missing, empty or truncated file is refused with one line naming
the folder and the file, before any weights load, by the library and by every CLI that takes a model folder
(real processes: diffusers logs its own error lines to the stderr it found at import, which only a real
process shows)."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from engine.model_folder import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, check_model_folder, find_network_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(os.path.dirname(__file__), "tiny_config.json")
TRAINED = ("autoencoder", "motion_dit", "content_unet")  # the networks of a pixel-space folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.pipeline import CMDPipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny")
    CMDPipeline.from_pretrained("random:" + TINY).model.save_pretrained(path)
    return path


def _copy(model_dir, tmp_path, name="bad"):
    bad = str(tmp_path / name)
    shutil.copytree(model_dir, bad)
    return bad


def _no_weights(folder, net):
    os.remove(os.path.join(folder, net, WEIGHTS_NAME))
    return f"{net}/{WEIGHTS_NAME} is missing"


def _no_config(folder, net):
    os.remove(os.path.join(folder, net, "config.json"))
    return f"{net}/config.json is missing"


def _empty_subfolder(folder, net):
    shutil.rmtree(os.path.join(folder, net))
    os.mkdir(os.path.join(folder, net))
    return f"{net}/config.json is missing"


def _no_subfolder(folder, net):
    shutil.rmtree(os.path.join(folder, net))
    return f"lacks its {net}/ network"


def _truncated(folder, net):
    path = os.path.join(folder, net, WEIGHTS_NAME)
    with open(path, "r+b") as f:
        f.truncate(random.randrange(1, os.path.getsize(path)))
    return f"{net}/{WEIGHTS_NAME} is not a complete safetensors file"


def _empty_weights(folder, net):
    open(os.path.join(folder, net, WEIGHTS_NAME), "w").close()
    return f"{net}/{WEIGHTS_NAME} is not a complete safetensors file"


def _missing_shard(folder, net):
    """A sharded network (diffusers' index) whose second shard is gone."""
    shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    os.rename(os.path.join(folder, net, WEIGHTS_NAME), os.path.join(folder, net, shards[0]))
    with open(os.path.join(folder, net, WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}, f)
    return f"{net}/{shards[1]} is missing"


FAULTS = [_no_weights, _no_config, _empty_subfolder, _no_subfolder, _truncated, _empty_weights]


def test_file_names_are_diffusers():
    from diffusers.utils import constants

    assert WEIGHTS_NAME == constants.SAFETENSORS_WEIGHTS_NAME
    assert WEIGHTS_INDEX_NAME == constants.SAFE_WEIGHTS_INDEX_NAME
    from engine import model_folder

    assert model_folder.NETWORK_CONFIG == constants.CONFIG_NAME
    assert model_folder.PICKLE_WEIGHTS_NAME == constants.WEIGHTS_NAME
    assert model_folder.PICKLE_WEIGHTS_INDEX_NAME == constants.WEIGHTS_INDEX_NAME


def test_a_complete_folder_passes_and_sharded_weights_are_followed(model_dir, tmp_path):
    from engine.configs import load_config
    from engine.models import CMDModel

    assert check_model_folder(model_dir).to_dict() == load_config(TINY).to_dict()
    # A network saved in shards (diffusers' index + shard files) is a complete folder too, and loads.
    model = CMDModel.from_pretrained(model_dir)
    sharded = str(tmp_path / "sharded")
    shutil.copytree(model_dir, sharded)
    shutil.rmtree(os.path.join(sharded, "motion_dit"))
    model.motion_dit.save_pretrained(os.path.join(sharded, "motion_dit"), max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "motion_dit", WEIGHTS_INDEX_NAME))
    assert check_model_folder(sharded).name == model.config.name
    loaded = CMDModel.from_pretrained(sharded)
    assert all(torch.equal(a, b) for a, b in zip(model.motion_dit.state_dict().values(),
                                                 loaded.motion_dit.state_dict().values()))


@pytest.mark.parametrize("net", TRAINED)
@pytest.mark.parametrize("fault", FAULTS + [_missing_shard], ids=lambda f: getattr(f, "__name__", f))
def test_every_missing_or_broken_file_is_named_before_loading(model_dir, tmp_path, monkeypatch, net, fault):
    from engine.default_model import resolve_model
    from engine.models import CMDModel

    bad = _copy(model_dir, tmp_path)
    expected = fault(bad, net)
    for check in (check_model_folder, resolve_model, CMDModel.from_pretrained):
        with pytest.raises(ValueError) as info:
            check(bad)
        message = str(info.value)
        assert "\n" not in message and repr(bad) in message and expected in message, message
    # ... before any network loads: diffusers is never asked
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a network was loaded")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    with pytest.raises(ValueError, match="model folder"):
        CMDModel.from_pretrained(bad)


def test_stable_diffusion_folders_are_checked_too(tmp_path):
    """--vae / --pretrained-unet folders (diffusers' layout, .bin weights allowed): the same one line."""
    from diffusers import AutoencoderKL

    from engine.models.vae import load_vae

    sd = tmp_path / "sd"
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, layers_per_block=1, latent_channels=4)
    vae.save_pretrained(str(sd / "vae"))
    assert find_network_folder(str(sd), "vae", "VAE folder") == ("vae", True)
    assert sum(p.numel() for p in load_vae(str(sd)).parameters()) == sum(p.numel() for p in vae.parameters())
    os.remove(sd / "vae" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"VAE folder '{sd}' is incomplete: vae/{WEIGHTS_NAME} or "
                                         r"diffusion_pytorch_model.bin is missing"):
        load_vae(str(sd))
    torch.save(vae.state_dict(), sd / "vae" / "diffusion_pytorch_model.bin")  # the pickle format diffusers reads
    assert find_network_folder(str(sd), "vae", "VAE folder") == ("vae", False)


# -- every CLI that takes a model folder, in a real process ------------------------------------------

def _clis(bad, good, tmp):
    """(name, argv) of each CLI with an otherwise valid command whose model folder is ``bad``."""
    os.makedirs(os.path.join(tmp, "onnx"))
    with open(os.path.join(tmp, "onnx", "manifest.json"), "w") as f:  # an export folder that names the model
        json.dump({"format": 1, "model": {"spec": bad}}, f)
    return [
        ("engine.run", ["--prompt", "x", "--model", bad, "--out", os.path.join(tmp, "v.npy")]),
        ("engine.bench", ["latency", "--model", bad, "--backends", "eager"]),
        ("engine.bench", ["cache", "--model", bad]),
        ("engine.profile", ["--model", bad, "--out-dir", os.path.join(tmp, "profile")]),
        ("engine.calibrate_cache", ["--model", bad]),
        ("export", ["onnx", "--model", bad, "--out", os.path.join(tmp, "graphs")]),
        ("export", ["check", "--onnx", os.path.join(tmp, "onnx")]),
        ("trainer.evaluate", ["--model", bad, "--num-clips", "2"]),
        ("trainer.train", ["--stage", "autoencoder", "--init", bad, "--out", os.path.join(tmp, "run")]),
        ("trainer.train", ["--stage", "motion", "--init", bad, "--out", os.path.join(tmp, "run")]),
        ("trainer.compose", ["--autoencoder", good, "--content", bad, "--motion", good,
                             "--out", os.path.join(tmp, "composed")]),
    ]


def test_every_cli_says_one_line_and_loads_nothing(model_dir, tmp_path):
    bad = _copy(model_dir, tmp_path, "models-bad")
    expected = _no_weights(bad, "content_unet")  # the fault a new user met
    work = tmp_path / "work"
    work.mkdir()
    clis = _clis(bad, model_dir, str(work))
    before = sorted(os.listdir(work))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for module, argv in clis:
        proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env,
                              cwd=str(work), timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (module, argv, proc.stderr[-3000:])
        assert lines[0].startswith("error: ") and repr(bad) in lines[0] and expected in lines[0], (module, lines)
        assert sorted(os.listdir(work)) == before, (module, os.listdir(work))  # nothing written
