"""TensorRT: everything up to the plan file without TensorRT (profiles from the buckets, plan-cache
keys, precision checks, the errors when TensorRT is missing); plan building and the runtime where
``tensorrt`` imports (marker ``tensorrt``, skipped with the reason elsewhere)."""

import importlib.util

import pytest
import torch

from engine.networks import networks_for
from export.tensorrt_build import check_precision, plan_filename, plan_key, profiles_for

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

KEY_PARTS = dict(onnx_sha256="a" * 64, weights_sha256="b" * 64, precision="fp16",
                 profiles=[{"bucket": "16x32x32", "min": {"x": [1, 3]}, "opt": {"x": [2, 3]}, "max": {"x": [8, 3]}}],
                 gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt_version="10.15.1",
                 options={"fp8": False, "workspace_gb": 8.0})


def test_plan_key_changes_when_any_part_changes():
    base = plan_key(**KEY_PARTS)
    assert plan_key(**KEY_PARTS) == base and len(base) == 64
    changed = {
        "onnx_sha256": "c" * 64, "weights_sha256": "d" * 64, "precision": "bf16",
        "profiles": [{**KEY_PARTS["profiles"][0], "max": {"x": [16, 3]}}],
        "gpu": "NVIDIA H200", "compute_capability": "8.9", "tensorrt_version": "10.16.0",
        "options": {"fp8": True, "workspace_gb": 8.0},
    }
    keys = {base}
    for part, value in changed.items():
        key = plan_key(**{**KEY_PARTS, part: value})
        assert key not in keys, part
        keys.add(key)
    assert plan_filename("content_unet", base) == f"content_unet-{base[:16]}.plan"


def test_profiles_come_from_the_buckets(make_tiny_latent_config):
    cfg = make_tiny_latent_config([(4, 32, 32), (2, 32, 64)])
    dit = networks_for(cfg, names=["motion_dit"], max_batch=2)[0]
    profiles = profiles_for(dit)
    assert [p["bucket"] for p in profiles] == ["4x32x32", "2x32x64"]
    second = profiles[1]
    d, n = cfg.autoencoder.motion_dim, (32 // 2 + 64 // 2) // cfg.autoencoder.patch_size
    assert second["min"]["motion"] == [1, d, 2, n]
    assert second["opt"]["motion"] == [2, d, 2, n]
    assert second["max"]["motion"] == [4, d, 2, n]
    assert second["max"]["content"] == [4, 4, 16, 32] and second["max"]["timestep"] == [4]
    # one profile per bucket, and only the batch moves inside a profile
    for p in profiles:
        for name in p["min"]:
            assert p["min"][name][1:] == p["opt"][name][1:] == p["max"][name][1:]


def test_precision_and_hardware_checks():
    check_precision("fp16", False, "7.5")
    check_precision("bf16", True, "9.0")
    with pytest.raises(ValueError, match="'int8'"):
        check_precision("int8", False, "9.0")
    with pytest.raises(ValueError, match="bf16 needs"):
        check_precision("bf16", False, "7.5")
    with pytest.raises(ValueError, match="fp8 needs.*8.6"):
        check_precision("fp16", True, "8.6")


def test_plans_refused_on_another_gpu_or_version():
    from engine.backends.tensorrt import check_plans_runnable

    plans = {"tensorrt": "10.15.1", "target": {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, "onnx_dir": "o"}
    check_plans_runnable(plans, "10.15.1", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, "p")
    with pytest.raises(ValueError, match="NVIDIA H100.*A100.*rebuild"):
        check_plans_runnable(plans, "10.15.1", {"gpu": "NVIDIA A100", "compute_capability": "8.0"}, "p")
    with pytest.raises(ValueError, match="tensorrt '10.15.1' \\(here '10.16.0'\\)"):
        check_plans_runnable(plans, "10.16.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, "p")


def test_plan_limits_checked_from_the_manifest_without_tensorrt(default_model, default_export):
    """The tensorrt backend's request check on a plan folder's manifest (no TensorRT, no GPU): the calls a
    real pipeline would make are refused when a plan is missing, the size is outside the profiles or the
    batch beyond them, each with one line; calls within them pass."""
    from engine.backends.tensorrt import check_plan_calls, plan_networks
    from engine.configs import CMDConfig
    from engine.pipeline import CMDPipeline, check_request

    model, text_encoder, _ = default_model
    manifest = default_export[1]
    built = ["content_unet", "motion_dit", "ae_decoder"]  # what the backend runs (the text encoder stays PyTorch)
    plans = {"onnx_manifest": manifest, "networks": {n: {"plan": f"{n}.plan"} for n in built}}
    assert sorted(plan_networks(plans)) == sorted(built)
    wider = CMDConfig.from_dict(dict(model.config.to_dict(), sizes=["16x32x32", "16x64x64", "16x48x48"]))
    pipe = CMDPipeline(model, text_encoder)
    max_batch = manifest["max_batch"]

    def calls(prompts, **kwargs):
        return pipe.network_calls(check_request(wider, **kwargs), prompts)

    check_plan_calls(plans, calls(max_batch), "plans/default")
    check_plan_calls(plans, calls(1, num_frames=3), "plans/default")  # fewer frames: the 16-frame profile
    for call, pattern in ((calls(max_batch + 1), rf"content_unet on batches of 1 to {2 * max_batch}, this request "
                                                 rf"needs {2 * max_batch + 2}"),
                          (calls(1, motion_variations=max_batch + 1), "motion_dit on batches"),
                          (calls(1, height=48, width=48),
                           "16x48x48 is outside the plans in 'plans/default'.*16x32x32, 16x64x64")):
        with pytest.raises(ValueError, match=pattern) as info:
            check_plan_calls(plans, call, "plans/default")
        assert "\n" not in str(info.value)
    del plans["networks"]["ae_decoder"]
    with pytest.raises(ValueError, match="hold no ae_decoder network"):
        check_plan_calls(plans, calls(1), "plans/default")
    check_plan_calls(plans, pipe.network_calls(check_request(wider), 1, output_type="latent"), "plans/default")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is importable here: the missing-TensorRT errors cannot happen")
def test_missing_tensorrt_says_what_and_how(default_export, default_model, tmp_path):
    from engine.backends import get_backend
    from export.__main__ import main
    from export.tensorrt_build import build_plans

    with pytest.raises(ValueError, match="pip install 'tensorrt-cu"):
        build_plans(default_export[0], str(tmp_path / "plans"))
    backend = get_backend("tensorrt")  # the module imports anywhere; using it needs TensorRT
    with pytest.raises(ValueError, match="TensorRT is not importable.*pip install 'tensorrt-cu"):
        backend(default_model[0])
    # the parser-compatibility check needs no TensorRT, and passes for the default model's graphs
    assert main(["tensorrt", "--onnx", default_export[0], "--check-only"]) == 0
    assert main(["tensorrt", "--onnx", default_export[0], "--out", str(tmp_path / "plans")]) == 2
    assert not (tmp_path / "plans").exists()


@pytest.mark.tensorrt
def test_build_plans_cache_and_run(tiny_latent, tiny_latent_export, tmp_path):
    """Plans for the tiny latent model: one profile per bucket; a second build is a cache hit; the
    runtime (with and without CUDA graphs) matches the PyTorch networks in fp32 plans."""
    import os

    if not torch.cuda.is_available():
        pytest.skip("tensorrt imports here, but there is no CUDA device to build plans on")

    from engine.backends.tensorrt import TensorRTBackend
    from export.tensorrt_build import build_plans

    model, text_encoder = tiny_latent
    onnx_dir, out = tiny_latent_export[0], str(tmp_path / "plans")
    plans = build_plans(onnx_dir, out, precision="fp32", workspace_gb=1.0)
    assert set(plans["networks"]) == {"text_encoder", "content_unet", "motion_dit", "ae_decoder", "vae_decoder"}
    assert len(plans["networks"]["motion_dit"]["profiles"]) == 2
    stamps = {n: os.path.getmtime(os.path.join(out, e["plan"])) for n, e in plans["networks"].items()}
    log = []
    again = build_plans(onnx_dir, out, precision="fp32", workspace_gb=1.0, log=log.append)
    assert again["networks"] == plans["networks"] and all("cache hit" in line for line in log)
    assert stamps == {n: os.path.getmtime(os.path.join(out, e["plan"])) for n, e in again["networks"].items()}
    from engine.artefacts import gpu_identity
    from export.tensorrt_build import timing_cache_path

    assert os.path.isfile(timing_cache_path(out, plans["tensorrt"], gpu_identity()))

    cuda_model = model.to("cuda")
    try:
        for cuda_graph in (False, True):
            backend = TensorRTBackend(cuda_model, plan_dir=out, cuda_graph=cuda_graph)
            gen = torch.Generator(device="cuda").manual_seed(0)
            for frames in (4, 2):
                content = torch.randn(2, 4, 16, 16, device="cuda", generator=gen)
                motion = torch.rand(2, *model.config.motion_shape(frames), device="cuda", generator=gen) * 2 - 1
                t = torch.tensor([999, 3], device="cuda")
                text = torch.randn(2, 32, device="cuda", generator=gen)
                with torch.no_grad():
                    for _ in range(2):  # the second call replays the captured graph
                        got = backend.dit_step(motion, t, content, text).clone()
                    ref = cuda_model.motion_dit(motion, t, content, text)
                    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
                    torch.testing.assert_close(backend.decode(content, motion), cuda_model.autoencoder.decode(content, motion),
                                               atol=1e-4, rtol=1e-3)
        # The pipeline checks the plans' profiles before any engine runs: more prompts than they hold fail
        # with one line and no enqueue; a batch they hold runs.
        from engine.backends.tensorrt import TrtNetwork
        from engine.pipeline import CMDPipeline

        runs = []
        real = TrtNetwork.__call__

        def spy(self, *tensors):
            runs.append(self.network.name)
            return real(self, *tensors)

        TrtNetwork.__call__ = spy
        try:
            pipe = CMDPipeline(cuda_model, text_encoder.to("cuda"), backend="tensorrt",
                               backend_options={"plan_dir": out})
            max_batch = plans["onnx_manifest"]["max_batch"]
            call = dict(num_inference_steps=1, motion_steps=1, generator=0, progress=False)
            with pytest.raises(ValueError, match="on batches of 1 to") as info:
                pipe(["a red circle"] * (max_batch + 1), **call)
            assert "\n" not in str(info.value) and runs == []
            out_frames = pipe(["a red circle"] * max_batch, **call).frames
            assert out_frames.shape[0] == max_batch and "motion_dit" in runs
        finally:
            TrtNetwork.__call__ = real
    finally:
        model.to("cpu")
        text_encoder.to("cpu")


@pytest.mark.tensorrt
def test_captured_slots_interleaved(tiny_latent, tiny_latent_export, tmp_path):
    """CUDA graphs of several slots of one plan replayed interleaved (batch B then 2B as a guidance interval
    does, a smaller last batch, two buckets): each replay matches PyTorch, so no slot runs with another's
    binding."""
    if not torch.cuda.is_available():
        pytest.skip("tensorrt imports here, but there is no CUDA device to build plans on")
    from engine.backends.tensorrt import TensorRTBackend
    from export.tensorrt_build import build_plans

    model, _ = tiny_latent
    out = str(tmp_path / "plans")
    build_plans(tiny_latent_export[0], out, workspace_gb=1.0, names=["motion_dit"])
    cuda_model = model.to("cuda")
    try:
        backend = TensorRTBackend(cuda_model, plan_dir=out, cuda_graph=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        inputs = {}
        for frames, batch in ((4, 1), (4, 2), (2, 1), (4, 1), (2, 2), (4, 2), (2, 1)):
            if (frames, batch) not in inputs:
                inputs[frames, batch] = (
                    torch.rand(batch, *model.config.motion_shape(frames), device="cuda", generator=gen) * 2 - 1,
                    torch.randint(0, 1000, (batch,), device="cuda", generator=gen),
                    torch.randn(batch, 4, 16, 16, device="cuda", generator=gen),
                    torch.randn(batch, 32, device="cuda", generator=gen))
            with torch.no_grad():
                got = backend.dit_step(*inputs[frames, batch]).clone()
                torch.testing.assert_close(got, cuda_model.motion_dit(*inputs[frames, batch]), atol=1e-4, rtol=1e-3)
    finally:
        model.to("cpu")
