"""Offsets past 2^31 elements: head strides, key strides and attn_mask row strides that the kernels'
32-bit index arithmetic would wrap (found by reading the kernels: the Triton path segfaulted under
the interpreter on the first case below; key_layout.py and the kernels' 64-bit head offsets fix it).

The tensors are views of one large allocation of which only the viewed elements are ever written,
so they need about 4-6 GB of address space but little memory (untouched pages stay unbacked).
"""

import pytest
import torch

import flashtile as ft
from conftest import DEVICE, HAS_GPU
from flashtile.errors import UnsupportedError
from flashtile.key_layout import INT32_LIMIT, keys_in_range
from test_attention import check_against_oracle

BACKENDS = ["triton"] if HAS_GPU else ["triton", "cpu"]
D = 16


def _storage(elements: int, dtype=torch.float16) -> torch.Tensor:
    try:
        return torch.empty(elements, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError) as e:  # a host or GPU without the address space
        pytest.skip(f"cannot reserve {elements * 2 / 2**30:.1f} GiB: {e}")


def _filled_view(store: torch.Tensor, shape, stride, offset: int) -> torch.Tensor:
    t = torch.as_strided(store, shape, stride, offset)
    t.copy_(torch.randn(shape, dtype=store.dtype, device=DEVICE))
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [D, 320], ids=["dense", "wide"])
def test_head_offsets_past_int32(d, backend):
    """[B, H, S, D] storage whose third head starts 2^31 + 128 elements in (h * stride_h wrapped)."""
    H, S, head_stride = 3, 40, 2**30 + 64
    store = _storage(2 * head_stride + 3 * S * d)
    q, k, v = (_filled_view(store, (1, S, H, d), (0, d, head_stride, 1), i * S * d).requires_grad_()
               for i in range(3))
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [D, 320], ids=["dense", "wide"])
def test_key_rows_past_int32(d, backend):
    """K and V rows 2^26 elements apart: 33 keys already span 2^31 (start_n * stride_s wrapped)."""
    Sq, Sk, H, row_stride = 24, 40, 2, 2**26
    store = _storage(Sk * row_stride)
    k = _filled_view(store, (1, Sk, H, d), (0, row_stride, d, 1), 0).requires_grad_()
    v = _filled_view(store, (1, Sk, H, d), (0, row_stride, d, 1), H * d).requires_grad_()
    q = torch.randn(1, Sq, H, d, dtype=torch.float16, device=DEVICE, requires_grad=True)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_mask_rows_past_int32(backend):
    """A float attn_mask whose query rows are 2^26 elements apart (the dK/dV loop's start_m * stride):
    the same results, bit for bit, as the same mask stored contiguously."""
    Sq, Sk, H = 40, 24, 2
    store = _storage(Sq * 2**26)
    mask = _filled_view(store, (Sq, Sk), (2**26, 1), 0)
    q, k, v = (torch.randn(1, H, n, D, dtype=torch.float16, device=DEVICE, requires_grad=True) for n in (Sq, Sk, Sk))
    dout = torch.randn(1, H, Sq, D, dtype=torch.float16, device=DEVICE)
    results = []
    with ft.use_backend(backend):
        for m in (mask, mask.contiguous()):
            out = ft.scaled_dot_product_attention(q, k, v, attn_mask=m)
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_keys_in_range_copies_only_what_it_must():
    """Meta tensors: strides without memory."""
    small = torch.empty(1, 8, 2, D, device="meta")
    assert keys_in_range(small, 8, varlen=False) is small
    long = torch.empty(1, 2**20, 32, 128, device="meta")  # 2^20 keys x 4096: rows wrap 32-bit offsets
    heads_first = keys_in_range(long, 2**20, varlen=False)
    assert heads_first.shape == long.shape and heads_first.stride()[1] == 128
    packed = torch.empty(2**20, 32, 128, device="meta")  # rows 4096 apart: the longest sequence decides
    assert keys_in_range(packed, INT32_LIMIT // 4096 - 1, varlen=True) is packed
    assert keys_in_range(packed, INT32_LIMIT // 4096, varlen=True).stride()[0] == 128
    with pytest.raises(UnsupportedError, match="32-bit"):  # 2^24 keys x 128 per head: no layout fits
        keys_in_range(torch.empty(1, 2**24, 2, 128, device="meta"), 2**24, varlen=False)
