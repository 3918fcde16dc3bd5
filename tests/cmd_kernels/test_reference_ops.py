"""The reference ops are the spec of the kernels: check their defining properties."""

import pytest
import torch
import torch.nn.functional as F

import cmd_kernels


def test_content_frame_is_a_convex_combination_over_time():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 5, 3, 7, 9, generator=g) * 2 - 1
    logits = torch.randn(2, 5, 3, 7, 9, generator=g) * 3
    out = cmd_kernels.content_frame(frames, logits, impl="reference")
    assert out.shape == (2, 3, 7, 9)
    # Bounded per pixel by the frames' min and max over time, and equal to the explicit weighted sum.
    assert torch.all(out <= frames.max(dim=1).values + 1e-6) and torch.all(out >= frames.min(dim=1).values - 1e-6)
    w = logits.double().exp() / logits.double().exp().sum(1, keepdim=True)
    torch.testing.assert_close(out.double(), (w * frames.double()).sum(1), rtol=1e-5, atol=1e-6)


def test_content_frame_of_one_frame_is_that_frame():
    frames = torch.randn(3, 1, 4, 5, 6)
    out = cmd_kernels.content_frame(frames, torch.randn(3, 1, 4, 5, 6), impl="reference")
    torch.testing.assert_close(out, frames[:, 0])


def test_content_frame_keeps_dtype_and_computes_softmax_in_fp32():
    frames = torch.randn(1, 4, 2, 3, 3).half()
    logits = (torch.randn(1, 4, 2, 3, 3) * 20).half()
    out = cmd_kernels.content_frame(frames, logits, impl="reference")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_decoder_fusion_equals_the_broadcast_formula():
    b, l, h, w, c = 2, 3, 4, 5, 8
    content, th, tw = torch.randn(b, h, w, c), torch.randn(b, l, h, c), torch.randn(b, l, w, c)
    weight, bias = torch.randn(c), torch.randn(c)
    cube, normed = cmd_kernels.decoder_fusion(content, th, tw, weight, bias, impl="reference")
    for bi, li, hi, wi in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 2, 3)]:
        v = content[bi, hi, wi] + th[bi, li, hi] + tw[bi, li, wi]
        torch.testing.assert_close(cube[bi, li, hi, wi], v)
        torch.testing.assert_close(normed[bi, li, hi, wi], F.layer_norm(v, (c,), weight, bias, 1e-5))


def test_motion_attention_reference_matches_fp64_math():
    q, k, v = (torch.randn(2, 3, 37, 72) for _ in range(3))
    out = cmd_kernels.motion_attention(q, k, v, impl="reference")
    s = (q.double() @ k.double().transpose(-1, -2)) / 72 ** 0.5
    ref = torch.softmax(s, -1) @ v.double()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_modulated_layernorm_reference():
    x, shift, scale = torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 16)
    out = cmd_kernels.modulated_layernorm(x, shift, scale, impl="reference")
    ref = F.layer_norm(x, (16,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(out, ref)


def test_bad_arguments_name_the_bad_value():
    with pytest.raises(ValueError, match="impl"):
        cmd_kernels.content_frame(torch.randn(1, 2, 1, 2, 2), torch.randn(1, 2, 1, 2, 2), impl="cuda")
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 2, 3\)"):
        cmd_kernels.content_frame(torch.randn(1, 2, 1, 2, 2), torch.randn(1, 2, 1, 2, 3))
    with pytest.raises(ValueError, match="head_dim <= 128"):
        q = torch.randn(1, 1, 4, 160)
        cmd_kernels.motion_attention(q, q, q)
