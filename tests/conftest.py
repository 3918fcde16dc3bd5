"""Test setup: offline hub, the Triton interpreter on machines without CUDA (on a GPU: CMD_AUTOTUNE=off),
and the gpu/tensorrt markers.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it at decoration)."""

import importlib.util
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GPU tests launch each kernel at one known-good config instead of autotuning every new test shape.
os.environ.setdefault("CMD_AUTOTUNE", "off")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none here")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (pip install tensorrt on a CUDA machine); not importable here")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not HAS_TENSORRT:
            item.add_marker(skip_trt)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


class LogRecords(logging.Handler):
    """In a ``with`` block: the message of every record the named loggers let through (what their own
    handlers would print), in ``messages``."""

    def __init__(self, *names: str):
        super().__init__(logging.DEBUG)
        self.names = names
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        for name in self.names:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.names:
            logging.getLogger(name).removeHandler(self)


@pytest.fixture
def log_records():
    """``log_records(*logger_names)``: a :class:`LogRecords` context manager."""
    return LogRecords
