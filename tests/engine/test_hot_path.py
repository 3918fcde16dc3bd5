"""Hot-path costs: the sin-cos tables are built once per shape (not in fp64 at every DiT step) and the
weights hash of unchanged weights is computed once (a graph backend checks it each time it opens)."""

import torch

from engine.artefacts import forget_weights_hash, weights_hash
from engine.models import layers


def test_sincos_tables_are_built_once_per_shape(monkeypatch):
    built = []
    real = layers._sincos_1d
    monkeypatch.setattr(layers, "_sincos_1d", lambda *a: built.append(a) or real(*a))
    layers._SINCOS_CACHE.clear()
    first = layers.sincos_2d(4, 6, 16)
    again = layers.sincos_2d(4, 6, 16)
    assert again is first and len(built) == 2  # rows and columns, once
    other = layers.sincos_2d(4, 6, 16, dtype=torch.float64)
    assert other.dtype == torch.float64 and len(built) == 4
    # the values are the fp64 formula's, whatever the cache
    pos = torch.arange(4, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    torch.testing.assert_close(first[:, 0, :8], torch.cat([pos.sin(), pos.cos()], 1).float())


def test_sincos_not_cached_while_tracing(monkeypatch):
    layers._SINCOS_CACHE.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layers.sincos_1d(5, 8)
    assert not layers._SINCOS_CACHE


def test_weights_hash_remembered_until_the_weights_change(monkeypatch):
    net = torch.nn.Linear(4, 3)
    calls = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    first = weights_hash(net)
    copies = len(calls)
    assert copies == 2 and weights_hash(net) == first and len(calls) == copies  # remembered: no copy
    assert weights_hash(net, torch.float16) != first  # per dtype
    with torch.no_grad():
        net.weight.add_(1)  # an in-place change bumps the version counter
    changed = weights_hash(net)
    assert changed != first and weights_hash(torch.nn.Linear(4, 3)) not in (first, changed)
    net.weight.data.sub_(1)  # through .data: not seen until forgotten
    assert weights_hash(net) == changed
    forget_weights_hash(net)
    import copy
    assert weights_hash(net) == weights_hash(copy.deepcopy(net)) != changed
