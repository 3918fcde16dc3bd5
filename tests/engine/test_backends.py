"""Backends: the registry, compile vs eager on CPU, and (marked gpu) CUDA graphs vs eager, their
cache, their batch buckets and a denoising loop that never syncs with the host."""

import math
import os

import numpy as np
import pytest
import torch

import engine.backends
from engine.backends import Backend, available_backends, get_backend, register_backend
from engine.backends.eager import EagerBackend
from engine.pipeline import CMDPipeline

TINY = "random:" + os.path.join(os.path.dirname(__file__), "tiny_config.json")



def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def test_registry_names_loads_and_refuses(monkeypatch):
    assert {"eager", "compile", "cudagraph", "onnxruntime", "tensorrt"} <= set(available_backends())
    assert get_backend("eager") is EagerBackend
    assert get_backend("compile").__name__ == "CompiledBackend"
    with pytest.raises(ValueError, match="unknown backend 'warp'; choose from .*eager"):
        get_backend("warp")
    monkeypatch.setitem(engine.backends.MODULES, "ghost", "engine.backends.ghost")
    with pytest.raises(ValueError, match="backend 'ghost' is not available"):
        get_backend("ghost")
    try:
        @register_backend("double-eager")
        class DoubleEager(EagerBackend):
            pass

        assert get_backend("double-eager") is DoubleEager and DoubleEager.name == "double-eager"
    finally:
        engine.backends._REGISTRY.pop("double-eager", None)


def test_cudagraph_refuses_a_cpu_device(fast_cpu):
    from engine.backends.cudagraph import CUDAGraphBackend

    model = CMDPipeline.from_pretrained(TINY).model
    with pytest.raises(ValueError, match="needs a CUDA device, got 'cpu'"):
        CUDAGraphBackend(model, torch.device("cpu"))


class _Counting(Backend):
    """A custom backend instance handed to the pipeline: the interface is the three calls."""

    def __init__(self, model):
        super().__init__(model)
        self.inner = EagerBackend(model)
        self.calls = {"unet": 0, "dit": 0, "decode": 0}

    def unet_step(self, sample, timestep, states):
        self.calls["unet"] += 1
        return self.inner.unet_step(sample, timestep, states)

    def dit_step(self, motion, timestep, content, text):
        self.calls["dit"] += 1
        return self.inner.dit_step(motion, timestep, content, text)

    def decode(self, content, motion):
        self.calls["decode"] += 1
        return self.inner.decode(content, motion)


def test_pipeline_takes_a_backend_instance(fast_cpu):
    pipe = CMDPipeline.from_pretrained(TINY)
    counting = _Counting(pipe.model)
    pipe.set_backend(counting)
    pipe("a circle", generator=0, num_inference_steps=3, motion_steps=2, progress=False)
    assert counting.calls == {"unet": 3, "dit": 2, "decode": 1}


def _micro_pipeline() -> CMDPipeline:
    """The tiny config cut further (one UNet level, no mid block, one DiT block): inductor's C++ build
    of every kernel dominates this test's cost on a cold cache, and it scales with the graphs."""
    from engine.configs import load_config
    from engine.models import CMDModel
    from engine.random_text import RandomTextEncoder

    cfg = load_config(TINY[len("random:"):])
    cfg.content_unet.update(down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
                            block_out_channels=[16], mid_block_type=None)
    cfg.motion_dit.depth = 1
    torch.manual_seed(0)
    return CMDPipeline(CMDModel.from_config(cfg), RandomTextEncoder(cfg.text_encoder.hidden_size,
                                                                    cfg.text_encoder.max_length))


def test_compile_matches_eager_on_cpu(fast_cpu):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = _micro_pipeline()
    call = dict(prompt=["a red circle", "a blue square"], generator=3, num_inference_steps=2, motion_steps=2,
                progress=False)
    ref = pipe(**call)
    pipe.set_backend("compile")
    out = pipe(**call)
    again = pipe(**call)
    assert counters["stats"]["unique_graphs"] == 2  # the UNet and the DiT, each one graph, compiled once
    assert psnr(out.frames, ref.frames) >= 40, psnr(out.frames, ref.frames)
    np.testing.assert_array_equal(again.frames, out.frames)


# --------------------------------------------------------------------------------------------- GPU
def _gpu_pipe(dtype="float32", **options):
    return CMDPipeline.from_pretrained(TINY, device="cuda", dtype=dtype, backend="cudagraph", backend_options=options)


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_cudagraph_matches_eager(scheduler):
    pipe = _gpu_pipe()
    # Few steps: an untrained model's sampling trajectories are chaotic, so long runs amplify float noise.
    call = dict(prompt=["a red circle", "a blue square"], negative_prompt="blurry", generator=1, scheduler=scheduler,
                num_inference_steps=4, motion_steps=4, motion_variations=2, progress=False)
    graphed = pipe(**call)
    pipe.set_backend("eager")
    eager = pipe(**call)
    assert graphed.frames.shape == eager.frames.shape == (4, 4, 16, 16, 3)
    assert psnr(graphed.frames, eager.frames) >= 40, psnr(graphed.frames, eager.frames)
    torch.testing.assert_close(graphed.content, eager.content, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_cudagraph_bfloat16_close_to_eager():
    pipe = _gpu_pipe("bfloat16")
    call = dict(prompt="a red circle", generator=2, num_inference_steps=3, motion_steps=3, progress=False)
    graphed = pipe(**call)
    pipe.set_backend("eager")
    assert psnr(graphed.frames, pipe(**call).frames) >= 30


@pytest.mark.gpu
def test_cudagraph_graphs_are_cached_per_shape_bucket():
    pipe = _gpu_pipe()
    backend = pipe.backend
    call = dict(generator=0, num_inference_steps=3, motion_steps=3, progress=True)
    first = pipe("a circle", **call)
    assert backend.captures == 2 and backend.num_graphs == 2  # the UNet step and the DiT step
    second = pipe("a circle", **call)
    assert backend.captures == 2  # replayed, not captured again
    np.testing.assert_array_equal(first.frames, second.frames)  # same seed, same video
    pipe(["a circle", "a square"], **call)
    assert backend.captures == 4  # a new batch size is a new bucket
    pipe("a circle", scheduler="dpm", num_frames=2, generator=0, num_inference_steps=3, motion_steps=3, progress=False)
    assert backend.captures == 5  # fewer frames: a new DiT shape; the UNet graph is reused


def test_cudagraph_batch_buckets_default_to_powers_of_two():
    """Fewer captures by default: batches 3-4 share a graph, 5-8 another; a guidance interval's B and 2B at
    B = 1 stay unpadded (1 and 2). Checked without a GPU (the bucket rule is plain arithmetic)."""
    from types import SimpleNamespace

    from engine.backends.cudagraph import CUDAGraphBackend

    def buckets(mode, sizes):
        backend = SimpleNamespace(batch_buckets=CUDAGraphBackend._check_buckets(mode))
        return [CUDAGraphBackend._bucket(backend, n) for n in sizes]

    import inspect
    assert inspect.signature(CUDAGraphBackend).parameters["batch_buckets"].default == "pow2"
    assert buckets("pow2", [1, 2, 3, 4, 5, 8, 9]) == [1, 2, 4, 4, 8, 8, 16]
    assert buckets("exact", [1, 3, 5]) == [1, 3, 5]
    assert buckets((8, 2), [1, 3, 8, 9]) == [2, 8, 8, 9]
    for bad in ("powers", (), (0, 2), (2.5,), (True,)):
        with pytest.raises(ValueError, match="batch_buckets"):
            CUDAGraphBackend._check_buckets(bad)


@pytest.mark.gpu
def test_cudagraph_batch_buckets_pad_and_match():
    pipe = _gpu_pipe(batch_buckets=(8,))
    call = dict(generator=4, num_inference_steps=3, motion_steps=3, progress=False)
    padded = pipe("a circle", **call)
    pipe(["a", "b", "c"], **call)
    assert pipe.backend.captures == 2  # batch 2 and 6 (CFG) share the bucket of 8
    pipe.set_backend("cudagraph", batch_buckets="exact")
    exact = pipe("a circle", **call)
    assert psnr(padded.frames, exact.frames) >= 60


@pytest.mark.gpu
def test_cudagraph_denoising_loops_never_sync_with_the_host():
    pipe = _gpu_pipe()
    states, pooled, negative = pipe.encode_prompt(["a red circle"], [""])
    gen = torch.Generator(device="cuda").manual_seed(0)
    content_noise = torch.randn(1, 3, 16, 16, device="cuda", generator=gen)
    motion_noise = torch.randn(1, *pipe.config.motion_shape(), device="cuda", generator=gen)

    def loops():
        content = pipe.generate_content(states, negative, content_noise, 5, 3.0, "dpm")
        return pipe.generate_motion(content, pooled, motion_noise, 5, 2.0, "ddim")

    expected = loops()  # captures the graphs and builds the scheduler tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is live: a sync would raise
            torch.ones(1, device="cuda").item()
        motion = loops()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(motion, expected)


def test_the_base_backend_runs_every_network_eagerly(fast_cpu):
    """The contract's defaults are the eager networks: a bare Backend gives eager's video bit for bit and
    leaves the text encoder to the pipeline."""
    pipe = CMDPipeline.from_pretrained(TINY)
    call = dict(prompt="a red circle", negative_prompt="blurry", generator=4, num_inference_steps=2, motion_steps=2,
                progress=False)
    reference = pipe(**call)
    pipe.set_backend(Backend(pipe.model))
    assert pipe.backend.text_encoder() is None and pipe.backend_text_encoder is None
    out = pipe(**call)
    np.testing.assert_array_equal(out.frames, reference.frames)


def test_a_backend_text_encoder_replaces_the_pipelines(fast_cpu):
    """``backend.text_encoder()`` is part of the contract: the pipeline encodes prompts with it and lists
    its calls for the request check."""
    from engine.pipeline import check_request
    from engine.random_text import RandomTextEncoder

    pipe = CMDPipeline.from_pretrained(TINY)
    text = pipe.model.config.text_encoder
    other = RandomTextEncoder(text.hidden_size, text.max_length, num_layers=1, seed=torch.randint(1, 1000, ()).item())

    class WithText(EagerBackend):
        def text_encoder(self):
            return other

    assert not any(c.network == "text_encoder" for c in pipe.network_calls(check_request(pipe.config), 2))
    pipe.set_backend(WithText(pipe.model))
    assert pipe.backend_text_encoder is other
    prompts = ["a red circle", "a blue square"]
    states, pooled, negative = pipe.encode_prompt(prompts, ["", ""])
    want_states, want_pooled = other(prompts + ["", ""])
    torch.testing.assert_close(states, want_states[:2])
    torch.testing.assert_close(pooled, want_pooled[:2])
    torch.testing.assert_close(negative, want_states[2:])
    calls = pipe.network_calls(check_request(pipe.config), 2)
    assert [(c.network, c.batch) for c in calls if c.network == "text_encoder"] == [("text_encoder", 4)]
