"""The content_frame Triton kernels (forward and backward) against an fp64 reference.

Runs natively on a GPU and in the Triton interpreter on a CPU (tests/conftest.py sets TRITON_INTERPRET=1).
Outputs are NaN-poisoned before each launch, so an element the kernel fails to write shows up."""

import pytest
import torch

import cmd_kernels
from cmd_kernels import _triton
from cmd_kernels._dispatch import use_triton
from cmd_kernels.ops import content_frame as module
from cmd_kernels.ops.content_frame import _content_frame_backward_op, _content_frame_op, content_frame_reference
from cmd_kernels.testing import TOL, rel_err
from cmd_kernels.testing import content_frame_inputs as inputs

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# (B, L, C, H, W): a small model's clip, one frame, long videos (online softmax across time blocks),
# sizes that are not multiples of any block.
SHAPES = [(2, 16, 3, 32, 32), (1, 1, 3, 5, 7), (2, 37, 3, 5, 7), (3, 16, 4, 9, 13), (1, 5, 1, 1, 1)]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)


@pytest.fixture(params=["native_blocks", "gpu_blocks"])
def blocks(request, monkeypatch):
    """Pixel blocks as this machine picks them, or GPU-sized ones (several programs per sample, a
    partial last block) so the interpreter runs the launch geometry a GPU does."""
    if request.param == "gpu_blocks" and _triton.INTERPRETED:
        monkeypatch.setattr(module, "_meta", lambda P: {"BLOCK_P": 128, "num_warps": 4})
    return request.param


def test_auto_dispatches_to_the_kernel_here(device):
    frames, logits = inputs((1, 2, 1, 2, 2), torch.float32, device)
    assert use_triton("auto", frames, logits, op="content_frame")
    assert not use_triton("reference", frames, logits, op="content_frame")
    assert not use_triton("auto", frames.double(), logits.double(), op="content_frame")  # no fp64 kernel
    with pytest.raises(TypeError, match="float64"):
        cmd_kernels.content_frame(frames.double(), logits.double(), impl="triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_fp64(shape, dtype, device, blocks):
    frames, logits = inputs(shape, dtype, device)
    out = cmd_kernels.content_frame(frames, logits, impl="triton")
    ref = content_frame_reference(frames.double(), logits.double())
    assert out.shape == shape[:1] + shape[2:] and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= TOL[dtype], err
    if dtype == torch.bfloat16:  # never worse than 2x PyTorch's own bf16 error
        assert err <= 2 * rel_err(content_frame_reference(frames, logits), ref) + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 16, 3, 32, 32), (1, 1, 3, 5, 7), (2, 37, 3, 5, 7), (3, 16, 4, 9, 13)])
def test_backward_matches_fp64(shape, dtype, device, blocks):
    frames, logits = inputs(shape, dtype, device, seed=1)
    grad = torch.randn(shape[:1] + shape[2:], generator=torch.Generator().manual_seed(2)).to(device, dtype)
    f, x = frames.clone().requires_grad_(), logits.clone().requires_grad_()
    cmd_kernels.content_frame(f, x, impl="triton").backward(grad)
    f64, x64 = frames.double().requires_grad_(), logits.double().requires_grad_()
    content_frame_reference(f64, x64).backward(grad.double())
    assert f.grad.dtype == dtype and x.grad.dtype == dtype
    assert rel_err(f.grad, f64.grad) <= TOL[dtype]
    if shape[1] == 1:  # one frame: its weight is 1 whatever the logit, so d logits is exactly zero
        assert torch.equal(x.grad, torch.zeros_like(x.grad))
    else:
        assert rel_err(x.grad, x64.grad) <= TOL[dtype]


@pytest.mark.parametrize("layout", ["hw_transposed", "every_other_frame", "channels_last", "batch_slice"])
def test_strided_inputs(layout, device):
    base_f, base_x = inputs((4, 12, 3, 10, 14), torch.float32, device, seed=3)
    view = {
        "hw_transposed": lambda t: t.transpose(3, 4),  # (C, H, W) not dense: the general index path
        "every_other_frame": lambda t: t[:, ::2],  # dense pixels, strided time
        "channels_last": lambda t: t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3),
        "batch_slice": lambda t: t[1:3, :, 1:],
    }[layout]
    frames, logits = view(base_f), view(base_x)
    out = cmd_kernels.content_frame(frames, logits, impl="triton")
    assert rel_err(out, content_frame_reference(frames.double(), logits.double())) <= 1e-5
    f, x = frames.detach().requires_grad_(), logits.detach().requires_grad_()
    grad = torch.randn(out.shape, device=device).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided grad
    cmd_kernels.content_frame(f, x, impl="triton").backward(grad)
    f64, x64 = frames.double().requires_grad_(), logits.double().requires_grad_()
    content_frame_reference(f64, x64).backward(grad.double())
    assert rel_err(f.grad, f64.grad) <= 1e-5 and rel_err(x.grad, x64.grad) <= 1e-5


def test_softmax_is_fp32_for_half_inputs(device):
    # Logits far outside exp's fp16 range: an fp16 softmax would overflow to inf/NaN.
    frames, logits = inputs((2, 16, 3, 7, 9), torch.float16, device, seed=4, logit_scale=60.0)
    out = cmd_kernels.content_frame(frames, logits, impl="triton")
    assert torch.isfinite(out).all()
    assert rel_err(out, content_frame_reference(frames.double(), logits.double())) <= TOL[torch.float16]


def test_output_is_a_convex_combination_and_deterministic(device):
    frames, logits = inputs((2, 16, 3, 11, 12), torch.float32, device, seed=5)
    a = cmd_kernels.content_frame(frames, logits, impl="triton")
    b = cmd_kernels.content_frame(frames, logits, impl="triton")
    assert torch.equal(a, b)
    assert (a <= frames.max(1).values + 1e-6).all() and (a >= frames.min(1).values - 1e-6).all()


def test_opcheck(device):
    frames, logits = inputs((2, 3, 2, 4, 5), torch.float32, device, seed=6)
    torch.library.opcheck(_content_frame_op, (frames.requires_grad_(), logits.requires_grad_()))
    grad = torch.randn(2, 2, 4, 5, device=device)
    torch.library.opcheck(_content_frame_backward_op, (grad, frames.detach(), logits.detach()))


def test_meta_tensors_take_shapes_only():
    frames = torch.empty(2, 16, 4, 64, 128, device="meta")
    assert cmd_kernels.content_frame(frames, frames).shape == (2, 4, 64, 128)
    assert cmd_kernels.content_frame(frames, frames, impl="triton").shape == (2, 4, 64, 128)  # the fake impl


# ------------------------------------------------------------ -inf logits (masked frames), inf and NaN
#
# The forward and the long-video backward run an online softmax over 16-frame time blocks; a block whose
# logits are all -inf once made the running max -inf and exp2(-inf - -inf) NaN. Every run below lies in
# a random half of the pixels (the other half has no -inf), so masked and unmasked pixels share a launch.

NEG_INF = float("-inf")
# (L, first masked frame, run length): the case (the first block of 20 frames), a middle block,
# the last partial block, two whole blocks, runs across block edges, one frame, all frames but one
# (first or last), and a one-tile video (L <= 16: no online softmax) for comparison.
RUNS = [(20, 0, 16), (37, 16, 16), (37, 32, 5), (33, 0, 32), (37, 5, 25), (20, 3, 1), (37, 0, 36),
        (37, 1, 36), (16, 2, 13)]


def masked(shape, dtype, device, seed, start, length):
    """Random frames and logits with logits[:, start:start + length] = -inf at a random half of the
    pixels: (frames, logits, mask of the -inf logits)."""
    frames, logits = inputs(shape, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    pixels = (torch.rand((shape[0], 1) + shape[2:], generator=g) < 0.5).to(device)
    in_run = torch.zeros(shape[1], dtype=torch.bool, device=device)
    in_run[start:start + length] = True
    mask = pixels & in_run[None, :, None, None, None]
    return frames, logits.masked_fill(mask, NEG_INF), mask


def forward_and_grads(frames, logits, grad, impl):
    """Output and (d frames, d logits) of content_frame (impl) or the fp64 reference (impl=None)."""
    if impl is None:
        frames, logits, grad = frames.double(), logits.double(), grad.double()
    f, x = frames.clone().requires_grad_(), logits.clone().requires_grad_()
    out = cmd_kernels.content_frame(f, x, impl=impl) if impl else content_frame_reference(f, x)
    out.backward(grad)
    return out.detach(), f.grad, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("run", RUNS, ids=lambda r: "L%d_from%d_len%d" % r)
def test_neg_inf_runs_match_the_reference(run, dtype, device, blocks):
    L, start, length = run
    shape = (2, L, 3, 5, 7)
    frames, logits, mask = masked(shape, dtype, device, seed=L + 7 * start + length, start=start, length=length)
    grad = torch.randn(shape[:1] + shape[2:], generator=torch.Generator().manual_seed(start)).to(device, dtype)
    out, d_frames, d_logits = forward_and_grads(frames, logits, grad, "triton")
    ref, ref_frames, ref_logits = forward_and_grads(frames, logits, grad, None)
    assert torch.isfinite(ref).all()  # the right value is finite: at least one finite logit per pixel
    for got, want in ((out, ref), (d_frames, ref_frames), (d_logits, ref_logits)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) <= TOL[dtype]
    # A -inf logit weighs exactly 0: its frame and its logit get exactly zero gradient.
    assert (d_frames[mask] == 0).all() and (d_logits[mask] == 0).all()


@pytest.mark.parametrize("L", [37, 20, 9])
def test_random_neg_inf_runs_per_pixel(L, device, blocks):
    # Every pixel its own run: random start and length (0 to L - 1 frames), so runs of every length at
    # every position, aligned with the 16-frame blocks or not, in one launch.
    shape = (2, L, 2, 6, 9)
    frames, logits = inputs(shape, torch.float32, device, seed=L)
    g = torch.Generator().manual_seed(L + 1)
    length = torch.randint(0, L, (shape[0], 1) + shape[2:], generator=g)
    start = (torch.rand(length.shape, generator=g) * (L - length + 1)).long().clamp_max(L - length)
    t = torch.arange(L)[None, :, None, None, None]
    mask = ((t >= start) & (t < start + length)).to(device)
    assert mask.any(1).float().mean() > 0.8 and (mask.sum(1) == L - 1).any()
    logits = logits.masked_fill(mask, NEG_INF)
    grad = torch.randn(shape[:1] + shape[2:], generator=g).to(device)
    got = forward_and_grads(frames, logits, grad, "triton")
    want = forward_and_grads(frames, logits, grad, None)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) <= TOL[torch.float32]
    assert (got[1][mask] == 0).all() and (got[2][mask] == 0).all()


def assert_nan_where_reference_is(got, want, tol):
    """NaN exactly where the fp64 reference is NaN, and the reference's value everywhere else."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.isfinite(got[~nan]).all() and rel_err(got[~nan], want[~nan]) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [37, 16, 1])
def test_all_logits_neg_inf_is_nan_as_the_reference(L, dtype, device, blocks):
    # The rule (content_frame's docstring): a pixel whose L logits are all -inf is NaN, as torch.softmax
    # makes it; the other pixels keep their values, and their gradients too.
    shape = (2, L, 3, 5, 7)
    frames, logits, mask = masked(shape, dtype, device, seed=40 + L, start=0, length=L)
    grad = torch.randn(shape[:1] + shape[2:], generator=torch.Generator().manual_seed(L)).to(device, dtype)
    got = forward_and_grads(frames, logits, grad, "triton")
    want = forward_and_grads(frames, logits, grad, None)
    dead = mask[:, 0]  # (B, C, H, W) pixels without a finite logit
    assert dead.any() and not dead.all()
    assert torch.equal(torch.isnan(want[0]), dead)  # what torch.softmax gives
    for a, b in zip(got, want):
        assert_nan_where_reference_is(a, b, TOL[dtype])


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("L", [37, 12])
def test_inf_and_nan_logits_make_their_pixel_nan(value, L, device, blocks):
    # A +inf or NaN logit (at one frame, in a later time block than a -inf run at other pixels): that
    # pixel is NaN, as torch.softmax makes it; the other pixels, masked or not, are unaffected.
    shape = (2, L, 3, 5, 7)
    frames, logits, _ = masked(shape, torch.float32, device, seed=50 + L, start=0, length=min(L - 1, 16))
    bad = torch.rand(shape[:1] + shape[2:], generator=torch.Generator().manual_seed(L)).to(device) < 0.2
    logits[:, L - 2].masked_fill_(bad, value)
    grad = torch.randn(shape[:1] + shape[2:], generator=torch.Generator().manual_seed(L + 1)).to(device)
    got = forward_and_grads(frames, logits, grad, "triton")
    want = forward_and_grads(frames, logits, grad, None)
    assert torch.equal(torch.isnan(want[0]), bad)
    for a, b in zip(got, want):
        assert_nan_where_reference_is(a, b, TOL[torch.float32])
