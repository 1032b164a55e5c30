"""The oracle itself: reference.attention_ref against independent computations, plus masks and check_close.

Independent computations: torch's scaled_dot_product_attention (float64, explicit boolean mask, heads
repeated by hand for GQA) and, for softcap / ALiBi, a per-element Python loop of the formula.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from flashtile import masks
from flashtile.reference import attention_ref, check_close


def _inputs(seed, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v=None, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim_v, generator=gen, dtype=dtype)
    return q, k, v


def _rule(i, j, seqlen_q, seqlen_k, causal, window):
    """The visibility rule written out once more, per element."""
    left, right = window
    if causal:
        right = 0
    d = i + seqlen_k - seqlen_q
    return (left < 0 or j >= d - left) and (right < 0 or j <= d + right)


# ---------------------------------------------------------------------------------------------- masks

MASK_CASES = [
    (s_q, s_k, causal, window)
    for s_q, s_k in [(1, 1), (7, 7), (5, 11), (11, 5), (1, 9), (9, 1)]
    for causal, window in [
        (False, (-1, -1)), (True, (-1, -1)), (False, (2, 1)), (False, (0, 0)), (True, (3, -1)),
        (False, (-1, 2)), (False, (4, -1)), (True, (1, 5)),
    ]
]


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window", MASK_CASES)
def test_visibility_mask_matches_rule(seqlen_q, seqlen_k, causal, window):
    m = masks.visibility_mask(seqlen_q, seqlen_k, causal, window)
    assert m.dtype == torch.bool and m.shape == (seqlen_q, seqlen_k)
    want = torch.tensor(
        [[_rule(i, j, seqlen_q, seqlen_k, causal, window) for j in range(seqlen_k)] for i in range(seqlen_q)],
        dtype=torch.bool,
    ).reshape(seqlen_q, seqlen_k)
    assert torch.equal(m, want)
    # A sub-tile is the same slice of the full mask.
    sub = masks.visibility_mask(seqlen_q, seqlen_k, causal, window, q_start=1, q_len=seqlen_q - 1, k_start=2)
    assert torch.equal(sub, want[1:, 2:])


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window", MASK_CASES)
def test_key_block_range_and_full_blocks(seqlen_q, seqlen_k, causal, window):
    full = masks.visibility_mask(seqlen_q, seqlen_k, causal, window)
    for q_lo in range(seqlen_q):
        for q_hi in range(q_lo + 1, seqlen_q + 1):
            k_lo, k_hi = masks.key_block_range(q_lo, q_hi, seqlen_q, seqlen_k, causal, window)
            assert 0 <= k_lo <= k_hi <= seqlen_k
            seen = full[q_lo:q_hi].any(dim=0).nonzero().flatten()
            if seen.numel() == 0:
                assert k_lo == k_hi
            else:  # the range is exactly the visible span (the rule is monotone, so it has no holes)
                assert (k_lo, k_hi) == (int(seen.min()), int(seen.max()) + 1)
            for b_lo in range(0, seqlen_k, 3):
                b_hi = min(b_lo + 4, seqlen_k)
                fv = masks.block_fully_visible(q_lo, q_hi, b_lo, b_hi, seqlen_q, seqlen_k, causal, window)
                assert fv == bool(full[q_lo:q_hi, b_lo:b_hi].all())
    k_lo, k_hi = masks.key_block_range(3, 3, seqlen_q, seqlen_k, causal, window)  # no queries
    assert k_lo == k_hi


# ------------------------------------------------------------------------------------------ vs SDPA

SDPA_CASES = [
    # batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v
    (1, 1, 1, 1, 1, 1, 1),
    (2, 37, 37, 4, 4, 40, 40),
    (2, 37, 113, 4, 1, 59, 59),  # MQA, Sq < Sk
    (1, 113, 37, 8, 2, 72, 72),  # GQA 4:1, Sq > Sk: causal rows fully masked
    (1, 57, 64, 6, 3, 16, 24),  # Dv != D
]
MASK_KINDS = [(False, (-1, -1)), (True, (-1, -1)), (False, (8, 3)), (True, (10, -1))]


def _sdpa(q, k, v, scale, visible):
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("shape", SDPA_CASES)
@pytest.mark.parametrize("causal,window", MASK_KINDS)
def test_against_sdpa(shape, causal, window):
    batch, s_q, s_k, h_q, h_kv, d, d_v = shape
    q, k, v = _inputs(zlib.crc32(repr((shape, causal, window)).encode()), batch, s_q, s_k, h_q, h_kv, d, d_v)
    scale = 0.7 / math.sqrt(d)
    out, lse = attention_ref(q, k, v, softmax_scale=scale, causal=causal, window_size=window)
    assert out.dtype == torch.float64 and out.shape == (batch, s_q, h_q, d_v)
    assert lse.shape == (batch, h_q, s_q)
    visible = masks.visibility_mask(s_q, s_k, causal, window)
    live = visible.any(dim=1)  # SDPA gives NaN on fully masked rows; those are tested separately
    want = _sdpa(q, k, v, scale, visible)
    torch.testing.assert_close(out[:, live], want[:, live], rtol=1e-12, atol=1e-12)
    assert torch.all(out[:, ~live] == 0)
    # lse = logsumexp of the masked scores.
    group = h_q // h_kv
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, dim=2)) * scale
    want_lse = scores.masked_fill(~visible, float("-inf")).logsumexp(dim=-1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_default_scale_and_gradients_against_sdpa():
    q, k, v = _inputs(1, 2, 29, 41, 4, 2, 24)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    visible = masks.visibility_mask(29, 41, True, (-1, -1))
    want = _sdpa(qs, ks, vs, None, visible)  # SDPA's default scale is also 1/sqrt(D)
    out, _ = attention_ref(qr, kr, vr, causal=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    want.backward(dout)
    out.backward(dout)
    for a, b in ((qr, qs), (kr, ks), (vr, vs)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- softcap / ALiBi, by hand

def _naive(q, k, v, scale, causal, window, softcap, slopes):
    """Per-element Python loops over the documented formula (float64 math)."""
    batch, s_q, h_q, d = q.shape
    s_k, h_kv, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = h_q // h_kv
    out = torch.zeros(batch, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((batch, h_q, s_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(h_q):
            hk = h // group
            for i in range(s_q):
                row = []
                for j in range(s_k):
                    if not _rule(i, j, s_q, s_k, causal, window):
                        continue
                    s = scale * float(q[b, i, h] @ k[b, j, hk])
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        slope = float(slopes[h] if slopes.dim() == 1 else slopes[b, h])
                        s -= slope * abs(i + s_k - s_q - j)
                    row.append((j, s))
                if not row:
                    continue
                m = max(s for _, s in row)
                total = sum(math.exp(s - m) for _, s in row)
                lse[b, h, i] = m + math.log(total)
                for j, s in row:
                    out[b, i, h] += math.exp(s - m) / total * v[b, j, hk]
    return out, lse


@pytest.mark.parametrize(
    "causal,window,softcap,slopes_kind",
    [
        (False, (-1, -1), 2.0, None),
        (True, (-1, -1), 0.5, None),
        (False, (-1, -1), 0.0, "heads"),
        (True, (-1, -1), 0.0, "batch_heads"),
        (False, (2, 3), 3.0, "heads"),
        (True, (4, -1), 1.5, "batch_heads"),
    ],
)
def test_softcap_alibi_against_formula(causal, window, softcap, slopes_kind):
    batch, s_q, s_k, h_q, h_kv, d = 2, 5, 8, 4, 2, 3
    q, k, v = _inputs(7, batch, s_q, s_k, h_q, h_kv, d)
    q = q * 3  # large scores, so the softcap actually bends them
    slopes = None
    if slopes_kind == "heads":
        slopes = torch.rand(h_q, dtype=torch.float32) + 0.1
    elif slopes_kind == "batch_heads":
        slopes = torch.rand(batch, h_q, dtype=torch.float32) + 0.1
    scale = 0.9
    out, lse = attention_ref(
        q, k, v, softmax_scale=scale, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes
    )
    want_out, want_lse = _naive(q, k, v, scale, causal, window, softcap, slopes)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)


def test_gradcheck_with_all_features():
    """Autograd through the oracle is the true derivative, fully masked rows and softcap included."""
    q, k, v = _inputs(3, 1, 6, 4, 2, 1, 3)  # causal, Sq > Sk: two fully masked rows
    slopes = torch.tensor([0.3, 0.7])

    def f(q, k, v):
        out, lse = attention_ref(q, k, v, causal=True, window_size=(2, -1), softcap=1.3, alibi_slopes=slopes)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v)))


# ------------------------------------------------------------------------------- fully masked rows

@pytest.mark.parametrize("upcast", [True, False])
def test_fully_masked_rows(upcast):
    dtype = torch.float64 if upcast else torch.float32
    # causal with Sq > Sk: queries 0..3 see no key; window (0, 0) with the same offset likewise.
    for causal, window in [(True, (-1, -1)), (False, (0, 0))]:
        q, k, v = (t.to(dtype).requires_grad_() for t in _inputs(5, 2, 7, 3, 2, 1, 8))
        out, lse = attention_ref(q, k, v, causal=causal, window_size=window, softcap=2.0, upcast=upcast,
                                 alibi_slopes=torch.tensor([0.5, 0.25]))
        assert torch.all(out[:, :4] == 0)
        assert torch.all(lse[:, :, :4] == float("-inf"))
        assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 4:]).all()
        # Backward through both outputs, lse included: finite, and zero for the masked rows.
        (out * torch.randn_like(out)).sum().backward(retain_graph=True)
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        assert torch.all(q.grad[:, :4] == 0)
        lse_live = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        lse_live.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_empty_keys_all_rows_masked():
    q, k, v = _inputs(2, 1, 3, 0, 2, 2, 4)
    out, lse = attention_ref(q, k, v)
    assert out.shape == (1, 3, 2, 4) and torch.all(out == 0)
    assert torch.all(lse == float("-inf"))


# --------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    q, k, v = _inputs(4, 1, 9, 11, 2, 1, 8, dtype=dtype)
    out, lse = attention_ref(q, k, v, causal=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    low, low_lse = attention_ref(q, k, v, causal=True, upcast=False)
    assert low.dtype == dtype and low_lse.dtype == torch.float32
    err = (low.double() - out).abs().max().item()
    assert 0 <= err < {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]


def test_nan_propagates():
    q, k, v = _inputs(6, 1, 4, 5, 1, 1, 3)
    q[0, 2, 0, 1] = float("nan")
    out, lse = attention_ref(q, k, v)
    assert torch.isnan(out[0, 2]).all() and torch.isnan(lse[0, 0, 2])
    assert not torch.isnan(out[0, [0, 1, 3]]).any()


# ---------------------------------------------------------------------------------- check_close

def test_check_close_rule():
    ref = torch.tensor([1.0, 2.0, float("-inf")], dtype=torch.float64)
    low = torch.tensor([1.01, 2.0, float("-inf")], dtype=torch.float32)
    ok, err, bound = check_close(torch.tensor([1.015, 2.0, float("-inf")]), ref, low)
    assert ok and err == pytest.approx(0.015, abs=1e-6) and bound == pytest.approx(0.02 + 1e-5, abs=1e-6)
    ok, err, _ = check_close(torch.tensor([1.03, 2.0, float("-inf")]), ref, low)
    assert not ok and err == pytest.approx(0.03, abs=1e-6)
    # atol lets an exact-ish result pass when the low-precision baseline happens to be exact.
    assert check_close(ref + 1e-6, ref, ref)[0]
    # NaN where the oracle is finite fails; an infinity where it is finite fails.
    assert not check_close(torch.tensor([float("nan"), 2.0, float("-inf")]), ref, low)[0]
    assert not check_close(torch.tensor([1.0, 2.0, 0.0]), ref, low)[0]
    # NaN where the oracle is NaN too is not an error.
    nan_ref = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
    assert check_close(torch.tensor([float("nan"), 1.0]), nan_ref, nan_ref)[0]
    # Gradients use factor 3.
    assert check_close(torch.tensor([1.025, 2.0, float("-inf")]), ref, low, factor=3.0)[0]
    with pytest.raises(ValueError):
        check_close(torch.zeros(2), torch.zeros(3), torch.zeros(3))
    assert check_close(torch.zeros(0), torch.zeros(0), torch.zeros(0)) == (True, 0.0, 1e-5)
