"""The tiled CPU path (flashtile.cpu) against the oracle, by FlashAttention's tolerance rule.

Oracle: reference.attention_ref(upcast=True) in float64; low-precision baseline: the same with
upcast=False. Outputs pass with factor 2, gradients with factor 3 (reference.check_close).

Most shapes here fit in one default tile (256 x 512), so the main matrix also runs with small odd tiles
to exercise the online softmax across key blocks, block skipping and partial edge tiles.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from flashtile import cpu
from flashtile.masks import visibility_mask
from oracle import assert_results_match_oracle

NEG_INF = float("-inf")


def _seed(*parts) -> int:
    """A per-test seed that is stable across runs (str hashes are randomised per process)."""
    return zlib.crc32(repr(parts).encode())


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """Run with the shipped tile sizes, and with small odd ones (many blocks, ragged edges)."""
    if request.param == "small_tiles":
        monkeypatch.setattr(cpu, "BLOCK_M", 24)
        monkeypatch.setattr(cpu, "BLOCK_N", 40)
    return request.param


def _make(seed, shape, dtype, *, transposed=False, scale_q=1.0):
    """Random q, k, v, dout in flash layout; ``transposed`` builds them [B, H, S, D] and transposes."""
    batch, s_q, s_k, h_q, h_kv, d, d_v = shape
    gen = torch.Generator().manual_seed(seed)

    def rnd(b, s, h, dim):
        if transposed:
            return torch.randn(b, h, s, dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, s, h, dim, generator=gen).to(dtype)

    q = rnd(batch, s_q, h_q, d) * scale_q
    k, v, dout = rnd(batch, s_k, h_kv, d), rnd(batch, s_k, h_kv, d_v), rnd(batch, s_q, h_q, d_v)
    return q.to(dtype), k, v, dout


def _check(q, k, v, dout, *, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None):
    """Forward and backward of the CPU path against the oracle; returns (out, lse, dq, dk, dv)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kw = dict(softmax_scale=scale, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi)
    out, lse = cpu.attention_forward(q, k, v, scale, causal, window, softcap, alibi)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    dq, dk, dv = cpu.attention_backward(dout, q, k, v, out, lse, scale, causal, window, softcap, alibi)
    assert (dq.dtype, dk.dtype, dv.dtype) == (q.dtype, k.dtype, v.dtype)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)

    assert_results_match_oracle(q, k, v, dout, (out, lse), (dq, dk, dv), **kw)
    return out, lse, dq, dk, dv


# batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 37, 37, 2, 2, 40, 40),
    (1, 113, 257, 4, 1, 59, 59),  # MQA, Sq < Sk
    (2, 257, 113, 8, 2, 72, 72),  # GQA 4:1, Sq > Sk (causal: fully masked rows)
    (1, 37, 113, 2, 2, 111, 111),
    (1, 113, 37, 2, 1, 256, 256),
    (1, 257, 257, 2, 1, 64, 40),  # Dv != D
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_shapes(tiles, shape, dtype, causal):
    seed = _seed(shape, dtype, causal, tiles)
    q, k, v, dout = _make(seed, shape, dtype, transposed=(seed % 2 == 0))
    _check(q, k, v, dout, causal=causal)


FEATURES = {
    "window_left_right": dict(window=(16, 5)),
    "window_left": dict(window=(30, -1)),
    "window_right": dict(window=(-1, 7)),
    "window_zero": dict(window=(0, 0)),
    "causal_window": dict(causal=True, window=(20, 3)),  # causal overrides right to 0
    "softcap": dict(softcap=4.0),
    "softcap_causal": dict(softcap=1.5, causal=True),
    "alibi": dict(alibi="heads"),
    "alibi_batch_causal": dict(alibi="batch_heads", causal=True),
    "all": dict(causal=True, window=(25, -1), softcap=3.0, alibi="batch_heads", softmax_scale=0.3),
}
FEATURE_SHAPES = [(2, 113, 257, 4, 1, 40, 40), (2, 257, 113, 4, 2, 72, 72)]


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_features(tiles, feature, shape, dtype):
    opts = dict(FEATURES[feature])
    seed = _seed(feature, shape, dtype, tiles)
    # Softcap only matters when scores are large; scale q up for those cases.
    q, k, v, dout = _make(seed, shape, dtype, scale_q=4.0 if "softcap" in opts else 1.0)
    alibi = opts.pop("alibi", None)
    if alibi is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        rows = (shape[0],) if alibi == "batch_heads" else ()
        opts["alibi"] = torch.rand(*rows, shape[3], generator=gen) * 0.5 + 0.01
    _check(q, k, v, dout, **opts)


def test_bf16_small():
    q, k, v, dout = _make(11, (1, 37, 64, 4, 2, 40, 40), torch.bfloat16)
    _check(q, k, v, dout, causal=True, softcap=5.0)


def test_strides():
    """Any strides: heads-first transposes, last-dim slices, and a last dim that is not stride 1."""
    gen = torch.Generator().manual_seed(12)
    base_q = torch.randn(2, 3, 41, 80, generator=gen, dtype=torch.float16)
    q = base_q[:, :, 2:39, 5:45].transpose(1, 2)  # [2, 37, 3, 40], no stride is "natural"
    k = torch.randn(2, 113, 3, 80, generator=gen, dtype=torch.float16)[..., ::2]  # last stride 2
    v = torch.randn(2, 3, 113, 40, generator=gen, dtype=torch.float16).transpose(1, 2)
    dout = torch.randn(2, 3, 37, 40, generator=gen, dtype=torch.float16).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, dout))
    out, lse, dq, dk, dv = _check(q, k, v, dout, causal=True)
    # Same numbers as with contiguous copies.
    out_c, lse_c = cpu.attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), 40**-0.5, True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (0, 0)), (True, (3, -1))])
def test_fully_masked_rows(tiles, causal, window):
    # Sq > Sk: with bottom-right alignment queries 0..(Sq - Sk - 1) see no key at all.
    shape = (2, 113, 37, 4, 2, 40, 40)
    q, k, v, dout = _make(21, shape, torch.float32)
    out, lse, dq, dk, dv = _check(q, k, v, dout, causal=causal, window=window)
    dead = ~visibility_mask(113, 37, causal, window).any(dim=1)
    assert dead.sum() == 113 - 37
    assert torch.all(out[:, dead] == 0) and torch.all(dq[:, dead] == 0)
    assert torch.all(lse[:, :, dead] == NEG_INF)
    assert torch.isfinite(lse[:, :, ~dead]).all()
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))


def test_poisoned_allocations(tiles, monkeypatch):
    """Outputs come from torch.empty; fill every fresh buffer with NaN to prove each element is written."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    q, k, v, dout = _make(23, (2, 113, 37, 4, 2, 40, 24), torch.float16)
    out, lse, dq, dk, dv = _check(q, k, v, dout, causal=True, window=(9, -1), softcap=2.0)
    assert not any(torch.isnan(t).any() for t in (out, lse, dq, dk, dv))


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_gives_nan_out(where):
    q, k, v, dout = _make(24, (1, 37, 37, 2, 1, 16, 16), torch.float32)
    target = {"q": q, "k": k, "v": v}[where]
    target[0, 5, 0, 3] = float("nan")
    out, lse = cpu.attention_forward(q, k, v, 0.25, True)
    if where == "q":  # only that query row of that head
        assert torch.isnan(out[0, 5, 0]).all() and torch.isnan(lse[0, 0, 5])
        assert not torch.isnan(out[0, 6:]).any() and not torch.isnan(out[0, :, 1]).any()
    else:  # every query that sees key 5, in both heads of the group
        assert torch.isnan(out[0, 5:]).any(dim=-1).all()
        if where == "k":  # earlier queries never score key 5 (with v, 0 * NaN in P @ V is NaN, as in torch)
            assert not torch.isnan(out[0, :5]).any()
    dq, dk, dv = cpu.attention_backward(dout, q, k, v, out, lse, 0.25, True)
    assert torch.isnan(dq).any() and torch.isnan(dk).any()


@pytest.mark.parametrize(
    "shape",
    [(0, 5, 7, 2, 1, 8, 8), (2, 0, 7, 2, 1, 8, 8), (2, 5, 0, 2, 1, 8, 8), (2, 0, 0, 2, 1, 8, 8)],
    ids=["B0", "Sq0", "Sk0", "S0"],
)
def test_empty(shape):
    q, k, v, dout = _make(25, shape, torch.float16)
    out, lse = cpu.attention_forward(q, k, v, 0.3)
    assert out.shape == (shape[0], shape[1], shape[3], shape[6]) and out.dtype == torch.float16
    assert lse.shape == (shape[0], shape[3], shape[1]) and lse.dtype == torch.float32
    assert torch.all(out == 0) and torch.all(lse == NEG_INF)
    dq, dk, dv = cpu.attention_backward(dout, q, k, v, out, lse, 0.3)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert all(torch.all(t == 0) for t in (dq, dk, dv))


@pytest.mark.parametrize(
    "budget,tiles_want",
    [(2 * 4 * 113 * 40, (2, 113, 40)), (100, (1, 16, 40))],
    ids=["two_batches_per_chunk", "block_m_floor"],
)
def test_tile_budget(monkeypatch, budget, tiles_want):
    """The score-tile budget splits the batch into chunks, or shrinks block_m down to its floor."""
    monkeypatch.setattr(cpu, "_TILE_ELEMS", budget)
    monkeypatch.setattr(cpu, "BLOCK_N", 40)
    assert cpu._tiles(5, 4, 113, 257) == tiles_want
    q, k, v, dout = _make(26, (5, 113, 257, 4, 2, 24, 24), torch.float32)
    _check(q, k, v, dout, causal=True, alibi=torch.rand(5, 4) * 0.3)


def test_deterministic(tiles):
    q, k, v, dout = _make(27, (2, 113, 257, 4, 1, 40, 40), torch.float16)
    runs = []
    for _ in range(2):
        out, lse = cpu.attention_forward(q, k, v, 0.2, True, (50, -1), 2.0)
        runs.append((out, lse, *cpu.attention_backward(dout, q, k, v, out, lse, 0.2, True, (50, -1), 2.0)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import os, resource, torch
    from flashtile import cpu
    torch.set_num_threads(min(4, os.cpu_count() or 1))  # beside parallel test workers: no oversubscription
    S, D = 16384, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, 1, D, generator=gen) for _ in range(3))
    cpu.attention_forward(q[:, :64], k[:, :64], v[:, :64], D ** -0.5)  # warm up allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out, lse = cpu.attention_forward(q, k, v, D ** -0.5)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    print((after - before) * 1024)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
def test_memory_linear_in_seqlen():
    """S = 16384: an S x S fp32 score matrix would need 1 GiB; the tiled forward must stay 4x below. (At
    S = 32768 the run took over 300 s beside 13 other test workers on a 16-core machine.)"""
    src = str(Path(cpu.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    growth = int(res.stdout.strip().splitlines()[-1])
    assert growth < 2**28, f"peak RSS grew by {growth / 2**20:.0f} MiB"
