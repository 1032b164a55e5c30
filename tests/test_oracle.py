"""The tolerance rule's floors (tests/oracle.py) must not hide the errors the tests exist to catch."""

import pytest
import torch

from flashtile.reference import attention_ref
from oracle import gemm_grad_floor, value_sum_floor


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to tf32's 10 mantissa bits (what a kernel that wrongly ran fp32 dots in tf32 reads)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("shape", [(2, 197, 1, 1, 221), (1, 66, 1, 1, 53), (1, 1023, 513, 2, 256),
                                   (2, 300, 300, 2, 64), (1, 40, 50, 1, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp32_dv_floor_is_far_below_a_tf32_error(shape):
    """value_sum_floor (fp32 dV): the one-key shapes the fuzz found and ordinary ones. Rounding dO to
    tf32 alone moves dV by 20-60x the floor on these, so the floor cannot pass a tf32 backward."""
    B, Sq, Sk, H, D = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, n, H, D, dtype=torch.float64, requires_grad=True) for n in (Sq, Sk, Sk))
    dout = torch.randn(B, Sq, H, D)
    out, lse = attention_ref(q, k, v, causal=Sq == Sk)
    (dv,) = torch.autograd.grad(out, v, dout.double(), retain_graph=True)
    (dv_tf32,) = torch.autograd.grad(out, v, _tf32(dout).double())
    floor = value_sum_floor(dv, out.float(), lse)
    assert 0 < 10 * floor < float((dv_tf32 - dv).abs().max())


@pytest.mark.parametrize("shape", [(1, 17, 1), (7, 33, 127), (64, 48, 32), (33, 7, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_gemm_grad_floor_is_far_below_a_tf32_error(shape, activation):
    """gemm_grad_floor (fp32, the found short sum's shape and ordinary ones): reading b as tf32 in the
    backward alone moves da by far more than the floor, so the floor cannot pass a tf32 backward."""
    M, N, K = shape
    torch.manual_seed(0)
    a, b, bias = torch.randn(M, K, dtype=torch.float64), torch.randn(K, N, dtype=torch.float64), torch.randn(N)
    act = torch.nn.functional.gelu if activation == "gelu" else torch.nn.functional.silu
    dout = torch.randn(M, N)
    z = (a @ b + bias.double()).requires_grad_(True)
    (grad_z,) = torch.autograd.grad(act(z), z, dout.double())
    da, da_tf32 = grad_z @ b.mT, grad_z @ _tf32(b.float()).double().mT
    floor_da, _, _ = gemm_grad_floor(a.float(), b.float(), bias, 1.0, act, dout, torch.float32)
    assert 0 < 10 * floor_da < float((da_tf32 - da).abs().max())
