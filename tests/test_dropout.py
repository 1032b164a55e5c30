"""Dropout: the exact function (checked with the returned keep pattern), reproducibility, statistics."""

import pytest
import torch
import triton
import triton.language as tl

import flashtile as ft
from flashtile import dropout
from flashtile.kernels.common import dropout_col_keys, dropout_keep, dropout_row_keys, dropout_tile_keep
from flashtile.reference import attention_ref
from conftest import DEVICE, HAS_GPU
from oracle import assert_matches_oracle

BACKENDS = ["triton"] if HAS_GPU else ["triton", "cpu"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if HAS_GPU else [torch.float16, torch.float32]


def _qkv(B, Sq, Sk, Hq, Hkv, D, dtype):
    mk = lambda S, H: torch.randn(B, S, H, D, device=DEVICE, dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(Sq, Hq), mk(Sk, Hkv), mk(Sk, Hkv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw, D", [(dict(), 40), (dict(causal=True), 40), (dict(window_size=(7, 3), softcap=2.0), 40),
                                   (dict(causal=True), 128), (dict(causal=True), 96)],
                         ids=["plain", "causal", "window-softcap", "causal-d128", "causal-d96"])
def test_dropout_is_the_exact_function_of_its_pattern(kw, D, dtype, backend):
    """D = 128 and 96: the causal dK/dV tiles of one 128-column chunk and of 64 + 32 (tuning.backward_config)."""
    q, k, v = _qkv(2, 45, 61, 4, 2, D, dtype)
    p = 0.3
    with ft.use_backend(backend):
        out, lse, keep = ft.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **kw)
    assert keep.dtype == torch.bool and keep.shape == (2, 4, 45, 61)
    assert_matches_oracle((q, k, v), (out, lse),
                          attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, upcast=True, **kw),
                          attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, upcast=False, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result(backend):
    q, k, v = (t.detach() for t in _qkv(1, 33, 33, 2, 2, 16, torch.float32))
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        with ft.use_backend(backend):
            outs.append(ft.flash_attn_func(q, k, v, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_kernels_and_torch_agree_bit_for_bit():
    """Both backends produce the same pattern for the same seed (one RNG definition, two forms)."""
    q, k, v = (t.detach() for t in _qkv(1, 20, 20, 2, 1, 16, torch.float32))
    pats = []
    for backend in BACKENDS + ["reference"]:
        torch.manual_seed(3)
        with ft.use_backend(backend):
            pats.append(ft.flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)[2])
    assert all(torch.equal(pats[0], p) for p in pats[1:])


def test_keep_rate_and_mean_output_are_preserved():
    keep = dropout.pattern(4, 8, 128, 128, (12345, 678), 0.2, torch.device("cpu"))
    assert abs(keep.float().mean().item() - 0.8) < 0.005
    # independent bits: per-position keep rates over the 32 (b, h) samples spread like a binomial
    binomial_std = (0.8 * 0.2 / 32) ** 0.5
    assert abs(keep.float().mean(dim=(0, 1)).std().item() - binomial_std) < 0.01
    q, k, v = (t.detach() for t in _qkv(1, 32, 32, 1, 1, 16, torch.float32))
    with ft.use_backend("cpu"):
        dense = ft.flash_attn_func(q.cpu(), k.cpu(), v.cpu())
        mean = sum(ft.flash_attn_func(q.cpu(), k.cpu(), v.cpu(), dropout_p=0.2) for _ in range(200)) / 200
    assert (mean - dense).abs().mean() < 0.05 * dense.abs().mean() + 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_dropout(backend):
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEVICE) for _ in range(3))
    torch.manual_seed(1)
    with ft.use_backend(backend):
        a = ft.scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True)
    torch.manual_seed(1)
    seed = dropout.new_seed()
    keep = dropout.pattern(1, 2, 24, 24, seed, 0.4, q.device)
    ref, _ = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, dropout_p=0.4,
                           dropout_mask=keep)
    assert (a.transpose(1, 2).double() - ref.double()).abs().max() < 1e-5


def test_dropout_errors():
    q, k, v = _qkv(1, 8, 8, 1, 1, 16, torch.float32)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="dropout_p"):
            ft.flash_attn_func(q, k, v, dropout_p=bad)
    # past dropout.MAX_ROWS query rows (batch x heads x queries) the kernels' 32-bit row numbers repeat
    many_q, many_k = (t[:1, :1, :1].expand(2**17, 2**15 + 1, 1, 16) for t in (q, k))
    with pytest.raises(NotImplementedError, match="dropout_p > 0 with 4295098368 query rows"):
        ft.flash_attn_func(many_q, many_k, many_k, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="dropout_p > 0"):
        ft.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (many_q, many_k, many_k)), dropout_p=0.1)


@triton.jit
def _keep_kernel(HeadRow, Out, OutQ, OutT, seed_lo, seed_hi, thr, N: tl.constexpr, M: tl.constexpr):
    head_row = tl.load(HeadRow).to(tl.uint32)  # as dropout_head_row gives it
    cols = tl.arange(0, N)
    # [queries, keys] as the forward and dQ salt them: seed_lo in the row keys, keys as two 32-key tiles
    # at 0 and 32 (the tile's offset goes into the row keys: dropout_tile_keep)
    row_keys = dropout_row_keys(head_row, tl.arange(0, M), seed_hi, seed_lo)
    half = tl.arange(0, N // 2)
    for start in tl.static_range(0, N, N // 2):
        keep = dropout_tile_keep(row_keys, start, half, thr)
        tl.store(Out + tl.arange(0, M)[:, None] * N + start + half[None, :], keep.to(tl.int8))
    # [queries, keys] as dQ forms it: the keys' part of the whole tile, per tile
    keep_q = dropout_keep(row_keys, dropout_col_keys(cols, 0), thr, False)
    tl.store(OutQ + tl.arange(0, M)[:, None] * N + cols[None, :], keep_q.to(tl.int8))
    # [keys, queries] as dK/dV salts them: seed_lo in the keys' part
    keep_t = dropout_keep(dropout_row_keys(head_row, tl.arange(0, M), seed_hi, 0), dropout_col_keys(cols, seed_lo),
                          thr, True)
    tl.store(OutT + cols[:, None] * M + tl.arange(0, M)[None, :], keep_t.to(tl.int8))


# row numbers from 0 to the last one below dropout.MAX_ROWS (row + seed_hi wraps past 2^32 in uint32 and
# must agree with torch's int64 form); 64 keys cover both halves of four pairs of runs
@pytest.mark.parametrize("head_row", [0, 12345, 2**31 - 3, 2**31 + 77, 2**32 - 8])
def test_kernel_hash_matches_torch(head_row):
    """kernels/common.py:dropout_row_keys computes the row keys as a multiply-add and dropout_keep mixes
    k + j + seed_lo in uint32, its first multiply applied to the row part and the key part apart, with
    seed_lo on the row side (forward, dQ) or the key side (dK/dV); all three kernels' forms must give
    dropout.keep_bits' bits exactly, in both tile orientations, for row numbers up to 2^32 (too many
    rows for a full attention test, so the helpers run alone in a small kernel)."""
    M, N, p, seed = 8, 64, 0.3, (123457, 2**31 - 5)
    out = torch.empty(M, N, dtype=torch.int8, device=DEVICE)
    out_q = torch.empty(M, N, dtype=torch.int8, device=DEVICE)
    out_t = torch.empty(N, M, dtype=torch.int8, device=DEVICE)
    base = torch.tensor([head_row], dtype=torch.int64, device=DEVICE)
    _keep_kernel[(1,)](base, out, out_q, out_t, seed[0], seed[1], dropout.threshold(p), N=N, M=M)
    rows = head_row + torch.arange(M, device=DEVICE, dtype=torch.int64)[:, None]
    want = dropout.keep_bits(rows, torch.arange(N, device=DEVICE)[None, :], seed, p)
    assert torch.equal(out.bool(), want) and torch.equal(out_q.bool(), want)
    assert torch.equal(out_t.bool(), want.T)


def test_keep_bits_are_uncorrelated_between_neighbours():
    """The pattern's bits of neighbouring elements (the pair j, j + 8 shares one hash; rows are keyed
    by consecutive numbers) are uncorrelated: |corr| within 4 standard errors of 0."""
    keep = dropout.pattern(2, 4, 256, 256, (97531, 24680), 0.5, torch.device("cpu")).float()
    for a, b in ((keep[..., :, :-8], keep[..., :, 8:]), (keep[..., :-1, :], keep[..., 1:, :]),
                 (keep[..., :, :-1], keep[..., :, 1:]), (keep[:, :-1], keep[:, 1:])):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        corr = (a * b).mean() / (a.std() * b.std())
        assert abs(corr.item()) < 4 / a.numel() ** 0.5, corr.item()
