"""The motion-attention kernel and the DiT prologue (modulated LayerNorm) against fp64 references.

Runs natively on a GPU and in the Triton interpreter on a CPU. Outputs are NaN-poisoned before each
launch. bf16 runs on the GPU only (the interpreter's bf16 arithmetic is wrong)."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import cmd_kernels
from cmd_kernels import _triton
from cmd_kernels.ops import modulated_layernorm as layernorm, motion_attention as attention
from cmd_kernels.ops.modulated_layernorm import (_modulated_layernorm_backward_op, _modulated_layernorm_op, _rows_config,
                                            modulated_layernorm_reference)
from cmd_kernels.ops.motion_attention import _head_split, _motion_attention_op
from cmd_kernels.testing import TOL, attention_fp64, attention_inputs, modulated_layernorm_inputs, rel_err

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)


@pytest.fixture(params=["native_blocks", "gpu_blocks"])
def blocks(request, monkeypatch):
    """Blocks as this machine picks them, or GPU-sized ones (64 queries x 64 keys: several key blocks,
    a masked last one; 8-row LayerNorm tiles) so the interpreter runs a GPU's launch geometry."""
    if request.param == "gpu_blocks" and _triton.INTERPRETED:
        monkeypatch.setattr(attention, "interpret_block", lambda n, cap, floor=1: 64)
        monkeypatch.setattr(layernorm, "_rows_config", functools.partial(_rows_config, interpreted=False))
    return request.param


qkv = functools.partial(attention_inputs, seed=0, packed=False)  # three contiguous tensors


# ------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    (2, 4, 192, 32),  # the tiny DiT: 128 z tokens + 64 content tokens, head dim 32
    (1, 2, 37, 72),  # DiT-XL's head dim, N not a multiple of any block
    (2, 3, 1, 80),  # one token
    (1, 2, 130, 128),
    (1, 1, 17, 96),
    (1, 2, 64, 64),
    (1, 1, 20, 40),
])
def test_attention_matches_fp64(shape, dtype, device, blocks):
    q, k, v = qkv(shape, dtype, device)
    out = cmd_kernels.motion_attention(q, k, v, impl="triton")
    ref = attention_fp64(q, k, v)
    assert out.shape == shape and out.dtype == dtype and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= TOL[dtype], err
    if dtype == torch.bfloat16:
        assert err <= 2 * rel_err(F.scaled_dot_product_attention(q, k, v), ref) + 1e-6


@pytest.mark.parametrize("head_dim", [8, 32, 48, 64, 72, 80, 96, 112, 128])
def test_every_head_dim(head_dim, device):
    q, k, v = qkv((1, 2, 45, head_dim), torch.float32, device, seed=head_dim)
    out = cmd_kernels.motion_attention(q, k, v, impl="triton")
    assert rel_err(out, attention_fp64(q, k, v)) <= 1e-5


def test_head_dim_split_avoids_padding_to_128():
    assert _head_split(72) == (64, 16, True)  # 80 columns of MMA work, not 128
    assert _head_split(80) == (64, 16, True)
    assert _head_split(96) == (64, 32, True)
    assert _head_split(64) == (64, 16, False)
    assert _head_split(128) == (128, 16, False)


def test_dit_xl_shape(device):
    # sd21-512x1024: 384 z tokens + 128 content tokens, 16 heads of 72.
    q, k, v = qkv((1, 16, 512, 72), torch.float16, device, seed=7)
    out = cmd_kernels.motion_attention(q, k, v, impl="triton")
    assert rel_err(out, attention_fp64(q, k, v)) <= TOL[torch.float16]


def test_strided_qkv_as_the_dit_makes_them(device):
    # Attention.forward: qkv (B, N, 3 * C) -> (3, B, heads, N, d) views, none of them contiguous.
    b, n, heads, d = 2, 53, 3, 40
    x = torch.randn(b, n, 3 * heads * d, device=device)
    q, k, v = x.reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    out = cmd_kernels.motion_attention(q, k, v, scale=0.3, impl="triton")
    assert rel_err(out, attention_fp64(q, k, v, 0.3)) <= 1e-5
    # Token-major output, like SDPA's flash backend: the DiT's transpose + reshape is a view.
    assert out.transpose(1, 2).is_contiguous()


def test_scale_and_large_logits(device):
    q, k, v = qkv((1, 2, 70, 64), torch.float32, device, seed=8)
    out = cmd_kernels.motion_attention(q * 4, k * 4, v, scale=1.0, impl="triton")  # logits of size ~100
    assert torch.isfinite(out).all()
    assert rel_err(out, attention_fp64(q * 4, k * 4, v, 1.0)) <= 1e-5


def test_attention_is_deterministic(device):
    q, k, v = qkv((2, 4, 150, 72), torch.float16, device, seed=9)
    first = cmd_kernels.motion_attention(q, k, v, impl="triton")
    assert torch.equal(first, cmd_kernels.motion_attention(q, k, v, impl="triton"))


def test_attention_gradients(device):
    q, k, v = qkv((2, 2, 33, 72), torch.float32, device, seed=10)
    grad = torch.randn(q.shape, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    cmd_kernels.motion_attention(*leaves, scale=0.2, impl="triton").backward(grad)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    attention_fp64(*ref_leaves, 0.2).backward(grad.double())
    for got, ref in zip(leaves, ref_leaves):
        assert rel_err(got.grad, ref.grad) <= 1e-5


def test_attention_bad_input_names_the_value(device):
    q = torch.randn(1, 2, 8, 32, device=device)
    with pytest.raises(ValueError, match="head_dim <= 128, got 160"):
        cmd_kernels.motion_attention(*(torch.randn(1, 1, 4, 160, device=device),) * 3)
    with pytest.raises(ValueError, match=r"\(1, 2, 8, 32\), \(1, 2, 9, 32\)"):
        cmd_kernels.motion_attention(q, torch.randn(1, 2, 9, 32, device=device), q)
    with pytest.raises(ValueError, match="scale must be positive, got -1"):
        cmd_kernels.motion_attention(q, q, q, scale=-1.0)


def test_attention_opcheck(device):
    q, k, v = (t.requires_grad_() for t in qkv((1, 2, 20, 40), torch.float32, device, seed=11))
    torch.library.opcheck(_motion_attention_op, (q, k, v, 0.25))


# ------------------------------------------------------------------ infinite inputs: -inf score runs
#
# The kernel's online softmax runs over key blocks (64 wide in the gpu_blocks geometry); a block of -inf
# scores before any finite one made the running max -inf and exp2(-inf - -inf) NaN. There is no mask
# argument, so -inf scores come only from infinite inputs: q[..., 0] > 0 and k[j, 0] = -inf give key j
# the score -inf in every row.

N_INF = 150  # key blocks [0, 64), [64, 128), [128, 150) + padding in the gpu_blocks geometry
KEY_RUNS = [(0, 64), (64, 64), (128, 22), (0, 128), (10, 100), (77, 1), (0, 149), (1, 149)]


def attention_safe_fp64(q, k, v, scale=None):
    """fp64 attention with SDPA's rule for rows whose scores are all -inf: output 0, not NaN."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    dead = (s == float("-inf")).all(-1, keepdim=True)
    return torch.where(dead, 0.0, torch.softmax(s, -1) @ v.double())


def inf_key_inputs(shape, dtype, device, seed, start, length):
    q, k, v = qkv(shape, torch.float32, device, seed=seed)
    q[..., 0] = q[..., 0].abs() + 0.5
    k[..., start:start + length, 0] = float("-inf")
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("run", KEY_RUNS, ids=lambda r: "from%d_len%d" % r)
def test_attention_neg_inf_key_runs(run, dtype, device, blocks):
    q, k, v = inf_key_inputs((1, 2, N_INF, 72), dtype, device, seed=sum(run), start=run[0], length=run[1])
    out = cmd_kernels.motion_attention(q, k, v, impl="triton")
    want = attention_safe_fp64(q, k, v)
    assert torch.isfinite(want).all()
    assert torch.isfinite(out).all() and rel_err(out, want) <= TOL[dtype]
    sdpa = F.scaled_dot_product_attention(q, k, v)  # the reference op agrees
    assert rel_err(sdpa, want) <= 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [150, 20])
def test_attention_rows_of_all_neg_inf_scores_are_zero(n, dtype, device, blocks):
    # Rows with q[i, 0] = +inf against keys whose k[:, 0] < 0 score -inf everywhere: SDPA gives 0
    # there (its safe softmax), and so does the kernel (motion_attention's docstring); other rows,
    # some of their key blocks -inf too, keep their values.
    q, k, v = inf_key_inputs((2, 2, n, 40), torch.float32, device, seed=n, start=0, length=n // 2)
    k[..., 0] = -k[..., 0].abs() - 0.5
    rows = torch.rand(q.shape[:-1], generator=torch.Generator().manual_seed(n)).to(device) < 0.3
    q[..., 0] = torch.where(rows, float("inf"), q[..., 0])
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = cmd_kernels.motion_attention(q, k, v, impl="triton")
    want = attention_safe_fp64(q, k, v)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v)[rows], torch.zeros_like(out[rows]))
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.isfinite(out).all() and rel_err(out[~rows], want[~rows]) <= TOL[dtype]


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_attention_inf_and_nan_scores_make_their_row_nan(value, device, blocks):
    # A +inf score (q[i, 0] = +inf against a key with k[j, 0] > 0 in the last key block) or a NaN
    # query: that row is NaN, as in SDPA; the other rows are unaffected.
    q, k, v = inf_key_inputs((1, 2, N_INF, 40), torch.float32, device, seed=3, start=0, length=64)
    k[..., 0] = -k[..., 0].abs() - 0.5
    k[..., N_INF - 3, 0] = 1.0
    rows = torch.rand(q.shape[:-1], generator=torch.Generator().manual_seed(4)).to(device) < 0.2
    q[..., 0] = torch.where(rows, value, q[..., 0])
    out = cmd_kernels.motion_attention(q, k, v, impl="triton")
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert torch.isnan(sdpa[rows]).all() and torch.isnan(out[rows]).all()
    assert torch.isfinite(out[~rows]).all()
    assert rel_err(out[~rows], attention_safe_fp64(q, k, v)[~rows]) <= TOL[torch.float32]


# --------------------------------------------------------------------------- modulated LayerNorm

def modln_inputs(b, n, c, dtype, device, seed=0):
    # shift/scale as the DiT makes them: chunks of one (B, 6C) projection, so strided views.
    return modulated_layernorm_inputs((b, n, c), dtype, device, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 192, 128), (3, 37, 72), (1, 1, 1152), (2, 5, 1)])
def test_modulated_layernorm_forward_and_backward(shape, dtype, device, blocks):
    x, shift, scale = modln_inputs(*shape, dtype, device, seed=sum(shape))
    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    out = cmd_kernels.modulated_layernorm(*leaves, impl="triton")
    ref_leaves = [t.double().requires_grad_() for t in (x, shift, scale)]
    ref = modulated_layernorm_reference(*ref_leaves)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[dtype]
    if dtype == torch.bfloat16:
        assert rel_err(out, ref) <= 2 * rel_err(modulated_layernorm_reference(x, shift, scale), ref) + 1e-6
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out.backward(grad)
    ref.backward(grad.double())
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype
        if want.grad.norm() > 0:  # C == 1: LayerNorm output is 0, so d x and d scale vanish
            assert rel_err(got.grad, want.grad) <= TOL[dtype]


def test_modulated_layernorm_strided_x(device):
    x, shift, scale = modln_inputs(2, 40, 96, torch.float32, device, seed=3)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, N, C) with a token-major layout
    out = cmd_kernels.modulated_layernorm(x, shift, scale, impl="triton")
    assert rel_err(out, modulated_layernorm_reference(x.double(), shift.double(), scale.double())) <= 1e-5


def test_modulated_layernorm_opcheck(device):
    x, shift, scale = modln_inputs(2, 9, 24, torch.float32, device, seed=4)
    torch.library.opcheck(_modulated_layernorm_op, (x.requires_grad_(), shift.requires_grad_(),
                                                    scale.requires_grad_(), 1e-6))
    grad = torch.randn(2, 9, 24, device=device)
    torch.library.opcheck(_modulated_layernorm_backward_op, (grad, x.detach(), shift.detach(), scale.detach(), 1e-6))


def test_modulated_layernorm_backward_uses_many_programs_deterministically(device, monkeypatch):
    # Long sequences split over several programs per sample; their partial sums are added by torch.
    # (On a GPU the split follows the SM count; force one here so the interpreter runs it too.)
    monkeypatch.setattr(layernorm, "_bwd_chunks", lambda *args: 3)
    x, shift, scale = modln_inputs(2, 600, 64, torch.float32, device, seed=5)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
        cmd_kernels.modulated_layernorm(*leaves, impl="triton").sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    ref_leaves = [t.double().requires_grad_() for t in (x, shift, scale)]
    modulated_layernorm_reference(*ref_leaves).sum().backward()
    assert rel_err(grads[0][1], ref_leaves[1].grad) <= 1e-5 and rel_err(grads[0][2], ref_leaves[2].grad) <= 1e-5


def test_modulated_layernorm_bad_input(device):
    x = torch.randn(2, 3, 8, device=device)
    with pytest.raises(ValueError, match=r"\(2, 3, 8\), \(2, 7\)"):
        cmd_kernels.modulated_layernorm(x, torch.randn(2, 7, device=device), torch.randn(2, 7, device=device))
    assert math.isfinite(cmd_kernels.modulated_layernorm(x, x[:, 0], x[:, 1]).sum().item())


def test_modulated_layernorm_backward_of_an_empty_sequence_is_zero(device):
    # (outputs are NaN-poisoned: partial sums the launcher forgot to fill would read NaN)
    x, shift, scale = (t.requires_grad_() for t in modln_inputs(2, 0, 8, torch.float32, device, seed=6))
    cmd_kernels.modulated_layernorm(x, shift, scale, impl="triton").sum().backward()
    assert torch.equal(shift.grad, torch.zeros_like(shift)) and torch.equal(scale.grad, torch.zeros_like(scale))
