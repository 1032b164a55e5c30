"""flashtile.flash_attn_func / scaled_dot_product_attention against the float64 oracle.

Runs the Triton kernels natively on a GPU and under Triton's interpreter on a CPU (conftest.py),
plus the tiled CPU path. Tolerance: FlashAttention's rule (reference.check_close), factor 2 for the
output and 3 for gradients, against the same math done by torch in the input dtype.
"""

import math

import pytest
import torch

import flashtile as ft
from flashtile import attention_launch
from flashtile.reference import attention_ref
from conftest import DEVICE, HAS_GPU
from oracle import assert_matches_oracle

DTYPES = [torch.float16, torch.bfloat16, torch.float32] if HAS_GPU else [torch.float16, torch.float32]
HALF = torch.bfloat16 if HAS_GPU else torch.float16  # the interpreter has no bf16 dot
# the tiled CPU path runs only on CPU tensors; the Triton kernels run on the GPU or in the interpreter
BACKENDS = ["triton"] if HAS_GPU else ["triton", "cpu"]

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim): odd sizes, Sq != Sk, GQA, MQA
SHAPES_CPU = [
    (1, 1, 1, 1, 1, 1),
    (2, 37, 37, 2, 1, 40),
    (1, 113, 37, 4, 2, 59),
    (1, 37, 113, 3, 3, 72),
    (1, 64, 64, 2, 2, 64),
    (1, 29, 43, 4, 1, 111),
    (1, 40, 50, 1, 1, 256),
]
SHAPES_GPU = SHAPES_CPU + [
    (2, 257, 257, 4, 2, 96),
    (1, 513, 1023, 8, 2, 128),
    (1, 1023, 513, 2, 2, 256),
    (2, 1024, 1024, 4, 4, 64),
    (1, 257, 113, 6, 2, 128),
]
SHAPES = SHAPES_GPU if HAS_GPU else SHAPES_CPU


def _rand(*shape, dtype, requires_grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def _make(shape, dtype, requires_grad=True):
    B, Sq, Sk, Hq, Hkv, D = shape
    return tuple(_rand(B, S, H, D, dtype=dtype, requires_grad=requires_grad)
                 for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv)))


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_against_oracle(q, k, v, dout=None, backward=True, **kw):
    """Forward (out and lse) and gradients of flashtile vs the oracle, FlashAttention's rule."""
    out, lse, _ = ft.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == q.dtype
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_matches_oracle((q, k, v), (out, lse), attention_ref(q, k, v, upcast=True, **kw),
                          attention_ref(q, k, v, upcast=False, **kw), dout=dout, backward=backward)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(shape, causal, dtype, backend):
    q, k, v = _make(shape, dtype)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(8, 0), (5, 11), (-1, 3), (20, -1)])
def test_sliding_window(window, backend):
    q, k, v = _make((1, 70, 57, 2, 1, 32), torch.float32)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, window_size=window)
        check_against_oracle(q, k, v, window_size=window, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", ["softcap", "alibi", "alibi_batched", "softcap+alibi+causal", "softcap+window"])
def test_softcap_and_alibi(features, dtype, backend):
    B, Sq, Sk, Hq, Hkv, D = 2, 45, 61, 4, 2, 40
    q, k, v = _make((B, Sq, Sk, Hq, Hkv, D), dtype)
    kw = {}
    if "softcap" in features:
        kw["softcap"] = 1.5  # small cap: tanh far from linear, so a wrong derivative shows
    if "alibi" in features:
        shape = (B, Hq) if "batched" in features else (Hq,)
        kw["alibi_slopes"] = torch.rand(*shape, device=DEVICE, dtype=torch.float32) * 0.5
    if "causal" in features:
        kw["causal"] = True
    if "window" in features:
        kw["window_size"] = (9, 3)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [40, 96])
@pytest.mark.parametrize("case", ["causal_sq<sk", "causal_sq>sk", "window_left", "sq<sk", "sq>sk", "window_both"])
def test_alibi_forms(case, head_dim, dtype, backend):
    """ALiBi in its key-term / query-term forms (common.score_log2's HAS_ALIBI 2 / 3 / 4). Under a right
    edge <= 0 (causal, window (9, 0)) the bias is one-sided: at D <= 64 the forward keeps |distance| and
    the backward adds the query term per score; above 64 the forward adds it per score and the backward
    folds it into lse. Otherwise (non-causal, window (9, 5)) the backward, and the forward above 64,
    take |key term - query term| in fp32. Sq != Sk shifts the diagonal both ways."""
    Sq, Sk = (37, 83) if "sq<sk" in case else (83, 37) if "sq>sk" in case else (70, 70)
    q, k, v = _make((2, Sq, Sk, 4, 2, head_dim), dtype)
    slopes = torch.rand(4, device=DEVICE, dtype=torch.float32) * 0.5 + 0.05
    kw = dict(window_size=(9, 0)) if case == "window_left" else dict(window_size=(9, 5)) if case == "window_both" \
        else dict(causal=case.startswith("causal"))
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, alibi_slopes=slopes, **kw)


def test_alibi_form_follows_the_right_edge():
    """attention_launch._alibi_flag: one-sided only when no visible key sits right of the diagonal; the
    two-sided forms per kernel and head dim."""
    L, slopes = attention_launch, torch.ones(2)
    key, both, dist, terms = L.ALIBI_KEY_TERM, L.ALIBI_BOTH_TERMS, L.ALIBI_DISTANCE, L.ALIBI_TERM_DISTANCE
    assert L._alibi_flag(None, True, 0, 96, "dq") == 0
    assert L._alibi_flag(slopes, True, 0, 96, "dkdv") == key and L._alibi_flag(slopes, True, -3, 96, "fwd") == both
    assert L._alibi_flag(slopes, True, 0, 64, "dq") == both and L._alibi_flag(slopes, True, 0, 64, "fwd") == dist
    # keys right of the diagonal (a right edge > 0, or none) take the two-sided forms
    for right_edge in [(True, 1), (False, 0)]:
        assert [L._alibi_flag(slopes, *right_edge, 96, k) for k in ("fwd", "dq", "dkdv")] == [terms, terms, dist]
        assert [L._alibi_flag(slopes, *right_edge, 64, k) for k in ("fwd", "dq", "dkdv")] == [dist, terms, terms]


def test_fixed_max_only_where_the_softcap_bounds_the_scores():
    """attention_launch.fixed_max: the forward drops its running max only for a softcap whose bound
    softcap * log2(e) is at most 60 (p >= 2^-120), in bf16 / fp32, with nothing added to the score."""
    fixed_max = attention_launch.fixed_max
    assert fixed_max(41.5, torch.bfloat16, False, 0) and fixed_max(0.01, torch.float32, False, 0)
    assert fixed_max(30.0, torch.bfloat16, False, 1)  # a bool mask only hides scores
    assert not fixed_max(41.6, torch.bfloat16, False, 0) and not fixed_max(0.0, torch.bfloat16, False, 0)
    assert not fixed_max(30.0, torch.float16, False, 0)  # P in fp16 would underflow
    assert not fixed_max(30.0, torch.bfloat16, True, 0) and not fixed_max(30.0, torch.bfloat16, False, 2)


def test_raw_max_only_where_the_score_is_a_positive_multiple_of_qk():
    """attention_launch.max_mode: MAX_RAW (the row max over unscaled q.k, scaled after) only where the
    score is q.k times a finite positive scale; a softcap, ALiBi or an additive mask take the other
    modes, and a 384-wide accumulator keeps the lazy rescale."""
    L, bf16 = attention_launch, torch.bfloat16
    assert L.max_mode(0.0, bf16, False, 0, 128, False, 0.125) == L.MAX_RAW
    assert L.max_mode(0.0, bf16, False, 1, 64, True, 2.0) == L.MAX_RAW  # a bool mask and a window only hide scores
    for scale in (-0.125, 0.0, math.inf, math.nan):
        assert L.max_mode(0.0, bf16, False, 0, 128, False, scale) == L.MAX_RUNNING
    assert L.max_mode(0.0, bf16, True, 0, 128, False, 0.125) == L.MAX_RUNNING  # ALiBi
    assert L.max_mode(0.0, bf16, False, 2, 128, False, 0.125) == L.MAX_RUNNING  # additive mask
    assert L.max_mode(30.0, torch.float16, False, 0, 128, False, 0.125) == L.MAX_RUNNING  # fp16 softcap
    assert L.max_mode(30.0, bf16, False, 0, 128, False, 0.125) == L.MAX_FIXED
    assert L.max_mode(0.0, bf16, False, 0, 384, False, 0.125) == L.MAX_LAZY
    # a launch recipe made for one side of the rule must not serve the other (attention_launch._call_key)
    q = torch.zeros(1, 4, 1, 8)
    keys = {L._call_key((q, q, q), None, None, s, 0.0, None, 0.0, (0, 0)) for s in (0.5, 2.0, -0.5, math.inf)}
    assert len(keys) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_sign(backend):
    """Positive, negative and zero scales on one signature in turn: the max over unscaled q.k
    (MAX_RAW) holds for a positive scale only, and a launch recipe made for one sign must not serve
    the other (attention_launch._call_key). Causal with Sq != Sk, so masked tiles take part. The
    scores spread over thousands (log2 domain), so a max taken on the wrong side overflows exp2."""
    torch.manual_seed(11)
    q, k, v = _make((2, 45, 61, 3, 1, 40), HALF, requires_grad=False)
    q, k = (4 * t for t in (q, k))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for scale in (2.0, -2.0, 0.0, 2.0, -0.5):
        with ft.use_backend(backend):
            check_against_oracle(q, k, v, softmax_scale=scale, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_rows_far_below_the_bound(dtype, backend):
    """Rows whose every score sits near -softcap: with the bound as the softmax max (cap 40: bound
    57.7) their p fall to about 2^-115 and must stay exact; cap 60 (bound 86.6, p near 2^-173 would
    flush to 0) must take the running max. Both caps on one shape in turn, so a launch recipe made for
    the first cannot serve the second (attention_launch._call_key)."""
    B, Sq, Sk, H, D = 2, 37, 45, 3, 40
    g = torch.Generator().manual_seed(7)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    for cap in (40.0, 60.0):
        k = 2 * math.sqrt(D) * u + 0.5 * torch.randn(B, Sk, H, D, generator=g)
        q = torch.randn(B, Sq, H, D, generator=g)
        q[:, ::2] = -1.5 * cap * u + 0.1 * torch.randn(B, (Sq + 1) // 2, H, D, generator=g)  # x near -3
        v = torch.randn(B, Sk, H, D, generator=g)
        q, k, v = (t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v))
        with ft.use_backend(backend):
            check_against_oracle(q, k, v, softcap=cap, causal=cap > 50)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_strides(backend):
    """[B, H, S, D] storage seen through a transpose, a slice of a packed qkv, and a custom scale."""
    B, S, H, D = 2, 45, 3, 48
    qkv = torch.randn(B, S, 3, H, D, device=DEVICE, dtype=torch.float16)
    q, k, v = (t.requires_grad_() for t in qkv.unbind(2))  # strides of a packed [B, S, 3, H, D]
    assert not q.is_contiguous()
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, softmax_scale=0.3, causal=True)
    heads_first = [torch.randn(B, H, S, D, device=DEVICE, dtype=torch.float32) for _ in range(3)]
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in heads_first)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_dim_not_contiguous_is_copied(backend):
    q, k, v = (torch.randn(1, 33, 2, 24, device=DEVICE)[..., ::2] for _ in range(3))
    assert q.stride(-1) == 2
    with ft.use_backend(backend):
        check_against_oracle(q.requires_grad_(), k.requires_grad_(), v.requires_grad_())


# Found by test_fuzz on the H200: fp16 with D=29 and Dv of 1-8 over two heads (V rows 2-16 elements
# apart) gave wrong outputs, and an illegal memory access with dropout. The launchers now pad such
# inputs (row_align.py); Sk spans several key tiles, as in the failing launches.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(29, 1), (29, 2), (29, 8), (24, 29), (40, 3)], ids=lambda d: f"D{d[0]}-Dv{d[1]}")
def test_unaligned_head_dims(dims, backend):
    D, Dv = dims
    Sk = 300 if HAS_GPU else 70
    q, k, v = _rand(2, 64, 2, D, dtype=torch.float16), _rand(2, Sk, 2, D, dtype=torch.float16), _rand(
        2, Sk, 2, Dv, dtype=torch.float16)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v)
        check_against_oracle(q, k, v, causal=True, softmax_scale=0.27)


@pytest.mark.skipif(not HAS_GPU, reason="only GPU compilations failed; the interpreter ran these launches right")
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_small_value_head_dims_grid(dropout_p):
    """The probe's grid (D 16 / 29 / 64 x Dv 1-24 x one or two heads, 300 keys), forward and backward."""
    for D in (16, 29, 64):
        for Dv in (1, 2, 3, 4, 8, 16, 24):
            for H in (1, 2):
                q, k, v = (_rand(1, n, H, d, dtype=torch.float16) for n, d in ((64, D), (300, D), (300, Dv)))
                out, lse, keep = ft.flash_attn_func(q, k, v, dropout_p=dropout_p, return_attn_probs=True)
                kw = dict(dropout_p=dropout_p, dropout_mask=keep) if dropout_p else {}
                assert_matches_oracle((q, k, v), (out, lse), attention_ref(q, k, v, upcast=True, **kw),
                                      attention_ref(q, k, v, upcast=False, **kw))


def test_row_align_pads_only_what_it_must():
    from flashtile.row_align import aligned_rows, narrowed, rows_aligned
    t = torch.randn(2, 5, 3, 32)
    assert aligned_rows(t) is t  # a common shape goes to the kernels untouched
    odd = torch.randn(2, 5, 3, 29)
    padded = aligned_rows(odd)
    assert padded.shape == (2, 5, 3, 32) and rows_aligned(padded) and padded.is_contiguous()
    assert torch.equal(padded[..., :29], odd) and not padded[..., 29:].any()
    assert torch.equal(narrowed(padded, 29), odd) and narrowed(padded, 29).is_contiguous()
    strided = torch.randn(2, 5, 3, 33)[..., :32]  # rows 33 elements apart
    assert not rows_aligned(strided) and torch.equal(aligned_rows(strided), strided)
    shifted = torch.randn(2 * 5 * 3 * 32 + 1)[1:].view(2, 5, 3, 32)  # data 4 bytes past an aligned start
    assert not rows_aligned(shifted) and aligned_rows(shifted).data_ptr() % 16 == 0


# (D, Dv), dtype, (forward's q / v widths), (backward's)
@pytest.mark.parametrize("dims, dtype, fwd, bwd", [
    ((200, 200), HALF, (256, 256), (256, 256)), ((176, 176), HALF, (176, 176), (192, 192)),
    ((232, 100), HALF, (256, 112), (256, 112)), ((200, 200), torch.float32, (208, 208), (208, 208)),
], ids=str)
def test_dense_rows_padded_to_the_tile(dims, dtype, fwd, bwd, monkeypatch):
    """16-bit head dims whose register tile ends past them reach the dense kernels zero-padded to the
    tile where tuning.padded_columns says so (256-wide tiles both ways, 192 in the backward only);
    the rest, and fp32, only to 16 columns. Narrowed back, every result matches the oracle (GQA,
    Sq != Sk, Dqk != Dv)."""
    widths = set()
    real = attention_launch._launch

    def spy(kernel, cfg, block, grid_of, order_of, args, meta):
        backward = kernel is not attention_launch.attention_fwd_kernel
        widths.add((backward, args[0].shape[-1], args[2].shape[-1]))  # q's and v's rows
        return real(kernel, cfg, block, grid_of, order_of, args, meta)

    monkeypatch.setattr(attention_launch, "_launch", spy)
    D, Dv = dims
    q, k = _rand(1, 45, 4, D, dtype=dtype), _rand(1, 39, 2, D, dtype=dtype)
    v = _rand(1, 39, 2, Dv, dtype=dtype)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=True)
    assert widths == {(False, *fwd), (True, *bwd)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows(backend):
    """Causal with Sq > Sk leaves the first Sq - Sk rows with no key: out 0, lse -inf, zero grads."""
    q, k, v = _make((1, 50, 20, 2, 1, 16), torch.float32)
    with ft.use_backend(backend):
        out, lse, _ = ft.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        dq, dk, dv = _grads(out, (q, k, v), torch.randn_like(out))
    assert torch.all(out[:, :30] == 0) and torch.all(lse[:, :, :30] == float("-inf"))
    assert torch.all(dq[:, :30] == 0)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, causal=True)
        # a window that leaves whole query tiles without keys
        check_against_oracle(q, k, v, window_size=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    q, k, v = _make((1, 20, 20, 1, 1, 16), torch.float32)
    q = q.detach().clone()
    q[0, 3, 0, 5] = float("nan")
    with ft.use_backend(backend):
        out = ft.flash_attn_func(q, k.detach(), v.detach())
    assert torch.isnan(out[0, 3]).all()
    assert not torch.isnan(out[0, 4]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 5, 2, 2, 16), (1, 0, 5, 2, 2, 16), (1, 5, 0, 2, 2, 16),
                                   (1, 5, 0, 2, 1, 320), (1, 0, 5, 2, 2, 300),  # also the wide-head launcher
                                   (1, 5, 5, 0, 0, 16), (1, 5, 5, 0, 0, 320)],  # no heads (the Triton backward divided by 0)
                         ids=lambda s: "x".join(map(str, s)))
def test_empty(shape, backend):
    q, k, v = _make(shape, torch.float32)
    with ft.use_backend(backend):
        out, lse, _ = ft.flash_attn_func(q, k, v, return_attn_probs=True)
        assert out.shape == (shape[0], shape[1], shape[3], shape[5])
        if out.numel():
            assert torch.all(out == 0) and torch.all(lse == float("-inf"))
        grads = _grads(out, (q, k, v), torch.randn_like(out))
        assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]
        assert not any(g.any() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    q, k, v = _make((2, 77, 77, 4, 1, 32), torch.float16)
    dout = torch.randn(2, 77, 4, 32, device=DEVICE, dtype=torch.float16)
    with ft.use_backend(backend):
        runs = [_grads(ft.flash_attn_func(q, k, v, causal=True), (q, k, v), dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("expand", [False, True])
def test_gqa_group_sum_paths_agree(expand):
    """dK/dV summed over the GQA group in registers, or from per-head partials, give the oracle."""
    q, k, v = _make((1, 45, 45, 6, 2, 32), torch.float32)
    scale = 1 / math.sqrt(32)
    with torch.no_grad():
        out, lse = attention_launch.attention_forward(q, k, v, scale, None, 0)
        dout = torch.randn_like(out)
        dq, dk, dv = attention_launch.attention_backward(dout, q, k, v, out, lse, scale, None, 0, expand_gqa=expand)
    ref, _ = attention_ref(q, k, v, causal=True)
    want = _grads(ref, (q, k, v), dout.double() if ref.dtype == torch.float64 else dout)
    for g, w in zip((dq, dk, dv), want):
        assert (g.double() - w.double()).abs().max() < 1e-4


def test_poisoned_outputs_are_fully_written(monkeypatch):
    """Every output element is written by the kernels: allocate outputs filled with NaN."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(attention_launch, "_empty", nan_empty)
    q, k, v = _make((2, 67, 51, 4, 2, 40), torch.float16)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=True)
        check_against_oracle(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_scaled_dot_product_attention_matches_torch(causal, backend):
    """Same layout and semantics as torch SDPA, including top-left causal when Sq != Sk and GQA."""
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 23, 41, 32
    q = torch.randn(B, Hq, Sq, D, device=DEVICE, dtype=torch.float32, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, device=DEVICE, dtype=torch.float32, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, D, device=DEVICE, dtype=torch.float32, requires_grad=True)
    with ft.use_backend(backend):
        out = ft.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.2, enable_gqa=True)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=0.2, enable_gqa=True)
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max() < 1e-5
    dout = torch.randn_like(out)
    for g, w in zip(_grads(out, (q, k, v), dout), _grads(ref, (qd, kd, vd), dout.double())):
        assert (g.double() - w).abs().max() < 1e-4


def test_compile_fullgraph():
    """The custom ops trace into one graph (fake implementations give shapes and dtypes)."""
    q, k, v = _make((1, 33, 33, 2, 1, 16), torch.float32)

    def f(q, k, v):
        return ft.flash_attn_func(q, k, v, causal=True).sum()

    backend = "inductor" if HAS_GPU else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(q, k, v)
    got.backward()
    want = f(q, k, v)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_backend_selection(monkeypatch):
    from flashtile import dispatch

    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    assert dispatch.backend_setting() == "reference"
    with ft.use_backend("cpu"):
        assert dispatch.backend_setting() == "cpu"
        with ft.use_backend("auto"):
            assert dispatch.resolve_backend(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("FLASHTILE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FLASHTILE_BACKEND"):
        dispatch.backend_setting()
    with pytest.raises(ValueError, match="use_backend"):
        with ft.use_backend("cuda"):
            pass
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    q, k, v = _make((1, 9, 9, 1, 1, 8), torch.float32)
    out = ft.flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_ref(q, k, v, causal=True)
    assert (out.double() - ref.double()).abs().max() < 1e-5


def _bad_inputs():
    t = lambda *s, dt=torch.float32: torch.randn(*s, dtype=dt, device=DEVICE)  # noqa: E731
    ok = (t(1, 8, 2, 16), t(1, 8, 2, 16), t(1, 8, 2, 16))
    return [
        ("q must have 4 dims", (t(8, 2, 16), ok[1], ok[2]), {}, ValueError),
        ("k must be a torch.Tensor", (ok[0], [1.0], ok[2]), {}, TypeError),
        ("dtype", (t(1, 8, 2, 16, dt=torch.float64), ok[1], ok[2]), {}, TypeError),
        ("share one dtype", (ok[0], t(1, 8, 2, 16, dt=torch.float16), ok[2]), {}, TypeError),
        ("batch size", (t(2, 8, 2, 16), ok[1], ok[2]), {}, ValueError),
        ("same seqlen", (ok[0], ok[1], t(1, 9, 2, 16)), {}, ValueError),
        ("head_dim of q", (t(1, 8, 2, 32), ok[1], ok[2]), {}, ValueError),
        ("multiple of heads", (t(1, 8, 3, 16), ok[1], ok[2]), {}, ValueError),
        ("> 2048", (t(1, 8, 2, 2100), t(1, 8, 2, 2100), ok[2]), {}, NotImplementedError),
        ("window_size", ok, {"window_size": (-2, 0)}, ValueError),
        ("softmax_scale", ok, {"softmax_scale": "x"}, TypeError),
        ("dropout_p", ok, {"dropout_p": 1.0}, ValueError),
        ("softcap", ok, {"softcap": -1.0}, ValueError),
        ("alibi_slopes must have shape", ok, {"alibi_slopes": torch.ones(3, device=DEVICE)}, ValueError),
        ("alibi_slopes must be float32", ok, {"alibi_slopes": torch.ones(2, device=DEVICE, dtype=torch.float16)}, TypeError),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    match, args, kwargs, exc = case
    with pytest.raises(exc, match=match):
        ft.flash_attn_func(*args, **kwargs)


def test_sdpa_bad_input():
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="enable_gqa"):
        ft.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="attn_mask"):
        ft.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="attn_mask"):
        ft.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.int32, device=DEVICE))


def test_custom_ops_pass_opcheck():
    """The torch.library ops (used under torch.compile) have consistent fake impls, schema and autograd."""
    from flashtile import ops

    q, k, v = _make((1, 19, 19, 2, 1, 16), torch.float32)
    backend = "triton"
    args = (q, k, v, 0.25, None, 0, 0.0, None, None, None, 0, 0, None, 0.0, 0, 0, backend, [], [])
    torch.library.opcheck(ops.attention_fwd, args)
    out, lse = ops.attention_fwd(*args)
    (out * torch.randn_like(out)).sum().backward()
    ref, _ = attention_ref(q, k, v, softmax_scale=0.25, causal=True)
    assert (out.double() - ref.double()).abs().max() < 1e-5


def test_config_shrinks_when_the_gpu_lacks_resources(monkeypatch):
    """A GPU with less shared memory than the tuned one gets a smaller config, not an error."""
    import triton

    real = attention_launch.attention_fwd_kernel
    tried = []

    class SmallGPU:
        params = real.params if hasattr(real, "params") else None  # launch plans read the signature

        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["num_stages"]))
                if kw["num_stages"] > 1 or kw["BLOCK_N"] > 16:
                    raise triton.runtime.errors.OutOfResources(1 << 20, 1 << 16, "shared memory")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(attention_launch, "attention_fwd_kernel", SmallGPU())
    monkeypatch.setattr(attention_launch, "_SHRUNK", {})
    q, k, v = _make((1, 40, 40, 2, 1, 16), torch.float32)
    cfg = attention_launch.KernelConfig(64, 64, 4, 3)
    with torch.no_grad():
        out, lse = attention_launch.attention_forward(q, k, v, 0.25, None, 0, config=cfg)
    assert tried[0] == (64, 64, 3) and tried[-1][1:] == (16, 1) and len(tried) > 3
    ref, _ = attention_ref(q, k, v, softmax_scale=0.25, causal=True)
    assert (out.double() - ref.double()).abs().max() < 1e-5


def test_program_order_rule():
    """(TILE_MAJOR, HEAD_GROUP) per case (attention_launch.program_order's measurements)."""
    dense = attention_launch._Layout(2, 64, 64)
    packed = attention_launch._Layout(2, 64, 64, torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    order = attention_launch.program_order
    assert order(packed, False, False, 1, False) == (True, 4)  # varlen: sequences of different lengths
    assert order(dense, True, False, 4, False) == (True, 0)  # causal GQA: every row tile-major
    assert order(dense, True, False, 1, False) == (True, 4)  # causal MHA: groups of 4 heads
    assert order(dense, True, True, 1, False) == (False, 0)  # window: equal tiles, head-major
    assert order(dense, False, False, 4, False) == (False, 0)  # equal work per tile
    assert order(dense, True, False, 4, True) == (False, 0)  # block-sparse: ProgramOrder
    long = attention_launch._Layout(1, 16384, 16384)
    assert order(long, True, False, 1, False) == (False, 0)  # past 8192 keys head-major measured faster
    assert order(attention_launch._Layout(1, 16384, 16384, packed.cu_seqlens_q, packed.cu_seqlens_k), False, False, 1, False) == (True, 0)


def test_backward_walk_rule():
    """Which masked backwards take tuning's long-causal and short-walk dK/dV tiles (measured rules)."""
    walk = attention_launch.walk_lengths  # (Sk, causal, has_left, left, right, block_sparse, varlen)
    assert walk(1024, True, False, 0, 0, False, False) == (False, True, True)  # short causal
    assert walk(1025, True, False, 0, 0, False, False) == (False, False, True)
    assert walk(4096, True, False, 0, 0, False, False) == (True, False, True)
    assert walk(4097, True, False, 0, 0, False, False) == (True, False, False)
    assert walk(16384, True, False, 0, 0, False, False) == (True, False, False)
    assert walk(16385, True, False, 0, 0, False, False) == (False, False, False)  # unmeasured: the one loop
    assert walk(8192, True, False, 0, 0, False, True) == (False, False, False)  # varlen keeps the one loop
    assert walk(2048, True, False, 0, 0, False, True) == (False, False, False)  # and no constants: no medium walk
    assert walk(16384, True, True, 256, 0, False, False) == (False, True, True)  # narrow window, any length
    assert walk(16384, True, True, 1024, 0, False, False) == (False, False, True)
    assert walk(16384, True, True, 1024, 1024, False, False) == (False, False, True)
    assert walk(16384, True, True, 2048, 1, False, False) == (False, False, False)
    assert walk(512, True, False, 0, 0, True, False) == (False, False, False)  # block masks have their tiles
    assert walk(512, False, False, 0, 0, False, False) == (False, False, False)
    from flashtile.tuning import backward_config
    gpu = torch.device("cuda", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flashtile.tuning._arch", lambda device: (9, 0))
        short = backward_config(gpu, 128, 128, torch.bfloat16, True, short_walk=True)
        assert (short.dkdv.block_m, short.dkdv.block_n, short.dkdv.num_warps) == (32, 64, 4)
        # D <= 64, softcap and fp32 keep their own tiles
        for args, kw in (((64, 64, torch.bfloat16), {}), ((128, 128, torch.bfloat16), dict(softcap=True)),
                         ((128, 128, torch.float32), {})):
            assert (backward_config(gpu, *args, True, short_walk=True, **kw)
                    == backward_config(gpu, *args, True, short_walk=False, **kw))
        # a medium walk takes the short walk's tiles (with constant lengths), unless dropout or GQA
        medium = backward_config(gpu, 128, 128, torch.bfloat16, True, long_causal=True, medium_walk=True)
        assert medium.dkdv == short.dkdv and not medium.split_phases and medium.constant_lengths
        for kw in (dict(dropout=True), dict(grouped=True)):
            assert (backward_config(gpu, 128, 128, torch.bfloat16, True, long_causal=True, medium_walk=True, **kw)
                    == backward_config(gpu, 128, 128, torch.bfloat16, True, long_causal=True, **kw))


def test_short_forward_tiles():
    """tuning.forward_config's short-walk tiles (measured on the H200): two programs an SM for causal
    calls up to 1024 keys and causal block masks, 128x32 for non-causal calls below 2048 keys above
    D = 64 without ALiBi; everything else keeps its tiles."""
    from flashtile.tuning import KernelConfig, forward_config
    gpu = torch.device("cuda", 0)
    bf16 = torch.bfloat16
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flashtile.tuning._arch", lambda device: (9, 0))
        two = KernelConfig(64, 64, 4, 3)
        assert forward_config(gpu, 128, 128, bf16, True, plain_keys=512) == two
        assert forward_config(gpu, 96, 96, bf16, True, plain_keys=1024, alibi=True) == two
        assert forward_config(gpu, 64, 64, bf16, True, plain_keys=1024) == two
        assert forward_config(gpu, 128, 128, bf16, True, causal_blocks=True) == two
        assert forward_config(gpu, 128, 128, torch.float16, True, plain_keys=100) == two
        # longer causal walks keep the 128-key (D > 64) or 128x64 tiles
        assert forward_config(gpu, 128, 128, bf16, True, plain_keys=1025) == KernelConfig(128, 64, 8, 3)
        assert forward_config(gpu, 128, 128, bf16, True, plain_keys=2048).block_n == 128
        assert forward_config(gpu, 64, 64, bf16, True, plain_keys=2048) == KernelConfig(128, 64, 8, 3)
        narrow = KernelConfig(128, 32, 8, 3)
        assert forward_config(gpu, 128, 128, bf16, False, plain_keys=2047) == narrow
        assert forward_config(gpu, 80, 80, bf16, False, plain_keys=1) == narrow
        assert forward_config(gpu, 128, 128, bf16, False, plain_keys=2048).block_n == 128
        for args, kw in (((128, 128, bf16), dict(alibi=True)), ((64, 64, bf16), {}), ((128, 128, torch.float32), {}),
                         ((128, 128, bf16), dict(plain_keys=0)), ((192, 192, bf16), {})):
            kw = dict(dict(plain_keys=1024), **kw)
            assert forward_config(gpu, *args, False, **kw) == forward_config(gpu, *args, False), (args, kw)
        assert forward_config(gpu, 128, 128, torch.float32, True, plain_keys=512) != two
        assert forward_config(gpu, 192, 192, bf16, True, plain_keys=512) != two


def test_forward_config_arguments(monkeypatch):
    """What the launcher tells forward_config: the key count of plain calls only (no window, softcap,
    dropout, attn_mask, block mask or varlen), ALiBi, and causal block masks."""
    seen = []
    real = attention_launch.forward_config

    def spy(*a, **k):
        seen.append((a[4], k["plain_keys"], k["alibi"], k["causal_blocks"]))
        return real(*a, **k)
    monkeypatch.setattr(attention_launch, "forward_config", spy)
    q, k, v = _make((1, 40, 72, 2, 2, 32), torch.float32, requires_grad=False)
    slopes = torch.rand(2, device=q.device)
    with ft.use_backend("triton"):
        for kw, want in ((dict(), (False, 72, False, False)), (dict(causal=True), (True, 72, False, False)),
                         (dict(alibi_slopes=slopes), (False, 72, True, False)),
                         (dict(window_size=(8, 8)), (True, 0, False, False)),
                         (dict(softcap=5.0), (False, 0, False, False)),
                         (dict(dropout_p=0.2), (False, 0, False, False)),
                         (dict(causal=True, block_mask=ft.BlockMask.causal(40, 72, block_size=(16, 16), device=q.device)),
                          (True, 0, False, True))):
            seen.clear()
            ft.flash_attn_func(q, k, v, **kw)
            assert seen == [want], (kw, seen)
        seen.clear()
        mask = torch.rand(40, 72, device=q.device) > 0.5
        ft.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        assert seen == [(False, 0, False, False)], seen


def _spy_dkdv_meta(monkeypatch):
    """The meta-parameters of every dK/dV launch from now on (a list that fills as they run)."""
    metas, real = [], attention_launch._launch

    def spy(kernel, cfg, sparse_block, grid_of, order_of, args, meta):
        if kernel is attention_launch.attention_bwd_dkdv_kernel:
            metas.append(meta)
        return real(kernel, cfg, sparse_block, grid_of, order_of, args, meta)
    monkeypatch.setattr(attention_launch, "_launch", spy)
    return metas


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(8, 0)), dict(window_size=(5, 11)),
                                dict(causal=True, softcap=5.0)], ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 37, 2, 1, 40), (1, 113, 37, 4, 2, 59), (1, 37, 113, 3, 3, 72)],
                         ids=lambda s: "x".join(map(str, s)))
def test_split_phase_backward(shape, kw, monkeypatch):
    """dK/dV's per-phase loops (BackwardConfig.split_phases, which long causal sequences run) on short
    sequences, with the mask edges and Sq != Sk both ways, against the oracle."""
    tiles = attention_launch.KernelConfig(*((64, 64, 4, 2) if HAS_GPU else (32, 32, 4, 1)))
    cfg = attention_launch.BackwardConfig(tiles, tiles, split_phases=True)
    monkeypatch.setattr(attention_launch, "backward_config", lambda *a, **k: cfg)
    metas = _spy_dkdv_meta(monkeypatch)
    q, k, v = _make(shape, torch.float32)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, **kw)
    assert metas and all(m["SPLIT_PHASES"] for m in metas)  # the path under test did run


@pytest.mark.skipif(not HAS_GPU, reason="long sequences: GPU only")
@pytest.mark.parametrize("shape", [(1, 4097, 4097, 3, 1, 128), (2, 4096, 4160, 5, 5, 96)],
                         ids=lambda s: "x".join(map(str, s)))
def test_long_causal(shape, monkeypatch):
    """Causal with a key count in LONG_CAUSAL_KEYS: split-phase dK/dV tiles, heads in tile-major groups."""
    metas = _spy_dkdv_meta(monkeypatch)
    q, k, v = _make(shape, torch.bfloat16)
    check_against_oracle(q, k, v, causal=True)
    assert metas and all(m["SPLIT_PHASES"] and m["TILE_MAJOR"] for m in metas)


@pytest.mark.skipif(not HAS_GPU, reason="long sequences: GPU only")
def test_long_causal_with_constant_lengths(monkeypatch):
    """A long causal signature's second backward compiles the lengths as constants into the split-phase
    dK/dV walk, and with 16-aligned query rows it loads lse / delta as aligned rows (ALIGN_LSE in
    kernels/attention_bwd.py): both calls, each on fresh data, against the oracle."""
    monkeypatch.setattr(attention_launch, "_CALLS", {})
    monkeypatch.setattr(attention_launch, "_CONSTANT_SHAPES", set())
    metas = _spy_dkdv_meta(monkeypatch)
    shape = (1, 4112, 4112, 2, 2, 128)
    for _ in range(2):
        q, k, v = _make(shape, torch.bfloat16)
        check_against_oracle(q, k, v, causal=True)
    assert metas[0]["SEQLEN_Q"] == 0 and metas[-1]["SEQLEN_Q"] == 4112 and metas[-1]["SPLIT_PHASES"]