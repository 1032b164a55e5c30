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
