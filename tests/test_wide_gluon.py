"""The Gluon wide forward and backward (kernels/attention_wide_gluon.py, attention_wide_gluon_bwd.py, sm_90
only) against the oracle, and their rules.

On an H200 every case checks that the Gluon kernels ran (or, for the features they lack, that the
split-D kernels did) and compares out, lse and the gradients with the float64 / float32 oracle under
FlashAttention's rule. Without a GPU (CI) the rules and the launchers' refusals are checked: the
interpreter cannot run Gluon.
"""

import pytest
import torch

import flashtile as ft
from conftest import DEVICE, HAS_GPU
from flashtile import dispatch, wide_gluon_launch, wide_launch
from flashtile.kernels.attention_wide_gluon import slice_tiles
from test_attention import check_against_oracle
from test_wide import _make

HOPPER = HAS_GPU and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon kernel is written for sm_90 (wgmma, TMA)")

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v): head dims in [321, 1024] (some
# padded to 64 columns first; Dv > 768 runs two O slices), odd lengths, Sq != Sk both ways, GQA / MQA, Dqk != Dv
SHAPES = [
    (1, 1, 1, 1, 1, 512, 512),
    (1, 100, 130, 2, 1, 384, 384),  # one O slice of 256 + 128 columns
    (2, 65, 65, 2, 2, 333, 333),  # padded to 384
    (1, 77, 60, 2, 1, 300, 384),
    (2, 37, 37, 2, 1, 512, 512),
    (1, 257, 513, 4, 2, 448, 448),
    (2, 300, 113, 2, 2, 400, 400),
    (1, 113, 300, 3, 1, 385, 385),
    (1, 640, 640, 2, 1, 480, 480),
    (1, 200, 333, 2, 2, 512, 448),
    (1, 129, 77, 2, 1, 448, 333),
    (1, 64, 257, 2, 2, 300, 512),
    (1, 300, 257, 2, 1, 576, 512),  # MLA's pair: Q streamed with K
    (1, 129, 77, 2, 1, 700, 333),  # padded to 704 / 384
    (1, 100, 100, 2, 2, 768, 512),
    (2, 77, 130, 2, 1, 576, 576),  # one O slice of 512 + 64 columns (the 64 parked in shared memory)
    (1, 150, 150, 4, 1, 640, 640),  # 512 + 128
    (1, 130, 170, 4, 2, 704, 704),  # 512 + 256 (Dv padded), 3 stages
    (1, 50, 80, 2, 2, 600, 200),  # one of 256 (Dv padded)
    (1, 70, 90, 2, 1, 512, 100),  # one of 128
    (2, 33, 40, 2, 1, 400, 64),  # one of 64
    (1, 96, 200, 2, 2, 768, 768),  # one slice of 512 + 256
    (1, 64, 99, 2, 1, 832, 700),  # one slice of 512 + 256 (Dv padded)
    (1, 90, 120, 2, 2, 320, 832),  # slices of 512 and 256 + 64
    (1, 200, 300, 2, 2, 1000, 1000),  # two of 512
    (1, 33, 65, 1, 1, 1024, 1024),
]


@pytest.fixture
def gluon_runs(monkeypatch):
    """The list of gluon_forward's answers (True: the Gluon kernel ran) during a test."""
    answers = []
    real = wide_launch.gluon_forward
    monkeypatch.setattr(wide_launch, "gluon_forward", lambda *a, **kw: answers.append(real(*a, **kw)) or answers[-1])
    return answers


@pytest.fixture
def gluon_backward_runs(monkeypatch):
    """How many backward calls ran the Gluon backward kernel during a test."""
    runs = []
    real = wide_launch.gluon_backward
    monkeypatch.setattr(wide_launch, "gluon_backward", lambda *a, **kw: runs.append(real(*a, **kw)))
    return runs


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(shape, causal, dtype, gluon_runs, gluon_backward_runs):
    q, k, v = _make(shape, dtype)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=causal)
    assert gluon_runs == [True] and len(gluon_backward_runs) == 1


# shapes whose slices use PARKED_TILES = 3, and whether one of them is left with 2 ring stages (832..960
# columns), the ones NARROW_CHUNKS changes
MORE_PARKED = [
    ((1, 129, 77, 2, 1, 700, 333), False),  # 704 = 512 + 128 + 64
    ((1, 64, 99, 2, 1, 832, 700), True),  # 832 = 512 + 256 + 64 (three Z streams)
    ((1, 90, 120, 2, 2, 320, 832), True),
    ((1, 100, 140, 2, 1, 896, 896), True),  # 512 + 256 + 128
    ((2, 70, 333, 3, 1, 900, 900), True),  # padded to 960 = 512 + 256 + 128 + 64
    ((1, 257, 129, 2, 2, 960, 512), True),
    ((1, 33, 65, 2, 1, 1000, 1000), False),  # still two slices of 512
]


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape, narrow", [(shape, False) for shape, _ in MORE_PARKED] +
                         [(shape, True) for shape, two_stages in MORE_PARKED if two_stages],
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else ("chunks32" if x else "chunks64"))
def test_slices_with_more_parked_tiles(shape, narrow, causal, monkeypatch, gluon_runs, gluon_backward_runs):
    """PARKED_TILES = 3: one slice of up to 960 columns, its tiles past 512 parked in shared memory; with
    NARROW_CHUNKS, the slices left with 2 ring stages (832 and wider) stream 32-column chunks."""
    monkeypatch.setattr(wide_gluon_launch, "PARKED_TILES", 3)
    monkeypatch.setattr(wide_gluon_launch, "NARROW_CHUNKS", narrow)
    q, k, v = _make(shape, torch.bfloat16)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=causal)
    assert gluon_runs == [True] and len(gluon_backward_runs) == 1


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 90, 70, 2, 1, 257, 257), (2, 70, 130, 2, 2, 320, 320), (1, 100, 80, 3, 1, 320, 64),
                                   (1, 65, 300, 2, 2, 128, 320)], ids=lambda s: "x".join(map(str, s)))
def test_backward_where_the_forward_is_dense(shape, causal, gluon_runs, gluon_backward_runs):
    """Head dims 257..320: the dense forward, the Gluon backward (from the dense forward's out and lse)."""
    q, k, v = _make(shape, torch.bfloat16)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=causal)
    assert not any(gluon_runs) and len(gluon_backward_runs) == 1


@needs_hopper
def test_backward_is_deterministic_and_nan_stays_in_its_batch(gluon_backward_runs):
    """Two backward calls give the same bits (no atomics); a NaN in one batch's V reaches that batch's
    dQ and dK (through dP = dO V^T), and no other batch's gradients (dV = P^T dO does not read V)."""
    q, k, v = _make((2, 150, 170, 4, 2, 512, 512), torch.bfloat16)
    dout = torch.randn(2, 150, 4, 512, device=DEVICE, dtype=torch.bfloat16)
    with ft.use_backend("triton"):
        out = ft.flash_attn_func(q, k, v, causal=True)
        first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        second = torch.autograd.grad(out, (q, k, v), dout)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        v = v.detach().clone()
        v[1, 9, 0, 3] = float("nan")
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        grads = torch.autograd.grad(ft.flash_attn_func(q, k, v), (q, k, v), dout)
    assert len(gluon_backward_runs) == 3
    assert all(torch.isnan(g[1]).any() for g in grads[:2])
    assert not any(torch.isnan(g[0]).any() for g in grads) and not torch.isnan(grads[2]).any()


@needs_hopper
def test_fully_masked_rows(gluon_runs):
    """Causal with Sq > Sk: the first Sq - Sk rows see no key: out 0, lse -inf."""
    q, k, v = _make((1, 200, 70, 2, 1, 512, 512), torch.bfloat16)
    with ft.use_backend("triton"):
        out, lse, _ = ft.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        check_against_oracle(q, k, v, causal=True)
    assert gluon_runs == [True, True]
    assert torch.all(out[:, :130] == 0) and torch.all(lse[:, :, :130] == float("-inf"))


@needs_hopper
def test_strided_views_and_nan(gluon_runs):
    """q, k, v as views of one packed qkv tensor run in place; a NaN in V reaches only its own batch."""
    qkv = torch.randn(2, 97, 3, 2, 512, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i] for i in range(3))
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, backward=False)
        v = v.clone()
        v[1, 5, 0, 7] = float("nan")
        out = ft.flash_attn_func(q, k, v)
    assert gluon_runs == [True, True]
    assert torch.isnan(out[1, :, 0, 7]).all() and not torch.isnan(out[0]).any() and not torch.isnan(out[1, :, 1]).any()


@needs_hopper
@pytest.mark.parametrize("kw", [dict(softcap=5.0), dict(window_size=(30, 0)), dict(alibi_slopes=True),
                                dict(window_size=(-1, 4))],
                         ids=["softcap", "window", "alibi", "right_edge"])
@pytest.mark.parametrize("d", [448, 384])
def test_other_features_keep_the_triton_kernels(kw, d, gluon_runs, gluon_backward_runs):
    """Split-D above 384, dense at 384 (dispatch.wide_forward_heads); the split-D backward."""
    q, k, v = _make((1, 77, 90, 2, 1, d, d), torch.bfloat16)
    if kw.get("alibi_slopes") is True:
        kw = dict(alibi_slopes=torch.rand(2, device=DEVICE))
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, **kw)
    assert not any(gluon_runs) and not gluon_backward_runs  # refused before the launcher or by it


@needs_hopper
def test_heads_not_adjacent_fall_back(gluon_runs):
    """A view whose heads are not adjacent in memory cannot be one TMA box row: the split-D kernel runs."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in _make((1, 70, 70, 2, 2, 512, 512),
                                                                                        torch.bfloat16))
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, backward=False)
    assert gluon_runs == [False]


@pytest.mark.parametrize("rule, dims, dtype, device, want", [
    ("forward", (512, 512), torch.bfloat16, "cuda", True),
    ("forward", (448, 448), torch.float16, "cuda", True),
    ("forward", (192, 512), torch.bfloat16, "cuda", True),
    ("forward", (448, 64), torch.bfloat16, "cuda", True),
    ("forward", (384, 384), torch.bfloat16, "cuda", True),
    ("forward", (320, 320), torch.bfloat16, "cuda", False),
    ("forward", (320, 384), torch.float16, "cuda", True),
    ("forward", (576, 512), torch.bfloat16, "cuda", True),
    ("forward", (768, 256), torch.float16, "cuda", True),
    ("forward", (1024, 1024), torch.bfloat16, "cuda", True),
    ("forward", (512, 1024), torch.bfloat16, "cuda", True),
    ("forward", (1088, 512), torch.bfloat16, "cuda", False),
    ("forward", (512, 1088), torch.bfloat16, "cuda", False),
    ("forward", (512, 512), torch.float32, "cuda", False),
    ("forward", (512, 512), torch.bfloat16, "cpu", False),
    ("backward", (320, 320), torch.bfloat16, "cuda", True),
    ("backward", (257, 64), torch.float16, "cuda", True),
    ("backward", (256, 256), torch.bfloat16, "cuda", False),
    ("backward", (1024, 1024), torch.bfloat16, "cuda", True),
    ("backward", (1088, 512), torch.bfloat16, "cuda", False),
    ("backward", (512, 512), torch.float32, "cuda", False),
    ("backward", (512, 512), torch.bfloat16, "cpu", False),
], ids=str)
def test_rule(rule, dims, dtype, device, want):
    """The wider of the (padded) head dims in [321, 1024] (forward) or [257, 1024] (backward); 16-bit,
    sm_90 only."""
    device = torch.device(device)
    if device.type == "cuda":
        want = want and HOPPER
        if not HAS_GPU:
            device = torch.device("cpu")
            want = False
    heads = dispatch.gluon_forward_heads if rule == "forward" else dispatch.gluon_backward_heads
    assert heads(*dims, dtype, device) is want


@pytest.mark.parametrize("shape, two_stages", MORE_PARKED, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple)
                         else str(x))
def test_more_parked_shapes(shape, two_stages, monkeypatch):
    """MORE_PARKED's flag says whether a slice of the shape's (padded) head dims, under PARKED_TILES = 3,
    has 2 ring stages of 64-column chunks (where NARROW_CHUNKS applies), and each shape parks more
    than one tile somewhere or runs two slices."""
    monkeypatch.setattr(wide_gluon_launch, "PARKED_TILES", 3)
    slices = [s for dim in shape[5:] for s in wide_gluon_launch.o_slices(-(-dim // 64) * 64)]
    assert any(wide_gluon_launch.ring_plan(width)[1] == 2 for _, width, _ in slices) == two_stages
    assert any(wide_gluon_launch._parked_tiles(width) > 1 for _, width, _ in slices if width > 512) or \
        any(n > 1 for _, _, n in slices)


def test_ring_plan(monkeypatch):
    """Slices past 512 columns park their further tiles; the ring keeps 4 stages of 64-column chunks
    while shared memory holds them (576, 640), 3 at 704 / 768, 2 from 832 to the widest slice, 960;
    with NARROW_CHUNKS those with 2 stream 32-column chunks, as many as fit."""
    plan = wide_gluon_launch.ring_plan
    assert [plan(w) for w in (512, 576, 640, 704, 768, 832, 960)] == [
        (False, 4, 64), (True, 4, 64), (True, 4, 64), (True, 3, 64), (True, 3, 64), (True, 2, 64), (True, 2, 64)]
    with pytest.raises(AssertionError, match="1024 columns"):
        plan(1024)
    monkeypatch.setattr(wide_gluon_launch, "NARROW_CHUNKS", True)
    assert [plan(w) for w in (512, 768, 832, 896, 960)] == [
        (False, 4, 64), (True, 3, 64), (True, 5, 32), (True, 4, 32), (True, 4, 32)]
    for w in range(576, 961, 64):
        park, stages, kc = plan(w)
        assert wide_gluon_launch._shared_bytes(w, stages, kc) <= wide_gluon_launch.SHARED_MEMORY


@pytest.mark.parametrize("parked_tiles", [1, 3])
def test_o_slices(parked_tiles, monkeypatch):
    """One O slice up to widest_slice() columns (768 with PARKED_TILES = 1, 960 with 3), else whole
    512-column slices and one for the rest. Up to 512 columns a slice is one register tile (a power of
    two >= 64) or two (a power of two plus a smaller one), the narrowest that holds its columns; past
    512, the narrowest multiple of 64 that holds them with at most PARKED_TILES tiles past the 512
    (slice_tiles: the rest's powers of two from the largest down). Together the slices cover Dv."""
    monkeypatch.setattr(wide_gluon_launch, "PARKED_TILES", parked_tiles)
    widest = {1: 768, 3: 960}[parked_tiles]
    assert wide_gluon_launch.widest_slice() == widest
    assert wide_gluon_launch.o_slices(100) == [(0, 128, 1)]
    assert wide_gluon_launch.o_slices(333) == [(0, 384, 1)]
    assert wide_gluon_launch.o_slices(448) == [(0, 512, 1)]
    assert wide_gluon_launch.o_slices(576) == [(0, 576, 1)]
    assert wide_gluon_launch.o_slices(600) == [(0, 640, 1)]
    assert wide_gluon_launch.o_slices(700) == [(0, {1: 768, 3: 704}[parked_tiles], 1)]
    assert wide_gluon_launch.o_slices(768) == [(0, 768, 1)]
    assert wide_gluon_launch.o_slices(800) == {1: [(0, 512, 1), (512, 320, 1)], 3: [(0, 832, 1)]}[parked_tiles]
    assert wide_gluon_launch.o_slices(960) == {1: [(0, 512, 2)], 3: [(0, 960, 1)]}[parked_tiles]
    assert wide_gluon_launch.o_slices(1000) == [(0, 512, 2)]
    assert wide_gluon_launch.o_slices(1088) == [(0, 512, 2), (1024, 64, 1)]
    pow2 = lambda w: w >= 64 and w & (w - 1) == 0
    for dv in range(1, 2049):
        covered = 0
        for col0, width, n in wide_gluon_launch.o_slices(dv):
            tiles = [slice_tiles(width, 256, 64, "DV" + x) for x in "ABCD"]
            assert col0 == covered and width <= widest and sum(tiles) == width
            assert all(pow2(t) for t in tiles if t) and all(t > u for t, u in zip(tiles, tiles[1:]) if u)
            if width <= 512:
                assert tiles[2] == 0
            else:
                assert tiles[0] == 512 and 0 < sum(t > 0 for t in tiles[1:]) <= parked_tiles
                wide_gluon_launch.ring_plan(width)  # fits shared memory
            covered += width * n
        assert dv <= covered < dv + 512
        assert len(wide_gluon_launch.o_slices(dv)) == 1 or covered - dv < 256


def test_tma_view():
    """[B, S, H, D] -> [B, S, H * D] when the heads are adjacent and the strides are 16-byte multiples."""
    t = torch.empty(2, 5, 3, 64, dtype=torch.bfloat16)
    assert wide_gluon_launch._tma_view(t) == ([2, 5, 192], [960, 192, 1])
    packed = torch.empty(2, 5, 3, 3, 64, dtype=torch.bfloat16)[:, :, 1]
    assert wide_gluon_launch._tma_view(packed) == ([2, 5, 192], [2880, 576, 1])
    assert wide_gluon_launch._tma_view(t.transpose(1, 2).contiguous().transpose(1, 2)) is None  # heads apart
    assert wide_gluon_launch._tma_view(torch.empty(2, 5, 3, 68, dtype=torch.bfloat16)[..., :64]) is None  # row stride
    assert wide_gluon_launch._tma_view(torch.empty(1 + 2 * 5 * 3 * 64, dtype=torch.bfloat16)[1:].view(2, 5, 3, 64)) is None


@pytest.mark.parametrize("kw", [dict(softcap=1.0), dict(left=3), dict(right=2), dict(dropout_p=0.1), dict(varlen=True),
                                dict()], ids=str)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_launcher_refuses_what_the_kernel_lacks(kw, direction):
    """gluon_forward launches nothing and answers False, and gluon_backward_applies answers False, for
    features the kernels lack, and on a CPU for all."""
    q = torch.randn(1, 8, 2, 512, dtype=torch.bfloat16)
    args = dict(softcap=0.0, left=None, right=None, alibi_slopes=None, attn_mask=None, dropout_p=0.0, varlen=False)
    args.update(kw)
    if direction == "forward":
        assert wide_gluon_launch.gluon_forward(q, q, q, torch.empty_like(q), torch.empty(1, 2, 8), 0.1, **args) is False
    else:
        assert wide_gluon_launch.gluon_backward_applies(q, q, q, q, **args) is False
