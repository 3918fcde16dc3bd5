"""A training checkpoint whose model or EMA weights are not weights (integer, misshapen, NaN) is refused by
--resume with one line naming the file and the tensor, before any step (issue 25.6: the rule of
engine.model_folder.check_tensors, shared with model folders)."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer import checkpoint as ckpt
from trainer.train import main
from test_train_resume import argv  # noqa: E402  (tests/trainer is on sys.path under pytest)
from test_train_stages import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckw")
    config = tiny_config(root / "tiny.json")
    assert main(argv("autoencoder", root / "run", config, 1, 1)) == 0
    return config, root / "run"


@pytest.mark.parametrize("file, fault", [("model", "int"), ("ema", "nan"), ("model", "shape")])
def test_resume_refuses_a_checkpoint_with_bad_weights(run, file, fault, capsys):
    config, out = run
    folder = ckpt.latest_checkpoint(str(out / "checkpoints" / "autoencoder"))
    path = os.path.join(folder, f"{file}.safetensors")
    good = load_file(path)
    state = dict(good)
    name = next(k for k, v in state.items() if v.dim() == 2)
    if fault == "int":
        state[name] = state[name].to(torch.int32)
        words = [repr(name), "int32"]
    elif fault == "nan":
        state[name] = torch.full_like(state[name], float("nan"))
        words = [repr(name), f"{state[name].numel()} NaN/inf"]
    else:
        state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] + 2)
        words = [repr(name), str(tuple(state[name].shape)), str(tuple(good[name].shape))]
    save_file(state, path)
    try:
        capsys.readouterr()
        code = main(argv("autoencoder", out, config, 3, 1, "--resume"))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert err[-1].startswith("error: ") and f"{file}.safetensors" in err[-1], err
        assert all(w in err[-1] for w in words), err
        assert ckpt.latest_checkpoint(str(out / "checkpoints" / "autoencoder")) == folder  # no step was taken
    finally:
        save_file(good, path)
