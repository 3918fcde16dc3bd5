"""Fixtures shared by the engine tests."""

import pytest
import torch


@pytest.fixture
def fast_cpu():
    """Tiny models on the CPU: the kernels' references (the kernels have their own tests; the Triton
    interpreter costs ~0.1 s per DiT step) and one thread (a second one only adds sync overhead here)."""
    import cmd_kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cmd_kernels.force_impl("reference"):
            yield
    finally:
        torch.set_num_threads(threads)
