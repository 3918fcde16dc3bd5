"""Run by tests/cmd_kernels/test_aot.py in a process of its own (kernels compiled, not interpreted): does a
GPU process find its kernels in a cache filled by ``python -m cmd_kernels.aot --fill-cache``?

The engine's own networks (autoencoder encode + decode, motion DiT, forward and backward, config
``default``, bf16) run on CPU tensors with every op forced onto its Triton launcher, under a stand-in
CUDA driver that reports an H100/H200 (sm_90, 132 SMs). So each kernel goes through the real launch
path: the launcher, ``TunedKernel`` (``CMD_AUTOTUNE=off``), the heuristics, the JIT's binder and cache
key, and ``triton.compile``, which looks the kernel up in ``TRITON_CACHE_DIR``. The launch itself, which
needs a GPU, is stopped where the compiled kernel would be loaded onto the device.

Prints one JSON line: every compile the JIT asked for (kernel name, cache hit or not, hash).
"""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET unset"
os.environ["CMD_AUTOTUNE"] = "off"

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from engine.configs import load_config  # noqa: E402
from engine.models.bundle import build_autoencoder, build_motion_dit  # noqa: E402
from cmd_kernels import _triton  # noqa: E402

H100 = _triton.KNOWN_TARGETS[90]


class NotOnThisMachine(Exception):
    """Raised where a launch would touch the GPU: after the compile (or cache look-up) we test."""


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": H100.max_shared_mem, "multiprocessor_count": H100.num_sms, "max_num_regs": 65536,
                "warpSize": 32}

    def load_binary(self, *args, **kwargs):
        raise NotOnThisMachine()


class StandInDriver:
    utils = _Utils()

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", H100.arch, 32)

    @property
    def launcher_cls(self):
        raise NotOnThisMachine()


def main() -> None:
    compiles = []
    knobs.compilation.listener = lambda src, metadata, metadata_group, times, cache_hit: compiles.append(
        {"kernel": metadata["name"], "hash": metadata["hash"], "cache_hit": cache_hit})
    driver.set_active(StandInDriver())

    # Every op on its Triton launcher, whatever the tensors' device; the launch stops before the GPU.
    from cmd_kernels import _dispatch
    from cmd_kernels.ops import modulated_layernorm
    _dispatch.launchable = lambda *tensors: True  # the one device rule of every op's dispatch
    real_chunks = modulated_layernorm._bwd_chunks  # the backward fills the target's SMs, as on the GPU
    modulated_layernorm._bwd_chunks = lambda B, N, block_r, device, num_sms=None: real_chunks(B, N, block_r, device,
                                                                                            H100.num_sms)
    real_run = _triton.Launch.run
    tuned = {}  # the first launch of each autotuned kernel

    def compile_only(self):
        if isinstance(self.kernel, _triton.TunedKernel):
            tuned.setdefault(self.kernel.name, self)
        try:
            return real_run(self)
        except NotOnThisMachine:
            return None

    _triton.Launch.run = compile_only

    config = load_config("default")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    ae = build_autoencoder(config).to(dtype)
    dit = build_motion_dit(config).to(dtype)
    video = torch.rand(1, config.num_frames, config.channels, config.height, config.width, dtype=dtype) * 2 - 1
    video.requires_grad_()
    content, motion = ae.encode(video)
    out = ae.decode(content, motion)
    out.float().sum().backward()  # decoder fusion and content frame backward
    z = torch.randn(2, *motion.shape[1:], dtype=dtype)
    c = torch.randn(2, *content.shape[1:], dtype=dtype)
    text = torch.randn(2, dit.config.text_dim, dtype=dtype)
    t = torch.tensor([10, 500])
    dit(z, t, c, text).float().sum().backward()  # attention, modulated LayerNorm forward and backward
    # CMD_AUTOTUNE=full: the autotuner's own pruning step returns the kernel's candidates for the target.
    os.environ["CMD_AUTOTUNE"] = "full"
    pruning = {}
    for name, launch in tuned.items():
        tuner = launch.kernel.autotuner
        tuner.nargs = dict(zip(tuner.arg_names, launch.args))
        got = [_triton.config_key(c) for c in tuner.prune_configs(dict(launch.kwargs))]
        named = dict(tuner.nargs, **launch.kwargs)
        want = [_triton.config_key(c) for c in launch.kernel.candidates(named, "full", H100)]
        pruning[name] = {"pruned": len(got), "same_as_candidates": got == want}
    print(json.dumps({"compiles": compiles, "pruning": pruning}))


if __name__ == "__main__":
    sys.exit(main())
