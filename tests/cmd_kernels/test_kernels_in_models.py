"""The models pick up the kernels unchanged: AE and DiT forward (and backward) with every op on its
Triton kernel equal the same networks on the PyTorch references.

The networks call ``cmd_kernels.*`` with ``impl="auto"``; ``cmd_kernels.force_impl`` pins what auto means."""

import pytest
import torch

import cmd_kernels
from engine.configs import load_config
from engine.models.bundle import build_autoencoder, build_motion_dit
from cmd_kernels.ops import content_frame, decoder_fusion, modulated_layernorm, motion_attention
from cmd_kernels.testing import rel_err


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches, so a silent fallback to the reference fails the test."""
    counts = {}
    for module, name in [(content_frame, "_launch_forward"), (content_frame, "_launch_backward"),
                         (motion_attention, "_launch_forward"), (modulated_layernorm, "_launch_forward"),
                         (modulated_layernorm, "_launch_backward"), (decoder_fusion, "_launch_forward"),
                         (decoder_fusion, "_launch_backward")]:
        real = getattr(module, name)
        key = f"{module.__name__.split('.')[-1]}.{name}"

        def spy(*args, _real=real, _key=key, **kwargs):
            counts[_key] = counts.get(_key, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return counts


def _randomise(module: torch.nn.Module, seed: int) -> None:
    # Trained-like weights: the zero-initialised adaLN-Zero and output layers would make the DiT's
    # output exactly zero whatever its kernels compute.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g).to(p))


def _run(fn, impl, params):
    with cmd_kernels.force_impl(impl):
        out = fn()
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)  # e.g. the DiT's null text
    return out.detach(), torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                    for g, p in zip(grads, params)])


def _small_default():
    # The default config's widths and clip size, one block per stack: every kernel at the shapes the
    # shipped model runs, in a fraction of the CPU time.
    cfg = load_config("default")
    cfg.autoencoder.encoder_depth = cfg.autoencoder.decoder_depth = 1
    cfg.motion_dit.depth = 2
    return cfg


def test_autoencoder_triton_equals_reference(device, launches):
    torch.manual_seed(0)
    cfg = _small_default()
    ae = build_autoencoder(cfg).to(device)
    _randomise(ae, 1)
    video = (torch.rand(2, cfg.num_frames, cfg.channels, cfg.height, cfg.width) * 2 - 1).to(device)
    params = [p for p in ae.parameters() if p.requires_grad]
    out_k, grads_k = _run(lambda: ae(video), "triton", params)
    out_r, grads_r = _run(lambda: ae(video), "reference", params)
    assert launches["content_frame._launch_forward"] == 1 and launches["decoder_fusion._launch_forward"] == 1
    assert launches["content_frame._launch_backward"] == 1 and launches["decoder_fusion._launch_backward"] == 1
    assert rel_err(out_k, out_r) <= 1e-5
    # All parameter gradients as one vector: some (e.g. the key bias, which softmax ignores) are
    # zero up to rounding, and relative to themselves they would compare noise with noise.
    assert rel_err(grads_k, grads_r) <= 1e-5


def test_motion_dit_triton_equals_reference(device, launches):
    torch.manual_seed(0)
    cfg = _small_default()
    dit = build_motion_dit(cfg).to(device)
    _randomise(dit, 2)
    d, frames, n = cfg.motion_shape()
    z = torch.randn(2, d, frames, n, device=device)
    content = torch.rand(2, cfg.channels, cfg.height, cfg.width, device=device) * 2 - 1
    t, text = torch.tensor([3, 700], device=device), torch.randn(2, cfg.text_encoder.hidden_size, device=device)
    params = [p for p in dit.parameters() if p.requires_grad]
    out_k, grads_k = _run(lambda: dit(z, t, content, text), "triton", params)
    out_r, grads_r = _run(lambda: dit(z, t, content, text), "reference", params)
    depth = dit.config.depth
    assert launches["motion_attention._launch_forward"] == depth
    assert launches["modulated_layernorm._launch_forward"] == 2 * depth + 1
    assert launches["modulated_layernorm._launch_backward"] == 2 * depth + 1
    assert rel_err(out_k, out_r) <= 1e-5
    # All parameter gradients as one vector: some (e.g. the key bias, which softmax ignores) are
    # zero up to rounding, and relative to themselves they would compare noise with noise.
    assert rel_err(grads_k, grads_r) <= 1e-5


@pytest.mark.gpu
def test_motion_dit_bf16_on_gpu(device):
    torch.manual_seed(0)
    cfg = load_config("default")
    dit = build_motion_dit(cfg).to(device)
    _randomise(dit, 3)
    d, frames, n = cfg.motion_shape()
    args = (torch.randn(2, d, frames, n, device=device), torch.tensor([3, 700], device=device),
            torch.rand(2, cfg.channels, cfg.height, cfg.width, device=device) * 2 - 1,
            torch.randn(2, cfg.text_encoder.hidden_size, device=device))
    with torch.no_grad():
        with cmd_kernels.force_impl("reference"):
            ref = dit.double()(*(a.double() if a.is_floating_point() else a for a in args))
        dit = dit.to(torch.bfloat16)
        bf16 = [a.bfloat16() if a.is_floating_point() else a for a in args]
        with cmd_kernels.force_impl("triton"):
            out_k = dit(*bf16)
        with cmd_kernels.force_impl("reference"):
            out_r = dit(*bf16)
    # Whole-network bf16: the kernels' error stays within 2x eager PyTorch's own.
    assert rel_err(out_k, ref) <= 2 * rel_err(out_r, ref) + 1e-3


@pytest.mark.parametrize("name", ["default", "ucf101-64", "sd21-512x1024"])
def test_bench_shapes_are_the_models_shapes(name):
    # cmd_kernels.bench reads the config files as data (kernels does not import engine): same shapes.
    from engine.configs import DIT_SIZES
    from cmd_kernels import bench

    assert bench.DIT_SIZES == DIT_SIZES
    cfg = load_config(name)
    shapes = bench.config_shapes(name, ae_batch=3, dit_batch=2)
    c, h, w, frames = cfg.channels, cfg.latent_height, cfg.latent_width, cfg.num_frames
    p, hidden = cfg.autoencoder.patch_size, cfg.autoencoder.hidden_size
    assert shapes.content_frame == (3, frames, c, h, w)
    assert shapes.decoder_fusion == (3, frames, h // p, w // p, hidden)
    dit = cfg.motion_dit
    d, frames_z, n = cfg.motion_shape()
    pc = dit.content_patch_size
    tokens = (frames_z // dit.patch_size) * (n // dit.patch_size) + (h // pc) * (w // pc)
    assert shapes.attention == (2, dit.num_heads, tokens, dit.hidden_size // dit.num_heads)
    assert shapes.modulated_layernorm == (2, tokens, dit.hidden_size)
    if name == "sd21-512x1024":
        assert shapes.attention == (2, 16, 512, 72)  # DESIGN 4: 384 z + 128 content tokens, DiT-XL heads


def test_bench_without_gpu_runs_the_correctness_pass(tmp_path, capsys):
    import json

    from cmd_kernels import bench

    if torch.cuda.is_available():
        pytest.skip("on a GPU the bench times kernels; run python -m cmd_kernels.bench there")
    out = tmp_path / "k.json"
    assert bench.main(["--configs", "default", "--json", str(out)]) == 0
    assert "timings need a GPU" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["name"] for r in rows} == {"content_frame", "decoder_fusion", "motion_attention", "modulated_layernorm"}
    assert all(r["ok"] and r["device"] == "cpu" and r["git_rev"] and r["triton"] for r in rows)
