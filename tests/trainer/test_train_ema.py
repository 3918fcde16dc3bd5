"""The EMA of the trainer: warm-up, decay, and a copy independent of the trained network."""

import pytest
import torch
import torch.nn as nn

from trainer.ema import EMA


def test_ema_tracks_the_average():
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.5, warmup=False)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.model.weight, start + 0.5)
    assert not ema.model.weight.requires_grad
    with torch.no_grad():
        net.weight.add_(1.0)  # the EMA is a copy: it does not move with the network
    assert torch.allclose(ema.model.weight, start + 0.5)


def test_warmup_decay():
    ema = EMA(nn.Linear(2, 2), decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update mostly copies
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999


def test_bad_decay():
    with pytest.raises(ValueError, match="1.5"):
        EMA(nn.Linear(2, 2), decay=1.5)
