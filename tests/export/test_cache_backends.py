"""Step caching on the exported graphs: the static schedule and the guidance interval on onnxruntime
(CPU) and TensorRT (marked), which run them by not calling a network and by calling it on a batch of B
instead of 2B (the graphs' batch axis is dynamic from 1); the dynamic mode is refused there."""

import numpy as np
import pytest
import torch

from engine.cache import guidance_steps
from engine.pipeline import CMDPipeline
from cmd_kernels import force_impl

INTERVAL = (0.2, 0.8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _schedule(model, steps: int):
    """A static schedule for ``steps`` DDIM steps: the model's calibrated one when it has it, else one."""
    data = model.config.sampling.get("cache") or {}
    key = f"ddim/{steps}"
    if key in data.get("schedules", {}).get("content", {}):
        return None, data["schedules"]["content"][key], data["schedules"]["motion"][key]
    content, motion = "FRFRRF" + "F" * (steps - 6), "FFRRRF" + "F" * (steps - 6)
    return {"reuse": "extrapolate", "schedules": {"content": {key: content}, "motion": {key: motion}}}, content, motion


def test_graphs_have_a_dynamic_batch_axis_from_one(default_export):
    import onnx

    onnx_dir, manifest = default_export
    for name in ("content_unet", "motion_dit"):
        model = onnx.load(f"{onnx_dir}/{manifest['networks'][name]['file']}", load_external_data=False)
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", (name, value.name)
        assert manifest["networks"][name]["batch_range"][0] == 1


def test_static_schedule_and_guidance_interval_on_onnxruntime(default_model, default_export, monkeypatch):
    model, text_encoder, _ = default_model
    steps = int(model.config.sampling.get("steps", 25))
    data, content, motion = _schedule(model, steps)
    if data is not None:
        monkeypatch.setitem(model.config.sampling, "cache", data)
    call = dict(prompt="a red circle moving right", num_inference_steps=steps,
                motion_steps=steps, generator=0, progress=False, cache="static", guidance_interval=INTERVAL)
    eager = CMDPipeline(model, text_encoder, backend="eager")
    with force_impl("reference"):  # eager as it runs on a CPU
        reference = eager(**call)
    ort = CMDPipeline(model, text_encoder, backend="onnxruntime", backend_options={"onnx_dir": default_export[0]})
    batches = {"unet_step": [], "dit_step": []}
    for method, calls in batches.items():  # what the pipeline sends to the sessions
        real = getattr(ort.backend, method)
        monkeypatch.setattr(ort.backend, method, lambda *t, _real=real, _calls=calls: (_calls.append(t[0].shape[0]),
                                                                                       _real(*t))[1])
    out = ort(**call)
    cfg = guidance_steps(INTERVAL, steps)
    for name, schedule in (("unet_step", content), ("dit_step", motion)):
        assert batches[name] == [2 if cfg[i] else 1 for i, f in enumerate(schedule) if f == "F"], name
    assert out.evaluations == reference.evaluations
    assert psnr(out.frames, reference.frames) >= 35.0, psnr(out.frames, reference.frames)
    with pytest.raises(ValueError, match="backend 'onnxruntime' supports cache='static'"):
        ort(**dict(call, cache="dynamic"))


@pytest.mark.tensorrt
def test_static_schedule_and_guidance_interval_on_tensorrt(tiny_latent, tiny_latent_export, tmp_path):
    """The tiny latent model's plans: a static schedule with a guidance interval calls each engine only on
    the full steps, with a batch of one where CFG is off, and matches eager."""
    if not torch.cuda.is_available():
        pytest.skip("tensorrt imports here, but there is no CUDA device to build plans on")
    from export.tensorrt_build import build_plans

    model, text_encoder = tiny_latent
    out_dir = str(tmp_path / "plans")
    build_plans(tiny_latent_export[0], out_dir, precision="fp32", workspace_gb=1.0)
    steps = 6
    data, content, _ = _schedule(model, steps)
    model.config.sampling["cache"] = data
    try:
        cuda_model = model.to("cuda")
        call = dict(prompt="a red circle", num_inference_steps=steps, motion_steps=steps, generator=0, progress=False,
                    cache="static", guidance_interval=INTERVAL)
        pipe = CMDPipeline(cuda_model, text_encoder.to("cuda"), backend="tensorrt",
                           backend_options={"plan_dir": out_dir})
        batches = []
        real = pipe.backend.unet_step
        pipe.backend.unet_step = lambda *t: (batches.append(t[0].shape[0]), real(*t))[1]
        trt = pipe(**call)
        cfg = guidance_steps(INTERVAL, steps)
        assert batches == [2 if cfg[i] else 1 for i, f in enumerate(content) if f == "F"]
        pipe.set_backend("eager")
        eager = pipe(**call)
        assert psnr(trt.frames, eager.frames) >= 35.0
    finally:
        model.to("cpu")
        text_encoder.to("cpu")
        model.config.sampling.pop("cache", None)
