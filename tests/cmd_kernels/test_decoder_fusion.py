"""The decoder-fusion Triton kernels (cube + LayerNorm forward, plane gradients backward) against fp64.

Runs natively on a GPU and in the Triton interpreter on a CPU. Outputs and gradient buffers are
NaN-poisoned before each launch."""

import functools

import pytest
import torch

import cmd_kernels
from cmd_kernels import _triton
from cmd_kernels.ops import decoder_fusion as fusion
from cmd_kernels.ops.decoder_fusion import (_bwd_tiles, _decoder_fusion_backward_op, _decoder_fusion_op,
                                        decoder_fusion_reference)
from cmd_kernels.testing import TOL, decoder_fusion_inputs, rel_err

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# (B, L, H, W, C): a small decoder, one frame, odd sizes, a non-power-of-two width, and C = 384
# (the ucf101/sd21 width) with H, W larger than one backward tile (partial sums across tiles).
SHAPES = [(2, 16, 16, 16, 64), (1, 1, 3, 5, 7), (2, 3, 5, 9, 72), (1, 2, 20, 20, 384)]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)


@pytest.fixture(params=["gpu_tiles", "native_tiles"])
def tiles(request, monkeypatch):
    """GPU-sized tiles (the backward one frame a step: the GPU code path, which the interpreter must
    run too), or whatever this machine picks (the whole clip a step when interpreting)."""
    if request.param == "gpu_tiles":
        monkeypatch.setattr(fusion, "_bwd_tiles", functools.partial(_bwd_tiles, interpreted=False))
        if _triton.INTERPRETED:  # and GPU-sized forward tiles: 16 tokens a program
            monkeypatch.setattr(fusion, "interpret_block", lambda n, cap, floor=1: 16)
    return request.param


# LayerNorm parameters stay fp32, as in an autocast model.
planes = functools.partial(decoder_fusion_inputs, param_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_fp64(shape, dtype, device, tiles):
    args = planes(shape, dtype, device, seed=sum(shape))
    leaves = [t.clone().requires_grad_() for t in args]
    cube, normed = cmd_kernels.decoder_fusion(*leaves, impl="triton")
    ref_leaves = [t.double().requires_grad_() for t in args]
    ref_cube, ref_normed = decoder_fusion_reference(*ref_leaves)
    assert cube.shape == normed.shape == shape and cube.dtype == normed.dtype == dtype
    assert cube.is_contiguous() and normed.is_contiguous()
    for out, ref in ((cube, ref_cube), (normed, ref_normed)):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) <= TOL[dtype]
    if dtype == torch.bfloat16:
        torch_cube, torch_normed = decoder_fusion_reference(*args)
        assert rel_err(normed, ref_normed) <= 2 * rel_err(torch_normed, ref_normed) + 1e-6

    g = torch.Generator().manual_seed(1)
    g_cube, g_normed = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    torch.autograd.backward([cube, normed], [g_cube, g_normed])
    torch.autograd.backward([ref_cube, ref_normed], [g_cube.double(), g_normed.double()])
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == got.dtype and torch.isfinite(got.grad).all()
        assert rel_err(got.grad, want.grad) <= TOL[dtype]


@pytest.mark.parametrize("interpreted", [False, True])
def test_backward_tiles_split_the_sample_on_the_c384_shape(interpreted):
    # The C = 384 case above exercises partial sums across H and W tiles with both tilings.
    b, l, h, w, c = SHAPES[-1]
    block_l, block_h, block_w, _, _ = _bwd_tiles(l, h, w, c, interpreted=interpreted)
    assert block_h < h and block_w < w and block_l == (l if interpreted else 1)


def test_strided_planes(device, tiles):
    shape = (2, 4, 6, 10, 48)
    content, th, tw, weight, bias = planes(shape, torch.float32, device, seed=3)
    content = content.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, W, C) stored W-major
    th = torch.cat([th, th], dim=-1)[..., ::2]  # channel stride 2
    tw = tw.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # time-major
    args = [content, th, tw, weight, bias]
    leaves = [t.clone().requires_grad_() if i else t.detach().requires_grad_() for i, t in enumerate(args)]
    cube, normed = cmd_kernels.decoder_fusion(*leaves, impl="triton")
    ref_leaves = [t.double().requires_grad_() for t in args]
    ref_cube, ref_normed = decoder_fusion_reference(*ref_leaves)
    assert rel_err(cube, ref_cube) <= 1e-5 and rel_err(normed, ref_normed) <= 1e-5
    g = torch.randn(shape[0], shape[2], shape[1], shape[3], shape[4], device=device).transpose(1, 2)  # strided grad
    torch.autograd.backward([cube, normed], [g, g])
    torch.autograd.backward([ref_cube, ref_normed], [g.double(), g.double()])
    for got, want in zip(leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) <= 1e-5


def test_only_normed_used(device):
    # The decoder block reads both outputs, but a caller using one still gets correct plane gradients.
    args = planes((1, 3, 4, 5, 16), torch.float32, device, seed=4)
    leaves = [t.clone().requires_grad_() for t in args]
    cmd_kernels.decoder_fusion(*leaves, impl="triton")[1].square().sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in args]
    decoder_fusion_reference(*ref_leaves)[1].square().sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) <= 1e-5


def test_deterministic(device, tiles):
    args = planes((2, 5, 7, 9, 40), torch.float16, device, seed=5)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in args]
        cube, normed = cmd_kernels.decoder_fusion(*leaves, impl="triton")
        (cube.float().sum() + normed.float().square().sum()).backward()
        runs.append([cube, normed] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_opcheck(device):
    args = planes((1, 2, 3, 4, 8), torch.float32, device, seed=6)
    torch.library.opcheck(_decoder_fusion_op, (*[t.requires_grad_() for t in args], 1e-5))
    g = torch.randn(1, 2, 3, 4, 8, device=device)
    torch.library.opcheck(_decoder_fusion_backward_op, (g, g.clone(), *[t.detach() for t in args], 1e-5))


def test_bad_input_names_the_value(device):
    content, th, tw, weight, bias = planes((1, 2, 3, 4, 8), torch.float32, device)
    with pytest.raises(ValueError, match=r"time_width \(1, 2, 5, 8\)"):
        cmd_kernels.decoder_fusion(content, th, torch.randn(1, 2, 5, 8, device=device), weight, bias)
    with pytest.raises(ValueError, match="eps must be positive, got 0"):
        cmd_kernels.decoder_fusion(content, th, tw, weight, bias, eps=0.0)
