"""Wide heads (head dims 257..2048, the split-D kernels of kernels/attention_wide.py) against the oracle.

Same rule and style as test_attention.py: flash_attn_func / flash_attn_varlen_func /
scaled_dot_product_attention vs reference.attention_ref (float64 on CPU), FlashAttention's tolerance
(factor 2 for out / lse, 3 for gradients), Triton natively on a GPU or under the interpreter on a
CPU, plus the tiled CPU path. Dqk != Dv (MLA's 192/128 and 576/512) is covered on both sides of 256.
"""

import pytest
import torch

import flashtile as ft
from flashtile import attention_launch, dispatch, row_align, wide_launch
from conftest import DEVICE, HAS_GPU
from flashtile.reference import attention_ref, attention_varlen_ref
from oracle import assert_matches_oracle, assert_results_match_oracle
from test_attention import check_against_oracle
from test_varlen import _make as make_packed
from test_varlen import check_against_oracle as check_varlen_against_oracle

DTYPES = [torch.float16, torch.bfloat16, torch.float32] if HAS_GPU else [torch.float16, torch.float32]
HALF = torch.bfloat16 if HAS_GPU else torch.float16  # the interpreter has no bf16 dot
BACKENDS = ["triton"] if HAS_GPU else ["triton", "cpu"]

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v): the head dims,
# odd lengths, Sq != Sk both ways, GQA / MQA, and Dqk != Dv (MLA pairs, one side <= 256)
SHAPES_CPU = [
    (1, 37, 37, 2, 1, 257, 257),
    (1, 29, 43, 2, 2, 320, 320),
    (2, 19, 19, 2, 1, 333, 333),
    (1, 33, 21, 1, 1, 512, 512),
    (1, 17, 40, 2, 2, 640, 640),
    (1, 23, 23, 3, 1, 1000, 1000),
    (1, 16, 31, 1, 1, 1024, 1024),
    (1, 45, 45, 2, 1, 576, 512),
    (1, 30, 30, 2, 2, 192, 128),  # the dense kernel (both <= 256), MLA's pair
    (1, 21, 37, 1, 1, 64, 640),
    (1, 21, 21, 2, 1, 320, 100),
]
SHAPES_GPU = SHAPES_CPU + [
    (2, 257, 257, 4, 2, 320, 320),
    (1, 513, 1023, 4, 1, 512, 512),
    (1, 1000, 700, 2, 2, 1024, 1024),
    (1, 300, 300, 4, 4, 576, 512),
    (1, 777, 777, 2, 1, 1000, 1000),
    (1, 129, 200, 4, 2, 704, 333),
    (1, 200, 333, 2, 1, 768, 768),  # 384-wide backward slices: dV and dK on 128-query steps, dQ on 64
]
SHAPES = SHAPES_GPU if HAS_GPU else SHAPES_CPU


def _make(shape, dtype):
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    return tuple(torch.randn(*s, device=DEVICE, dtype=dtype).requires_grad_()
                 for s in ((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv)))


def _shape_id(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_oracle(shape, causal, dtype, backend):
    if backend == "cpu" and dtype == torch.float16 and shape[5] not in (333, 576):
        pytest.skip("CPU path: fp16 on two shapes is enough (it is the same code for every D)")
    if dtype == torch.float32 and HAS_GPU and shape[1] * shape[5] > 500_000:
        # the GPU oracle is float32 itself, so the rule's bound degenerates to 1e-5 absolute, below
        # float32 rounding of dV / dK sums this long; fp32 is checked on the other shapes
        pytest.skip("fp32 vs a float32 oracle at this size: bound below float32 rounding")
    q, k, v = _make(shape, dtype)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
@pytest.mark.parametrize("kw", [dict(window_size=(8, 0)), dict(window_size=(5, 11)), dict(window_size=(-1, 3)),
                                dict(softcap=1.5), dict(alibi_slopes="batched", causal=True),
                                dict(softcap=2.0, window_size=(20, -1))], ids=str)
def test_variants(kw, dtype, backend):
    """Sliding window, softcap and ALiBi run in the wide kernels with the dense kernels' semantics; in
    16 bits the forward runs the dense kernel (dispatch.wide_forward_heads), the backward the wide ones."""
    if backend == "cpu" and dtype != torch.float32:
        pytest.skip("the CPU path does not choose kernels; fp32 covers it")
    q, k, v = _make((2, 50, 57, 2, 1, 300, 280), dtype)
    if kw.get("alibi_slopes") == "batched":
        kw = dict(kw, alibi_slopes=torch.rand(2, 2, device=DEVICE, dtype=torch.float32) * 0.5)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows(backend):
    """Causal with Sq > Sk: the first Sq - Sk rows see no key: out 0, lse -inf, zero dq."""
    q, k, v = _make((1, 50, 20, 2, 1, 320, 320), torch.float32)
    with ft.use_backend(backend):
        out, lse, _ = ft.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        check_against_oracle(q, k, v, causal=True)
    assert torch.all(out[:, :30] == 0) and torch.all(lse[:, :, :30] == float("-inf"))
    assert torch.all(dq[:, :30] == 0) and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    S = 77 if HAS_GPU else 40
    q, k, v = _make((1, S, S, 4, 2, 640, 640), torch.float16)
    dout = torch.randn(1, S, 4, 640, device=DEVICE, dtype=torch.float16)
    with ft.use_backend(backend):
        runs = [torch.autograd.grad(ft.flash_attn_func(q, k, v, causal=True), (q, k, v), dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_poisoned_outputs_are_fully_written(monkeypatch):
    """Outputs allocated full of NaN: every element (out, lse, delta, dq, dk, dv) is written."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(attention_launch, "_empty", nan_empty)  # forward_buffers / backward_buffers: both launchers
    q, k, v = _make((2, 67, 51, 4, 2, 333, 700) if HAS_GPU else (1, 40, 33, 2, 1, 333, 700), torch.float16)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(causal, backend):
    q, k, v, meta = make_packed((5, 0, 17, 1, 30), (9, 3, 17, 0, 23), 4, 2, 320, torch.float32, dv=512)
    with ft.use_backend(backend):
        check_varlen_against_oracle(q, k, v, meta, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_dot_product_attention(backend):
    """torch's layout and semantics (top-left causal, GQA) with D = 384, Dv = 257."""
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 23, 41
    q = torch.randn(B, Hq, Sq, 384, device=DEVICE, dtype=torch.float32, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, 384, device=DEVICE, dtype=torch.float32, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, 257, device=DEVICE, dtype=torch.float32, requires_grad=True)
    with ft.use_backend(backend):
        out = ft.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.05, enable_gqa=True)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=0.05, enable_gqa=True)
    assert out.shape == ref.shape and (out.double() - ref).abs().max() < 1e-5
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_head_dim(backend):
    q, k, v = _make((1, 9, 12, 1, 1, 2048, 2048), torch.float32)
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, causal=True)
    with pytest.raises(ft.UnsupportedError, match="2049"):
        ft.flash_attn_func(*_make((1, 4, 4, 1, 1, 2049, 64), torch.float32))


MASK_SHAPES = {"2d": lambda B, H, Sq, Sk: (Sq, Sk), "batch": lambda B, H, Sq, Sk: (B, 1, Sq, Sk),
               "key-row": lambda B, H, Sq, Sk: (1, H, 1, Sk), "full": lambda B, H, Sq, Sk: (B, H, Sq, Sk)}


def test_block_mask_raises():
    """What the wide kernels do not have yet raises UnsupportedError (a NotImplementedError) on the Triton path."""
    q, k, v = _make((1, 32, 32, 2, 2, 320, 320), torch.float16)
    with ft.use_backend("triton"), pytest.raises(NotImplementedError, match="block_mask"):
        ft.flash_attn_func(q, k, v, block_mask=ft.BlockMask.causal(32, 32, block_size=(16, 16), device=DEVICE))


@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
def test_attn_mask_gradient_matches_oracle(mask_shape):
    """An additive attn_mask that requires grad gets dS summed over its broadcast dims (GQA, Dqk != Dv,
    two Dqk slices in the dQ kernel: one of them writes dS); hidden keys (-inf) get zero gradient."""
    B, Sq, Sk, Hq, Hkv, D, Dv = 2, 21, 27, 2, 1, 640, 320
    q, k, v = _make((B, Sq, Sk, Hq, Hkv, D, Dv), torch.float32)
    bias = torch.randn(*MASK_SHAPES[mask_shape](B, Hq, Sq, Sk), device=DEVICE) * 2.0
    bias[..., 1::7] = float("-inf")
    bias.requires_grad_()
    sdpa = lambda *t: ft.scaled_dot_product_attention(*(x.transpose(1, 2) for x in t[:3]), attn_mask=t[3],  # noqa: E731
                                                      scale=0.05, enable_gqa=True)
    with ft.use_backend("triton"):
        out = sdpa(q, k, v, bias)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in leaves[:3]), attn_mask=leaves[3], scale=0.05, enable_gqa=True)
    assert (out.double() - ref).abs().max() < 1e-4
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), dout)
    want = torch.autograd.grad(ref, leaves, dout.double())
    assert got[3].shape == bias.shape
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert (g.double() - w).abs().max() < 1e-4 * (1 + w.abs().max()), name


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
@pytest.mark.parametrize("shape", [(1, 29, 43, 2, 2, 320, 320), (2, 19, 19, 2, 1, 333, 333), (1, 21, 21, 2, 1, 320, 100)],
                         ids=_shape_id)
def test_attn_mask_matches_oracle(shape, mask_shape, kind):
    """torch SDPA's attn_mask (bool or additive, broadcast to [B, Hq, Sq, Sk]) in the wide forward, dQ
    and dK / dV kernels: out, lse and gradients against the oracle, FlashAttention's rule."""
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    dtype = torch.bfloat16 if HAS_GPU else torch.float16
    q, k, v = _make(shape, dtype)
    mshape = MASK_SHAPES[mask_shape](B, Hq, Sq, Sk)
    if kind == "bool":
        mask = torch.rand(*mshape, device=DEVICE) > 0.4
        mask[..., 0] = True  # every row keeps a key (fully masked rows: the next test)
    else:
        mask = (torch.randn(*mshape, device=DEVICE) * 2.0).to(dtype)
    dout = torch.randn(B, Sq, Hq, Dv, device=DEVICE, dtype=dtype)
    scale = D ** -0.5
    with ft.use_backend("triton"), torch.no_grad():
        out, lse = attention_launch.attention_forward(q, k, v, scale, attn_mask=mask)
        grads = attention_launch.attention_backward(dout, q, k, v, out, lse, scale, attn_mask=mask)
    assert_results_match_oracle(q, k, v, dout, (out, lse), grads, softmax_scale=scale, attn_mask=mask)


def test_attn_mask_fully_masked_rows():
    """A row whose bool mask hides every key gives out 0 and lse -inf, and finite gradients (as the
    dense kernels do); the other rows are unaffected."""
    q, k, v = _make((1, 24, 24, 2, 1, 320, 320), torch.float32)
    mask = torch.rand(24, 24, device=DEVICE) > 0.5
    mask[:, 0] = True
    mask[5] = False
    with ft.use_backend("triton"):
        out = ft.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                              enable_gqa=True)
        dq, = torch.autograd.grad(out.sum(), (q,))
    assert torch.all(out[:, :, 5] == 0) and torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert torch.all(dq[:, 5] == 0)


@pytest.mark.parametrize("dims, dtype, wide", [
    ((320, 320), torch.bfloat16, False), ((257, 1), torch.float16, False), ((384, 384), torch.float16, False),
    ((29, 300), torch.bfloat16, False), ((320, 100), torch.bfloat16, False), ((192, 128), torch.bfloat16, False),
    ((385, 385), torch.bfloat16, True), ((448, 448), torch.bfloat16, True), ((576, 512), torch.bfloat16, True),
    ((64, 640), torch.float16, True), ((320, 320), torch.float32, True), ((257, 257), torch.float32, True),
], ids=str)
def test_forward_kernel_choice(dims, dtype, wide):
    """Head dims 257..384 (register tiles of at most 384 columns) in 16 bits run the dense forward
    kernel on Hopper and in the interpreter; wider tiles, fp32 and a block_mask keep the split-D one."""
    device = torch.device(DEVICE)
    if HAS_GPU and torch.cuda.get_device_capability()[0] < 9 and not wide and max(dims) > 256:
        wide = True  # unmeasured on Ampere: the split-D kernel stays
    assert dispatch.wide_forward_heads(*dims, dtype, device) == wide
    assert dispatch.wide_forward_heads(*dims, dtype, device, block_mask=object()) == (max(dims) > 256)
    assert dispatch.wide_heads(*dims) == (max(dims) > 256)  # the backward stays split-D ...
    assert dispatch.dense_dq_heads(*dims, dtype, device) == (not wide and max(dims) > 256)  # ... but for dQ
    # causal or windowed calls keep the split-D dQ at 384-wide tiles
    assert dispatch.dense_dq_heads(*dims, dtype, device, masked=True) == (not wide and 256 < max(dims) <= 320)


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_forward_runs_the_chosen_kernel(dtype, monkeypatch):
    """The launch follows wide_forward_heads: a 16-bit D=320 forward never enters the split-D launcher,
    fp32 does, and both match the oracle through the wide backward."""
    calls = []
    real = wide_launch.wide_forward
    monkeypatch.setattr(wide_launch, "wide_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _make((1, 45, 39, 2, 1, 320, 320), dtype)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=True)
    assert bool(calls) == dispatch.wide_forward_heads(320, 320, dtype, q.device)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(9, 4), softcap=3.0, alibi_slopes=True)],
                         ids=["causal", "window-softcap-alibi"])
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_backward_runs_the_chosen_dq_kernel(dtype, kw, monkeypatch):
    """The split-D backward takes its dQ (and delta) from the dense dQ kernel where
    dispatch.dense_dq_heads says so (16-bit D=320 here), else from the split-D dQ kernel; either way
    dK / dV stay split-D and every gradient matches the oracle (GQA, Sq != Sk). The Gluon backward,
    which would take the 16-bit causal case on sm_90, is switched off here."""
    monkeypatch.setattr(wide_launch, "gluon_backward_applies", lambda *a, **kw: False)
    ran = []
    real = wide_launch._run
    monkeypatch.setattr(wide_launch, "_run", lambda kernel, *a: ran.append(kernel) or real(kernel, *a))
    q, k, v = _make((1, 45, 39, 4, 2, 320, 320), dtype)
    if kw.get("alibi_slopes"):
        kw = dict(kw, alibi_slopes=torch.rand(4, device=DEVICE, dtype=torch.float32) * 0.5)
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, **kw)
    dense = dispatch.dense_dq_heads(320, 320, dtype, q.device)
    assert ran.count(wide_launch.wide_dkdv_kernel) == 2
    assert (wide_launch.wide_dq_kernel in ran) == (not dense)


def test_explicit_wide_config_keeps_the_split_d_dq(monkeypatch):
    """A WideBackwardConfig passed in runs all three split-D kernels (as tuning's sweeps need), also
    where the dense dQ would be chosen (16-bit causal D=320); both routes match the oracle."""
    from flashtile.tuning import wide_backward_config

    ran = []
    real = wide_launch._run
    monkeypatch.setattr(wide_launch, "_run", lambda kernel, *a: ran.append(kernel) or real(kernel, *a))
    q, k, v = _make((1, 37, 37, 2, 1, 320, 320), HALF)
    dout = torch.randn_like(q)
    scale = 320 ** -0.5
    with torch.no_grad():
        out, lse = attention_launch.attention_forward(q, k, v, scale, None, 0)
        cfg = wide_backward_config(q.device, 320, 320, HALF, True)
        split = attention_launch.attention_backward(dout, q, k, v, out, lse, scale, None, 0, config=cfg)
        split_ran, ran[:] = list(ran), []
        default = attention_launch.attention_backward(dout, q, k, v, out, lse, scale, None, 0)
    assert wide_launch.wide_dq_kernel in split_ran and wide_launch.wide_dq_kernel not in ran
    assert_results_match_oracle(q, k, v, dout, (out, lse), split, softmax_scale=scale, causal=True)
    assert_results_match_oracle(q, k, v, dout, (out, lse), default, softmax_scale=scale, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_split_d_kernels_get_aligned_rows(dtype, monkeypatch):
    """Head dims that are not multiples of 64 (and rows that start off a 16-byte boundary) reach the
    split-D kernels as zero-padded copies (row_align.SPLIT_D_COLUMNS): every [.., H, D] tensor a wide
    launch gets has 64-column rows, and the results, narrowed back, match the oracle. (The Gluon
    backward, which would take the 16-bit case on sm_90, is switched off; it reads the same padded rows.)"""
    monkeypatch.setattr(wide_launch, "gluon_backward_applies", lambda *a, **kw: False)
    seen = []
    real = wide_launch._run

    def spy(kernel, grid, cfg, args, meta):
        seen.extend(t for t in args if isinstance(t, torch.Tensor) and t.dim() == 4)  # [B, S, H, D]
        return real(kernel, grid, cfg, args, meta)

    monkeypatch.setattr(wide_launch, "_run", spy)
    _, k, v = _make((1, 33, 41, 2, 1, 333, 257), dtype)
    q = torch.randn(1, 33, 2, 334, device=DEVICE, dtype=dtype)[..., 1:].requires_grad_()  # starts off 16 bytes
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=True)
    assert seen and all(row_align.rows_aligned(t, row_align.SPLIT_D_COLUMNS) for t in seen)


def test_max_mode_choice():
    """attention_launch.max_mode: the lazy rescale only where the accumulator is 384 columns wide."""
    mm, L = attention_launch.max_mode, attention_launch
    assert mm(0.0, torch.bfloat16, False, 0, 384) == mm(0.0, torch.float16, True, 2, 321) == L.MAX_LAZY
    # narrower accumulators keep the running max (over unscaled q.k where only a scale makes the score)
    assert mm(0.0, torch.bfloat16, False, 0, 320) == mm(0.0, torch.bfloat16, False, 0, 128) == L.MAX_RAW
    assert mm(0.0, torch.bfloat16, True, 0, 320) == L.MAX_RUNNING
    assert mm(30.0, torch.bfloat16, False, 0, 384) == L.MAX_FIXED  # a bounding softcap wins
    assert mm(30.0, torch.float16, False, 0, 384) == L.MAX_LAZY
    assert mm(0.0, torch.bfloat16, False, 0, 384, has_left=True) == L.MAX_RAW  # a window's short walk


@pytest.mark.parametrize("causal", [False, True])
def test_lazy_rescale_when_row_maxima_grow(causal):
    """Dv = 384 runs the lazy rescale (MAX_LAZY): from key 40 on, the keys are 10x larger, so most rows'
    maxima jump by far more than the slack (a skipped rescale would overflow p), while one head's
    queries are 50x smaller and their maxima stay within it; causal with Sq > Sk adds rows that see
    no key. Out, lse and gradients against the oracle."""
    q, k, v = _make((1, 75, 60, 2, 1, 384, 384), HALF)
    with torch.no_grad():
        k[:, 40:] *= 10.0
        q[:, :, 1] *= 0.02
    assert attention_launch.max_mode(0.0, q.dtype, False, 0, v.shape[-1]) == attention_launch.MAX_LAZY
    with ft.use_backend("triton"):
        check_against_oracle(q, k, v, causal=causal)


@pytest.mark.parametrize("dim, max_part, want", [
    (257, 512, (256, 64, 1)), (320, 512, (256, 64, 1)), (333, 512, (256, 128, 1)), (448, 512, (512, 0, 1)),
    (512, 512, (512, 0, 1)), (640, 512, (256, 64, 2)), (832, 512, (512, 0, 2)), (1000, 512, (512, 0, 2)),
    (1024, 512, (512, 0, 2)), (1024, 256, (256, 0, 4)), (64, 512, (64, 0, 1)), (100, 512, (128, 0, 1)),
])
def test_wide_parts(dim, max_part, want):
    """Slices of the produced head dim: two power-of-two tiles, as few programs as max_part allows."""
    a, b, n = wide_launch.wide_parts(dim, max_part)
    assert (a, b, n) == want
    assert n * (a + b) >= dim and (n - 1) * (a + b) < dim and a + b <= max_part


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_strides_without_copies(backend):
    """[B, H, S, D] storage seen through transposed views, and a q sliced out of a wider buffer."""
    B, S, H, D = 1, 37, 2, 320
    q_store = torch.randn(B, S, H, D + 64, device=DEVICE)
    q = q_store[..., 16:16 + D].requires_grad_()
    k, v = (torch.randn(B, H, S, D, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(2))
    with ft.use_backend(backend):
        check_against_oracle(q, k, v, causal=True)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(7, 3), softcap=2.0)],
                         ids=["plain", "causal", "window-softcap"])
@pytest.mark.parametrize("shape", [(2, 29, 43, 2, 1, 320, 320), (1, 21, 21, 2, 2, 333, 100)], ids=_shape_id)
def test_dropout_is_the_exact_function_of_its_pattern(shape, kw):
    """Dropout in the wide kernels: out, lse and gradients equal the oracle run with the returned keep
    pattern (the dense kernels' counters and hash, so one pattern for every head dim)."""
    dtype = torch.bfloat16 if HAS_GPU else torch.float16
    q, k, v = _make(shape, dtype)
    with ft.use_backend("triton"):
        out, lse, keep = ft.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True, **kw)
    B, Sq, Sk, Hq = shape[0], shape[1], shape[2], shape[3]
    assert keep.dtype == torch.bool and keep.shape == (B, Hq, Sq, Sk)
    assert_matches_oracle((q, k, v), (out, lse),
                          attention_ref(q, k, v, dropout_p=0.3, dropout_mask=keep, upcast=True, **kw),
                          attention_ref(q, k, v, dropout_p=0.3, dropout_mask=keep, upcast=False, **kw))



@pytest.mark.parametrize("kw", [dict(), dict(causal=True)], ids=["plain", "causal"])
def test_varlen_dropout_is_the_exact_function_of_its_padded_pattern(kw):
    """Packed sequences with dropout in the wide kernels: sequence b draws keep[b, :, :Sq_b, :Sk_b] of
    the padded pattern (max_seqlen above the longest sequence too), as in the dense kernels."""
    q, k, v, meta = make_packed([5, 0, 17, 9], [7, 3, 17, 0], 2, 1, 320, torch.float32)
    cu_q, cu_k, max_q, max_k = meta
    torch.manual_seed(11)
    with ft.use_backend("triton"):
        out, lse, keep = ft.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q + 3, max_k, dropout_p=0.3,
                                                   return_attn_probs=True, **kw)
    ref = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=True, dropout_p=0.3, dropout_mask=keep, **kw)
    low = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, dropout_p=0.3, dropout_mask=keep, **kw)
    assert_matches_oracle((q, k, v), (out, lse), ref, low)


# The dense kernels once gave wrong results on the H200 at odd head dims with small value head dims
# (test_attention.test_small_value_head_dims_grid); the split-D kernels get the same grid: one side
# wide, the other tiny or odd, rows 1-29 elements apart, several key tiles, with and without dropout.
@pytest.mark.skipif(not HAS_GPU, reason="a GPU compilation question; the interpreter runs the CPU shapes above")
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dims", [(257, 1), (333, 3), (333, 8), (300, 29), (29, 300), (3, 333)],
                         ids=lambda d: f"D{d[0]}-Dv{d[1]}")
def test_small_head_dim_beside_a_wide_one(dims, dropout_p):
    D, Dv = dims
    for H in (1, 2):
        q, k, v = (torch.randn(1, n, H, d, device=DEVICE, dtype=torch.float16).requires_grad_()
                   for n, d in ((64, D), (300, D), (300, Dv)))
        out, lse, keep = ft.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=H == 2, return_attn_probs=True)
        kw = dict(causal=H == 2, **(dict(dropout_p=dropout_p, dropout_mask=keep) if dropout_p else {}))
        assert_matches_oracle((q, k, v), (out, lse), attention_ref(q, k, v, upcast=True, **kw),
                              attention_ref(q, k, v, upcast=False, **kw))
