"""NVTX ranges: the nvtx package where installed, torch.cuda.nvtx on a CUDA torch without it (the GPU
image), the torch.profiler range always."""

import pytest
import torch

from engine import profiling


def _profiled_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_without_the_package_on_a_cpu_torch_only_the_profiler_range(monkeypatch):
    monkeypatch.setattr(profiling, "_nvtx", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert profiling.nvtx_backend() is None

    def body():
        with profiling.nvtx_range("content step 0"):
            torch.ones(2) + 1

    assert "content step 0" in _profiled_names(body)


def test_falls_back_to_torch_cuda_nvtx_without_the_package(monkeypatch):
    """The GPU image has no nvtx package: ranges go through torch.cuda.nvtx, balanced even on an error."""
    calls = []
    monkeypatch.setattr(profiling, "_nvtx", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    assert profiling.nvtx_backend() == "torch.cuda.nvtx"
    with profiling.nvtx_range("motion step 3"):
        pass
    with pytest.raises(RuntimeError):
        with profiling.nvtx_range("decode"):
            raise RuntimeError("boom")
    assert calls == [("push", "motion step 3"), ("pop",), ("push", "decode"), ("pop",)]


def test_the_package_comes_first(monkeypatch):
    pytest.importorskip("nvtx")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert profiling.nvtx_backend() == "nvtx"


@pytest.mark.gpu
def test_ranges_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert profiling.nvtx_backend() in ("nvtx", "torch.cuda.nvtx")
    with profiling.nvtx_range("content step 0"):
        torch.ones(2, device="cuda").add_(1)
    torch.cuda.synchronize()
