"""scaled_dot_product_attention(attn_mask=...) exactly as torch defines it: bool or additive float bias."""

import pytest
import torch

import flashtile as ft
from conftest import DEVICE, HAS_GPU

BACKENDS = ["triton"] if HAS_GPU else ["triton", "cpu"]
B, H, Sq, Sk, D = 2, 3, 37, 53, 24


def _mask(shape, kind):
    if kind == "bool":
        m = torch.rand(*shape, device=DEVICE) > 0.3
        return m
    return torch.randn(*shape, device=DEVICE) * 2.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [(Sq, Sk), (B, 1, Sq, Sk), (1, H, 1, Sk), (B, H, Sq, Sk)],
                         ids=["2d", "batch", "key-row", "full"])
def test_attn_mask_matches_torch(shape, kind, backend):
    q = torch.randn(B, H, Sq, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, H, Sk, D, device=DEVICE, requires_grad=True)
    v = torch.randn(B, H, Sk, D, device=DEVICE, requires_grad=True)
    mask = _mask(shape, kind)
    if kind == "bool":
        mask[..., 0] = True  # torch's math gives NaN on fully masked rows; keep every row alive here
    with ft.use_backend(backend):
        out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    md = mask if kind == "bool" else mask.double()
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=md, scale=0.3)
    assert (out.double() - ref).abs().max() < 1e-5
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero(backend):
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.rand(20, 20, device=DEVICE) > 0.5
    mask[3] = False
    with ft.use_backend(backend):
        out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        dq, = torch.autograd.grad(out.sum(), (q,))
    assert torch.all(out[:, :, 3] == 0) and torch.isfinite(out).all() and torch.isfinite(dq).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(Sq, Sk), (B, 1, Sq, Sk), (1, H, 1, Sk), (B, H, Sq, Sk)],
                         ids=["2d", "batch", "key-row", "full"])
def test_bias_gradient_matches_torch(shape, backend):
    """A float attn_mask that requires grad gets torch's gradient: dS summed over its broadcast dims."""
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, requires_grad=True) for S in (Sq, Sk, Sk))
    bias = torch.randn(*shape, device=DEVICE) * 2.0
    bias[..., 1::7] = float("-inf")  # hidden keys: zero gradient there, as in torch
    bias.requires_grad_()
    with ft.use_backend(backend):
        out = ft.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    _check_out_and_grads(out, q, k, v, bias)


def _check_out_and_grads(out, q, k, v, bias):
    """out = SDPA(q, k, v, attn_mask=bias, scale=0.3) and the gradients of all four against float64 torch."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], scale=0.3)
    assert (out.double() - ref).abs().max() < 1e-5
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), dout)
    want = torch.autograd.grad(ref, leaves, dout.double())
    assert got[3].shape == bias.shape and got[3].dtype == bias.dtype
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(Sq, Sk), (1, H, 1, Sk)], ids=["2d", "key-row"])
def test_bias_gradient_under_torch_compile(shape):
    """fullgraph torch.compile: the bias gradient comes from the flashtile::attention_bwd_bias op."""
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, requires_grad=True) for S in (Sq, Sk, Sk))
    bias = (torch.randn(*shape, device=DEVICE) * 2.0).requires_grad_()

    def f(q, k, v, bias):
        return ft.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)

    with ft.use_backend("triton"):
        out = torch.compile(f, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")(q, k, v, bias)
    _check_out_and_grads(out, q, k, v, bias)


def test_bias_gradient_op_passes_opcheck():
    from flashtile import ops

    q, k, v = (torch.randn(1, S, 2, 16, device=DEVICE) for S in (13, 21, 21))
    bias = torch.randn(1, 2, 13, 21, device=DEVICE)
    out, lse = ops.attention_fwd(q, k, v, 0.25, None, None, 0.0, None, None, None, 0, 0, bias, 0.0, 0, 0,
                                 "triton", [], [])
    args = (torch.randn_like(out), q, k, v, out, lse, 0.25, None, None, 0.0, None, None, None, 0, 0, bias, 0.0, 0, 0,
            "triton", [], [])
    torch.library.opcheck(ops.attention_bwd_bias, args)


def test_bias_gradient_in_half_precision_follows_the_rule():
    """fp16 inputs with an fp16 bias: FlashAttention's tolerance rule on the bias gradient too."""
    q, k, v = (torch.randn(1, 2, S, 40, device=DEVICE, dtype=torch.float16, requires_grad=True) for S in (45, 61, 61))
    bias = torch.randn(1, 2, 45, 61, device=DEVICE, dtype=torch.float16).requires_grad_()
    with ft.use_backend("triton"):
        out = ft.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, bias, dout)[0]

    def torch_grad(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, bias)]
        o = torch.nn.functional.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
        return torch.autograd.grad(o, leaves[3], dout.to(dtype))[0]

    ref, low = torch_grad(torch.float64), torch_grad(torch.float16)
    assert (got.double() - ref).abs().max() <= 3 * (low.double() - ref).abs().max() + 1e-5
