"""Checkpoint files: exact round trip of weights, EMA, optimizer and RNG state; last-K pruning; atomicity."""

import json
import os

import pytest
import torch
import torch.nn as nn

from trainer import checkpoint as ckpt
from trainer.ema import EMA


def make(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.5, 0.9), weight_decay=0.01)
    return net, opt


def step(net, opt, ema, x):
    loss = net(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    ema.update(net)
    return loss.item()


def save(root, s, net, opt, ema, gen, keep=3):
    return ckpt.save_checkpoint(root, s, net.state_dict(), ema.state_dict(), opt,
                                {"generator.0": gen.get_state()}, {"ema_updates": ema.num_updates}, keep=keep)


def test_round_trip_continues_identically(tmp_path):
    x = torch.randn(11, 5)
    net, opt = make()
    ema = EMA(net, 0.9)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        step(net, opt, ema, x + torch.randn(x.shape, generator=gen))
    path = save(str(tmp_path), 3, net, opt, ema, gen)
    expected = [step(net, opt, ema, x + torch.randn(x.shape, generator=gen)) for _ in range(3)]

    net2, opt2 = make(seed=1)  # different initial weights: everything must come from the files
    ema2 = EMA(net2, 0.9)
    state = ckpt.load_checkpoint(path, opt2)
    net2.load_state_dict(state["model"])
    ema2.load_state_dict(state["ema"], state["state"]["ema_updates"])
    gen2 = torch.Generator()
    gen2.set_state(state["rng"]["generator.0"])
    assert opt2.param_groups[0]["betas"] == (0.5, 0.9)
    got = [step(net2, opt2, ema2, x + torch.randn(x.shape, generator=gen2)) for _ in range(3)]
    assert got == expected
    for a, b in zip(ema.model.parameters(), ema2.model.parameters()):
        assert torch.equal(a, b)


def test_keeps_the_last_k_and_ignores_partial_folders(tmp_path):
    net, opt = make()
    ema = EMA(net)
    gen = torch.Generator()
    root = str(tmp_path)
    os.makedirs(os.path.join(root, ".tmp-step-00000099-x"))  # a crashed save
    os.makedirs(os.path.join(root, "step-00000098"))  # no state.json: not complete
    for s in (1, 2, 3, 4, 5):
        save(root, s, net, opt, ema, gen, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4, 5]
    assert ckpt.latest_checkpoint(root).endswith("step-00000005")
    with open(os.path.join(ckpt.latest_checkpoint(root), "state.json")) as f:
        assert json.load(f)["step"] == 5


def test_no_pickle_anywhere(tmp_path):
    net, opt = make()
    ema = EMA(net)
    step(net, opt, ema, torch.randn(4, 5))
    path = save(str(tmp_path), 1, net, opt, ema, torch.Generator())
    assert sorted(os.listdir(path)) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                        "rng.safetensors", "state.json"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    net, opt = make()
    ema = EMA(net)
    save(str(tmp_path), 1, net, opt, ema, torch.Generator())

    def boom(tensors, path):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_save_tensors", boom)
    with pytest.raises(OSError):
        save(str(tmp_path), 2, net, opt, ema, torch.Generator())
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)))["state"]["step"] == 1


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="state.json"):
        ckpt.load_checkpoint(str(tmp_path))


def _draws():
    """One draw from each global generator (CUDA's where present), cached Gaussians included (numpy's
    legacy and Python's gauss keep a second value for the next call)."""
    import random

    import numpy as np

    cuda = torch.rand(3, device="cuda").tolist() if torch.cuda.is_available() else None
    return (torch.rand(3).tolist(), cuda, np.random.standard_normal(), np.random.random(), random.gauss(0, 1),
            random.random(), random.getrandbits(64))


def test_global_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    net, opt = make()
    ema = EMA(net, 0.9)
    seed = int(np.random.default_rng().integers(1 << 30))
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)  # (torch.manual_seed seeds CUDA too)
    np.random.standard_normal(), random.gauss(0, 1)  # leave a cached Gaussian in both
    states = ckpt.global_rng_states()
    path = ckpt.save_checkpoint(str(tmp_path), 1, net.state_dict(), ema.state_dict(), opt, states, {})
    expected = _draws()
    torch.manual_seed(seed + 1), np.random.seed(seed + 1), random.seed(seed + 1)
    assert _draws() != expected
    ckpt.set_global_rng_states(ckpt.load_checkpoint(path)["rng"])
    assert _draws() == expected


def test_preserved_rng_leaves_the_global_states_untouched():
    torch.manual_seed(int(torch.randint(0, 1 << 30, ())))
    before = ckpt.global_rng_states()
    expected = _draws()
    ckpt.set_global_rng_states(before)
    with ckpt.preserved_rng():
        _draws(), _draws()
    assert _draws() == expected
