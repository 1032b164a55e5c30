"""flashtile.flash_attn_varlen_func (packed variable-length sequences) against the float64 oracle.

Same structure as test_attention.py: Triton kernels natively on a GPU or under Triton's interpreter
on a CPU, plus the tiled CPU path; FlashAttention's tolerance rule (reference.check_close), factor 2
for out / lse and 3 for gradients, against reference.attention_varlen_ref (attention_ref per sequence).
Sizes on CPU stay at <= ~200 tokens per case: the interpreter is slow.
"""

import pytest
import torch

import flashtile as ft
from flashtile.reference import attention_varlen_ref
from conftest import DEVICE, HAS_GPU
from oracle import assert_matches_oracle

DTYPES = [torch.float16, torch.bfloat16, torch.float32] if HAS_GPU else [torch.float16, torch.float32]
# the tiled CPU path runs only on CPU tensors; the Triton kernels run on the GPU or in the interpreter
BACKENDS = ["triton"] if HAS_GPU else ["triton", "cpu"]

# (seqlens_q, seqlens_k, heads_q, heads_kv, head_dim): empty sequences on either side, length 1,
# odd sizes, Sq != Sk per sequence, GQA and MQA. "random" draws B lengths per test (0 and 1 forced in).
CASES_CPU = [
    ((1,), (1,), 1, 1, 1),
    ((5, 0, 17, 1, 30), (9, 3, 17, 0, 23), 4, 2, 40),
    ((37, 13, 2), (11, 40, 2), 3, 1, 59),
    ("random", 6, 2, 2, 24),
]
CASES_GPU = CASES_CPU + [
    ((257, 0, 1, 513, 130), (113, 77, 1, 1023, 0), 8, 2, 128),
    ((1000, 1, 37), (1000, 999, 64), 4, 4, 64),
    ("random", 12, 6, 2, 96),
]
CASES = CASES_GPU if HAS_GPU else CASES_CPU
MAX_RANDOM_LEN = 300 if HAS_GPU else 33


def _case_id(case):
    lq, lk, hq, hkv, d = case
    lens = f"random{lk}" if lq == "random" else f"q{'-'.join(map(str, lq))}_k{'-'.join(map(str, lk))}"
    return f"{lens}_h{hq}x{hkv}_d{d}"


def _cu(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _random_lens(batch):
    """Fresh lengths per test (the seed comes from conftest), with 0 and 1 on both sides."""
    lq = torch.randint(0, MAX_RANDOM_LEN + 1, (batch,)).tolist()
    lk = torch.randint(0, MAX_RANDOM_LEN + 1, (batch,)).tolist()
    lq[0], lk[0], lq[1], lk[1] = 0, 7, 1, 1
    lq[2], lk[2] = 5, 0
    return lq, lk


def _make(lens_q, lens_k, hq, hkv, d, dtype, dv=None):
    """Packed q, k, v (leaves with grad) and the varlen arguments (cu_seqlens_q/_k, max_seqlen_q/_k)."""
    dv = d if dv is None else dv
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(tk, hkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(tk, hkv, dv, device=DEVICE, dtype=dtype, requires_grad=True)
    meta = (_cu(lens_q), _cu(lens_k), max(lens_q, default=0), max(lens_k, default=0))
    return q, k, v, meta


def _make_case(case, dtype):
    lq, lk, hq, hkv, d = case
    if lq == "random":
        lq, lk = _random_lens(lk)
    return _make(lq, lk, hq, hkv, d, dtype)


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)



def check_against_oracle(q, k, v, meta, dout=None, backward=True, **kw):
    """Forward (out and lse) and gradients of flash_attn_varlen_func vs the oracle, FlashAttention's rule."""
    cu_q, cu_k, max_q, max_k = meta
    out, lse, _ = ft.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **kw)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=True, **kw)
    low, low_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **kw)
    assert out.shape == (q.shape[0], q.shape[1], v.shape[2]) and out.dtype == q.dtype
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    assert_matches_oracle((q, k, v), (out, lse), (ref, ref_lse), (low, low_lse), dout=dout, backward=backward)


def _per_sequence(q, k, v, meta, **kw):
    """flash_attn_func on each sequence alone, packed back: (out [total_q, Hq, Dv], lse [Hq, total_q])."""
    cu_q, cu_k = (c.tolist() for c in meta[:2])
    slopes = kw.pop("alibi_slopes", None)
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        s = slopes[b] if slopes is not None and slopes.dim() == 2 else slopes
        o, l, _ = ft.flash_attn_func(q[cu_q[b]:cu_q[b + 1]].unsqueeze(0), k[cu_k[b]:cu_k[b + 1]].unsqueeze(0),
                                     v[cu_k[b]:cu_k[b + 1]].unsqueeze(0), alibi_slopes=s, return_attn_probs=True,
                                     **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_oracle(case, causal, dtype, backend):
    q, k, v, meta = _make_case(case, dtype)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, meta, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,causal", [((8, 0), False), ((5, 11), False), ((5, 11), True), ((-1, 3), False),
                                           ((20, -1), True), ((0, 0), False)])
def test_sliding_window(window, causal, backend):
    """Edges relative to each sequence's own bottom-right diagonal; (0, 0) leaves rows with no key."""
    q, k, v, meta = _make((30, 0, 41, 1), (22, 9, 35, 3), 2, 1, 32, torch.float32)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, meta, window_size=window, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", ["softcap", "alibi", "alibi_batched", "softcap+alibi+causal", "softcap+window"])
def test_softcap_and_alibi(features, dtype, backend):
    lens_q, lens_k, hq, hkv = (23, 1, 0, 40), (31, 17, 5, 29), 4, 2
    q, k, v, meta = _make(lens_q, lens_k, hq, hkv, 40, dtype)
    kw = {}
    if "softcap" in features:
        kw["softcap"] = 1.5  # small cap: tanh far from linear, so a wrong derivative shows
    if "alibi" in features:
        shape = (len(lens_q), hq) if "batched" in features else (hq,)
        kw["alibi_slopes"] = torch.rand(*shape, device=DEVICE, dtype=torch.float32) * 0.5
    if "causal" in features:
        kw["causal"] = True
    if "window" in features:
        kw["window_size"] = (9, 3)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, meta, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equals_each_sequence_alone(dtype, backend):
    """Packing changes nothing: out, lse and gradients equal flash_attn_func run per sequence."""
    lens_q, lens_k, hq, hkv = (19, 0, 1, 44, 7), (25, 6, 1, 30, 0), 4, 2
    q, k, v, meta = _make(lens_q, lens_k, hq, hkv, 24, dtype, dv=40)
    kw = dict(causal=True, window_size=(12, -1), softcap=3.0, softmax_scale=0.3,
              alibi_slopes=torch.rand(len(lens_q), hq, device=DEVICE, dtype=torch.float32) * 0.3)
    dout = torch.randn(q.shape[0], hq, 40, device=DEVICE, dtype=dtype)
    with ft.use_backend(backend):
        out, lse, _ = ft.flash_attn_varlen_func(q, k, v, *meta, return_attn_probs=True, **kw)
        got = (out, lse) + _grads(out, (q, k, v), dout)
        alone_out, alone_lse = _per_sequence(q, k, v, meta, **kw)
        want = (alone_out, alone_lse) + _grads(alone_out, (q, k, v), dout)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if backend == "cpu":  # the same tiled code on the same views: bitwise equal
            assert torch.equal(g, w), name
        else:  # a varlen kernel may tile differently: equal up to rounding of the output dtype
            tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[g.dtype]
            torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences(backend):
    """Queries of a sequence without keys: out 0, lse -inf, dq 0; keys of a sequence without queries: dk = dv = 0."""
    lens_q, lens_k = (6, 0, 9, 4), (0, 8, 5, 11)
    q, k, v, meta = _make(lens_q, lens_k, 2, 1, 16, torch.float32)
    with ft.use_backend(backend):
        out, lse, _ = ft.flash_attn_varlen_func(q, k, v, *meta, return_attn_probs=True)
        dq, dk, dv = _grads(out, (q, k, v), torch.randn_like(out))
    assert torch.all(out[:6] == 0) and torch.all(lse[:, :6] == float("-inf")) and torch.all(dq[:6] == 0)
    assert torch.all(dk[:8] == 0) and torch.all(dv[:8] == 0)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.isfinite(lse[:, 6:]).all()
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, meta, causal=True)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("lens", [((), ()), ((0, 0), (0, 0)), ((0, 3), (2, 0))], ids=["batch0", "all_empty", "no_pairs"])
def test_no_work(lens, backend):
    """Zero sequences, or only empty ones: shapes right, out 0 / lse -inf, zero gradients."""
    q, k, v, meta = _make(*lens, 2, 2, 8, torch.float32)
    with ft.use_backend(backend):
        out, lse, _ = ft.flash_attn_varlen_func(q, k, v, *meta, return_attn_probs=True)
    assert out.shape == (q.shape[0], 2, 8) and lse.shape == (2, q.shape[0])
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    if out.numel():
        dq, dk, dv = _grads(out, (q, k, v), torch.randn_like(out))
        assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strides(backend):
    """q, k, v as slices of a packed [total, 3, H, D] tensor, and a last dim with stride 2 (copied)."""
    lens = (13, 0, 29, 1)
    qkv = torch.randn(sum(lens), 3, 2, 32, device=DEVICE, dtype=torch.float16)
    q, k, v = (t.requires_grad_() for t in qkv.unbind(1))
    assert not q.is_contiguous()
    meta = (_cu(lens), _cu(lens), max(lens), max(lens))
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, meta, causal=True)
    q, k, v = (torch.randn(sum(lens), 2, 48, device=DEVICE)[..., ::2].requires_grad_() for _ in range(3))
    assert q.stride(-1) == 2
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, meta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    q, k, v, meta = _make((30, 1, 23, 0, 17), (19, 35, 23, 4, 1), 4, 1, 32, torch.float16)
    dout = torch.randn(q.shape[0], 4, 32, device=DEVICE, dtype=torch.float16)
    runs = []
    with ft.use_backend(backend):
        for _ in range(2):
            out = ft.flash_attn_varlen_func(q, k, v, *meta, causal=True)
            runs.append((out,) + _grads(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_reference_backend_matches_oracle_and_cpu():
    """The 'reference' backend (oracle per sequence, torch autograd) against the oracle and the CPU path."""
    q, k, v, meta = _make((12, 0, 25, 3), (20, 4, 9, 0), 4, 2, 16, torch.float32)
    kw = dict(causal=True, softcap=2.0, alibi_slopes=torch.rand(4, 4, device=DEVICE) * 0.4)
    with ft.use_backend("reference"):
        check_against_oracle(q, k, v, meta, **kw)
        out_ref = ft.flash_attn_varlen_func(q, k, v, *meta, **kw)
    with ft.use_backend("cpu"):
        out_cpu = ft.flash_attn_varlen_func(q, k, v, *meta, **kw)
    assert (out_ref.double() - out_cpu.double()).abs().max() < 1e-5


def test_exported():
    assert "flash_attn_varlen_func" in ft.__all__
    from flashtile.varlen import flash_attn_varlen_func

    assert ft.flash_attn_varlen_func is flash_attn_varlen_func


def _bad_inputs():
    t = lambda *s, dt=torch.float32: torch.randn(*s, dtype=dt, device=DEVICE)  # noqa: E731
    cu = lambda *xs, dt=torch.int32: torch.tensor(xs, dtype=dt, device=DEVICE)  # noqa: E731
    q, k, v = t(10, 2, 16), t(12, 2, 16), t(12, 2, 16)
    ok_cu_q, ok_cu_k = cu(0, 4, 10), cu(0, 5, 12)

    def call(**over):
        args = dict(q=q, k=k, v=v, cu_seqlens_q=ok_cu_q, cu_seqlens_k=ok_cu_k, max_seqlen_q=6, max_seqlen_k=7)
        args.update(over)
        return args

    return [
        ("q must have 3 dims", call(q=t(1, 10, 2, 16)), ValueError),
        ("k must be a torch.Tensor", call(k=[1.0]), TypeError),
        ("dtype", call(q=t(10, 2, 16, dt=torch.float64)), TypeError),
        ("share one dtype", call(v=t(12, 2, 16, dt=torch.float16)), TypeError),
        ("same total_k", call(v=t(11, 2, 16)), ValueError),
        ("head_dim of q", call(q=t(10, 2, 32)), ValueError),
        ("multiple of heads", call(q=t(10, 3, 16)), ValueError),
        ("> 2048", call(q=t(10, 2, 2100), k=t(12, 2, 2100)), NotImplementedError),
        ("cu_seqlens_q must have dtype torch.int32", call(cu_seqlens_q=cu(0, 4, 10, dt=torch.int64)), TypeError),
        ("cu_seqlens_k must be a torch.Tensor", call(cu_seqlens_k=[0, 5, 12]), TypeError),
        ("cu_seqlens_q must be a 1-D", call(cu_seqlens_q=ok_cu_q.view(1, 3)), ValueError),
        (r"cu_seqlens_q\[0\] must be 0", call(cu_seqlens_q=cu(1, 4, 10)), ValueError),
        ("cu_seqlens_k must be non-decreasing", call(cu_seqlens_k=cu(0, 7, 5, 12), cu_seqlens_q=cu(0, 2, 4, 10)), ValueError),
        (r"cu_seqlens_q\[-1\] must equal total_q", call(cu_seqlens_q=cu(0, 4, 9)), ValueError),
        (r"cu_seqlens_k\[-1\] must equal total_k", call(cu_seqlens_k=cu(0, 5, 13)), ValueError),
        ("same length", call(cu_seqlens_q=cu(0, 4, 6, 10)), ValueError),
        ("max_seqlen_q = 5 is smaller", call(max_seqlen_q=5), ValueError),
        ("max_seqlen_k = 6 is smaller", call(max_seqlen_k=6), ValueError),
        ("max_seqlen_k must be an int", call(max_seqlen_k=7.0), TypeError),
        ("window_size", call(window_size=(-2, 0)), ValueError),
        ("softmax_scale", call(softmax_scale="x"), TypeError),
        ("dropout_p", call(dropout_p=1.0), ValueError),
        ("softcap", call(softcap=-1.0), ValueError),
        ("alibi_slopes must have shape", call(alibi_slopes=torch.ones(3, 2, device=DEVICE)), ValueError),
        ("alibi_slopes must be float32", call(alibi_slopes=torch.ones(2, device=DEVICE, dtype=torch.float16)), TypeError),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    match, kwargs, exc = case
    with pytest.raises(exc, match=match):
        ft.flash_attn_varlen_func(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True)], ids=["plain", "causal"])
def test_dropout_is_the_exact_function_of_its_padded_pattern(kw, backend):
    """Sequence b draws keep[b, :, :Sq_b, :Sk_b] of the padded pattern flash_attn_varlen_func returns
    (max_seqlen above the longest sequence too); forward and gradients against the oracle with it."""
    q, k, v, meta = _make([5, 0, 17, 9], [7, 3, 17, 0], 4, 2, 16, torch.float32)
    cu_q, cu_k, max_q, max_k = meta
    torch.manual_seed(11)
    with ft.use_backend(backend):
        out, lse, keep = ft.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q + 3, max_k, dropout_p=0.3,
                                                   return_attn_probs=True, **kw)
    assert keep.shape == (4, 4, max_q + 3, max_k) and keep.dtype == torch.bool
    ref = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=True, dropout_p=0.3, dropout_mask=keep, **kw)
    low = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, dropout_p=0.3, dropout_mask=keep, **kw)
    assert_matches_oracle((q, k, v), (out, lse), ref, low)
    # the same seed gives the same bits on every backend
    torch.manual_seed(11)
    with ft.use_backend("cpu"):
        again = ft.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q + 3, max_k, dropout_p=0.3,
                                          return_attn_probs=True, **kw)
    assert torch.equal(again[2], keep)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (cu_seqlens on cpu, q on cuda)")
def test_cu_seqlens_on_wrong_device():
    q = torch.randn(4, 1, 8, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q is on cpu"):
        ft.flash_attn_varlen_func(q, q, q, cu, cu.to(DEVICE), 4, 4)


def test_cu_seqlens_checked_again_after_an_in_place_change():
    """The host copy of the offsets is reused only while the tensor is unchanged: an in-place write
    (which bumps its version counter) is checked again, not trusted from an earlier call."""
    q = torch.randn(10, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    ft.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
    cu[1] = 7  # still valid: the new longest sequence is 7
    with pytest.raises(ValueError, match="max_seqlen_q = 6 is smaller"):
        ft.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
    cu[2] = 11
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] must equal total_q"):
        ft.flash_attn_varlen_func(q, q, q, cu, cu, 7, 7)
    with torch.inference_mode():  # no version counter: read every call
        frozen = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
        assert ft.flash_attn_varlen_func(q, q, q, frozen, frozen, 6, 6).shape == q.shape
