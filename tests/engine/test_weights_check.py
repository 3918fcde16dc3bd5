"""Weights that are not weights (issue 25.6): a model folder, a Stable Diffusion network folder or a training
checkpoint whose safetensors hold integer tensors, another shape, NaN/inf, a missing or an extra tensor is
refused with one line naming the file and the tensor (both shapes where they differ), before any network loads
(engine.model_folder.check_tensors, the one rule)."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.model_folder import WEIGHTS_NAME

TINY = os.path.join(os.path.dirname(__file__), "tiny_config.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.pipeline import CMDPipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny")
    CMDPipeline.from_pretrained("random:" + TINY).model.save_pretrained(path)
    return path


def _first_weight(state):
    """The name of the first 2-D float tensor (a weight matrix: changing its shape cannot hide)."""
    return next(k for k, v in state.items() if v.dim() == 2 and v.is_floating_point())


def _ints(state, name):
    state[name] = (state[name] * 100).to(torch.int64)
    return [repr(name), "int64", "floating point"]


def _int8(state, name):
    state[name] = state[name].to(torch.int8)
    return [repr(name), "int8"]


def _shape(state, name):
    want = tuple(state[name].shape)
    state[name] = torch.randn(want[0] + 1, want[1])
    return [repr(name), str((want[0] + 1, want[1])), str(want)]


def _nan(state, name):
    state[name] = state[name].clone()
    state[name].view(-1)[3] = float("nan")
    return [repr(name), "1 NaN/inf"]


def _inf(state, name):
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("-inf")
    return [repr(name), "NaN/inf"]


def _missing(state, name):
    del state[name]
    return [repr(name), "missing"]


def _extra(state, name):
    state["stray.weight"] = torch.zeros(2, 2)
    return ["'stray.weight'", "not one of the network's"]


FAULTS = [_ints, _int8, _shape, _nan, _inf, _missing, _extra]


def _corrupt(model_dir, tmp_path, net, fault):
    bad = str(tmp_path / "bad")
    shutil.copytree(model_dir, bad)
    path = os.path.join(bad, net, WEIGHTS_NAME)
    state = load_file(path)
    words = fault(state, _first_weight(state))
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return bad, [f"{net}/{WEIGHTS_NAME}"] + words


@pytest.mark.parametrize("net", ["autoencoder", "motion_dit", "content_unet"])
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_a_model_folder_with_bad_tensors_is_refused_before_any_network_loads(model_dir, tmp_path, monkeypatch,
                                                                             net, fault):
    import diffusers

    from engine.models import CMDModel

    bad, words = _corrupt(model_dir, tmp_path, net, fault)

    def refuse(*args, **kwargs):
        raise AssertionError("a network was loaded")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    with pytest.raises(ValueError) as info:
        CMDModel.from_pretrained(bad)
    message = str(info.value)
    assert "\n" not in message and repr(bad) in message and all(w in message for w in words), (words, message)


def test_a_good_folder_loads_and_half_precision_weights_are_weights(model_dir, tmp_path):
    """float16 weights (a smaller copy of a model) are floating point: they load; the check is not a dtype
    equality."""
    from engine.models import CMDModel

    half = str(tmp_path / "half")
    shutil.copytree(model_dir, half)
    path = os.path.join(half, "autoencoder", WEIGHTS_NAME)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}, path)
    model = CMDModel.from_pretrained(half)
    assert all(torch.isfinite(p).all() for p in model.autoencoder.parameters())


@pytest.mark.parametrize("argv", [
    ["engine.run", "--prompt", "x", "--out", "{tmp}/v.npy"],
    ["export", "onnx", "--out", "{tmp}/graphs"],
], ids=["engine.run", "export"])
def test_clis_refuse_in_one_line_with_exit_2(model_dir, tmp_path, capsys, argv):
    import importlib

    bad, words = _corrupt(model_dir, tmp_path, "autoencoder", _ints)
    module, rest = argv[0], [a.format(tmp=tmp_path) for a in argv[1:]]
    main = importlib.import_module("engine.run" if module == "engine.run" else "export.__main__").main
    before = sorted(os.listdir(tmp_path))
    code = main(rest + ["--model", bad])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert all(w in err for w in words), err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_stable_diffusion_vae_with_nan_weights_is_refused(tmp_path):
    from diffusers import AutoencoderKL

    from engine.models.vae import load_vae

    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, layers_per_block=1, latent_channels=4)
    vae.save_pretrained(str(tmp_path / "sd" / "vae"))
    path = tmp_path / "sd" / "vae" / WEIGHTS_NAME
    state = load_file(str(path))
    words = _nan(state, _first_weight(state))
    save_file(state, str(path))
    with pytest.raises(ValueError) as info:
        load_vae(str(tmp_path / "sd"))
    assert all(w in str(info.value) for w in words) and "\n" not in str(info.value), str(info.value)
