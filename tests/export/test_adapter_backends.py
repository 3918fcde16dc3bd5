"""Adapters on the exported-graph backends: onnxruntime switches adapters with overriding initializers (no
re-export) and gives eager's outputs with the same adapter; TensorRT refits its plans (``tensorrt``-marked)."""

import copy
import time

import pytest
import torch

from cmd_kernels import force_impl
from engine.adapters import NetworkLora, network_hash, save_adapter
from engine.backends.eager import EagerBackend
from engine.pipeline import CMDPipeline


def random_lora(net, network, modules, rank=2, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    found = dict(net.named_modules())
    layers = {}
    for name in modules:
        out_f, in_f = found[name].weight.shape
        layers[name] = (torch.randn(rank, in_f, generator=g) * scale, torch.randn(out_f, rank, generator=g) * scale)
    return NetworkLora(network, rank, float(rank), list(modules), network_hash(net), layers)


def first_linears(net, n=3, prefix=""):
    return [name for name, m in net.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith(prefix)][:n]


def adapter_for(model, path):
    parts = [random_lora(model.content_unet, "content_unet", first_linears(model.content_unet)),
             random_lora(model.motion_dit, "motion_dit", first_linears(model.motion_dit, prefix="blocks")),
             random_lora(model.autoencoder, "autoencoder", ["output_head", "content_embed"])]
    save_adapter(path, parts)
    return path


def calls(backend, model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    content = torch.randn(2, 4, 16, 16, generator=gen)
    motion = torch.rand(2, *model.config.motion_shape(4), generator=gen) * 2 - 1
    t = torch.tensor([999, 500])
    text, states = torch.randn(2, 32, generator=gen), torch.randn(2, 8, 32, generator=gen)
    with torch.no_grad(), force_impl("reference"):
        return [backend.dit_step(motion, t, content, text), backend.decode(content, motion),
                backend.unet_step(content, t, states)]


def test_onnxruntime_switches_adapters_without_export(tiny_latent, tiny_latent_export, tmp_path):
    model, text_encoder = copy.deepcopy(tiny_latent[0]), tiny_latent[1]
    path = adapter_for(model, str(tmp_path / "a.safetensors"))
    pipe = CMDPipeline(model, text_encoder, backend="onnxruntime", backend_options={"onnx_dir": tiny_latent_export[0]})
    base = calls(pipe.backend, model)
    t0 = time.perf_counter()
    pipe.load_lora_weights(path)
    adapted = calls(pipe.backend, model)  # the sessions re-open with the overriding initializers
    switch = time.perf_counter() - t0
    reference = calls(EagerBackend(model), model)  # eager with the adapter: the model's weights now
    for got, ref, before in zip(adapted, reference, base):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got, before, atol=1e-3)
    pipe.set_adapters("a", 0.0)
    assert all(torch.equal(a, b) for a, b in zip(calls(pipe.backend, model), base))
    pipe.set_adapters("a", 1.0)
    # A backend made while an adapter is loaded checks the base weights' hash and gets the adapted ones.
    pipe.set_backend("onnxruntime", onnx_dir=tiny_latent_export[0])
    for got, ref in zip(calls(pipe.backend, model), reference):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    pipe.unload_lora_weights()
    assert all(torch.equal(a, b) for a, b in zip(calls(pipe.backend, model), base))
    print(f"onnxruntime adapter switch (3 sessions re-opened, first calls included): {switch:.3f} s")


@pytest.mark.tensorrt
def test_tensorrt_refits_instead_of_rebuilding(tiny_latent, tiny_latent_export, tmp_path):
    """Refittable plans (``build_plans(..., refit=True)``): an adapter switch refits the engines in place; the
    outputs follow eager's with the adapter."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from export.tensorrt_build import build_plans

    model, text_encoder = copy.deepcopy(tiny_latent[0]).cuda(), tiny_latent[1]
    plans = str(tmp_path / "plans")
    build_plans(tiny_latent_export[0], plans, precision="fp32", refit=True)
    path = adapter_for(model, str(tmp_path / "a.safetensors"))
    pipe = CMDPipeline(model, text_encoder.cuda(), backend="tensorrt", backend_options={"plan_dir": plans})
    base = [x.cpu() for x in calls(pipe.backend, model)]
    # TensorRT 11.3's release notes (known issues): a REFIT plan may drop a GEMM bias even before any refit.
    for a, b in zip(base, [x.cpu() for x in calls(EagerBackend(model), model)]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    pipe.load_lora_weights(path)
    assert pipe.backend.refits > 0
    got = [x.cpu() for x in calls(pipe.backend, model)]
    ref = [x.cpu() for x in calls(EagerBackend(model), model)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    pipe.unload_lora_weights()
    for a, b in zip([x.cpu() for x in calls(pipe.backend, model)], base):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
