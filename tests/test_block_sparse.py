"""block_mask= through the public API: Triton kernels (GPU or interpreter) and the CPU path vs the oracle."""

import pytest
import torch

import flashtile as ft
from flashtile.reference import attention_ref
from conftest import DEVICE, HAS_GPU
from oracle import assert_matches_oracle

BACKENDS = ["triton"] if HAS_GPU else ["triton", "cpu"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if HAS_GPU else [torch.float16, torch.float32]


def _qkv(B, Sq, Sk, Hq, Hkv, D, dtype):
    mk = lambda S, H: torch.randn(B, S, H, D, device=DEVICE, dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(Sq, Hq), mk(Sk, Hkv), mk(Sk, Hkv)


def _random_mask(Bm, Hm, Sq, Sk, block, intervals=False):
    """Random element mask with whole empty and whole full blocks, so all three block kinds occur.
    intervals: each row sees one random interval of keys (document / window-like), so every partial
    block's rows are intervals (the kernels' BLOCK_SPARSE 3 path); else random elements."""
    if intervals:
        lo = torch.randint(0, Sk, (Bm, Hm, Sq, 1), device=DEVICE)
        hi = lo + torch.randint(0, Sk // 2 + 1, (Bm, Hm, Sq, 1), device=DEVICE)
        keys = torch.arange(Sk, device=DEVICE)
        mask = (keys >= lo) & (keys < hi)
    else:
        mask = torch.rand(Bm, Hm, Sq, Sk, device=DEVICE) > 0.4
    nq, nk = -(-Sq // block[0]), -(-Sk // block[1])
    kinds = torch.randint(0, 3, (Bm, Hm, nq, nk), device=DEVICE)
    expand = kinds.repeat_interleave(block[0], 2).repeat_interleave(block[1], 3)[:, :, :Sq, :Sk]
    return torch.where(expand == 0, False, torch.where(expand == 2, True, mask))


def _check(q, k, v, bm, **kw):
    out, lse, _ = ft.flash_attn_func(q, k, v, return_attn_probs=True, block_mask=bm, **kw)
    assert_matches_oracle((q, k, v), (out, lse), attention_ref(q, k, v, upcast=True, block_mask=bm, **kw),
                          attention_ref(q, k, v, upcast=False, block_mask=bm, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("partial_rows", ["elements", "intervals"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(shape=(2, 70, 70, 2, 2, 32), mask=(2, 1), block=(16, 16)),
    dict(shape=(1, 45, 77, 4, 2, 40), mask=(1, 4), block=(32, 16), causal=True),
    dict(shape=(2, 64, 50, 2, 1, 16), mask=(1, 1), block=(16, 32), window_size=(20, 5)),
    dict(shape=(1, 33, 33, 3, 3, 24), mask=(1, 3), block=(16, 16), softcap=2.0),
    # seqlen_q a multiple of the block and no rule: no query tile crosses the sequence end
    dict(shape=(2, 64, 83, 2, 2, 32), mask=(1, 2), block=(32, 16)),
], ids=["batch-bcast", "gqa-causal", "mqa-window", "softcap", "aligned-rows"])
def test_block_mask_matches_oracle(case, dtype, partial_rows, backend):
    q, k, v = _qkv(*case["shape"], dtype)
    B, Sq, Sk = case["shape"][:3]
    mask = _random_mask(*case["mask"], Sq, Sk, case["block"], intervals=partial_rows == "intervals")
    bm = ft.BlockMask.from_dense(mask, block_size=case["block"])
    assert (bm.partial_intervals is not None) == (partial_rows == "intervals")  # which kernel path runs
    kw = {key: case[key] for key in ("causal", "window_size", "softcap") if key in case}
    with ft.use_backend(backend):
        _check(q, k, v, bm, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_builders_and_empty_blocks_are_never_read(backend):
    """Keys in empty blocks are poisoned with NaN: they must not reach the output or the gradients."""
    B, S, H, D, blk = 1, 96, 2, 32, 16
    docs = torch.tensor([0] * 40 + [1] * 30 + [2] * 26, device=DEVICE)
    bm = ft.BlockMask.document(docs, block_size=(blk, blk), causal=True)
    q, k, v = _qkv(B, S, S, H, H, D, torch.float32)
    with ft.use_backend(backend):
        _check(q, k, v, bm)
    empty_cols = (bm.kind[0, 0] == 0).all(0).nonzero().flatten()  # key blocks empty for every query block
    k2, v2 = k.detach().clone(), v.detach().clone()
    for kb in empty_cols.tolist():
        k2[:, kb * blk:(kb + 1) * blk] = float("nan")
        v2[:, kb * blk:(kb + 1) * blk] = float("nan")
    with ft.use_backend(backend):
        out = ft.flash_attn_func(q.detach(), k2, v2, block_mask=bm)
        causal = ft.flash_attn_func(q.detach(), k.detach(), v.detach(),
                                   block_mask=ft.BlockMask.causal(S, S, (blk, blk), device=DEVICE))
        plain_causal = ft.flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True)
    assert torch.isfinite(out).all()
    assert (causal - plain_causal).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_accepts_block_mask(backend):
    B, H, S, D = 1, 2, 48, 16
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE) for _ in range(3))
    bm = ft.BlockMask.sliding_window(S, S, (10, 0), block_size=(16, 16), device=DEVICE)
    with ft.use_backend(backend):
        out = ft.scaled_dot_product_attention(q, k, v, block_mask=bm)
    ref, _ = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm)
    assert (out.transpose(1, 2).double() - ref.double()).abs().max() < 1e-5


def test_block_mask_errors():
    q, k, v = _qkv(1, 32, 32, 2, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="block_mask"):
        ft.flash_attn_func(q, k, v, block_mask=torch.ones(32, 32, dtype=torch.bool))
    wrong = ft.BlockMask.causal(48, 48, (16, 16), device=DEVICE)
    with pytest.raises(ValueError, match="block_mask"):
        ft.flash_attn_func(q, k, v, block_mask=wrong)
    if HAS_GPU:  # a mask on another device than the inputs is refused, naming the fix
        with pytest.raises(ValueError, match=r"block_mask.*\.to\(device\)"):
            ft.flash_attn_func(q, k, v, block_mask=ft.BlockMask.causal(32, 32, (16, 16)))
    odd = ft.BlockMask.causal(32, 32, (24, 16), device=DEVICE)
    with ft.use_backend("triton"), pytest.raises(NotImplementedError, match="powers of two"):
        ft.flash_attn_func(q, k, v, block_mask=odd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(40, 9))], ids=["causal", "window"])
def test_full_blocks_with_causal_or_window_edges(kw, backend):
    """Full blocks away from the causal / window edges take the unmasked path, those on an edge the
    masked one: with every block full the result is plain causal / window attention."""
    q, k, v = _qkv(1, 100, 130, 2, 1, 32, torch.float32)
    bm = ft.BlockMask.from_blocks(torch.ones(1, 1, 4, 5, dtype=torch.bool, device=DEVICE), block_size=(32, 32),
                                  seqlen_q=100, seqlen_k=130)
    with ft.use_backend(backend):
        _check(q, k, v, bm, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_mask_under_torch_compile(backend):
    """A block mask travels through the custom ops flattened (BlockMask.parts): one graph (fullgraph),
    the same output and gradients as eager."""
    q, k, v = _qkv(1, 70, 70, 2, 1, 32, torch.float32)
    docs = torch.tensor([0] * 30 + [1] * 40, device=DEVICE)
    bm = ft.BlockMask.document(docs, block_size=(16, 16), causal=True)

    def f(q, k, v):
        return ft.flash_attn_func(q, k, v, causal=True, block_mask=bm)

    dout = torch.randn(1, 70, 2, 32, device=DEVICE)
    with ft.use_backend(backend):
        want = f(q, k, v)
        want_grads = torch.autograd.grad(want, (q, k, v), dout)
        compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
        got = compiled(q, k, v)
        got_grads = torch.autograd.grad(got, (q, k, v), dout)
    assert (got - want).abs().max() < 1e-5
    for g, w in zip(got_grads, want_grads):
        assert (g - w).abs().max() < 1e-5


def test_custom_ops_with_block_mask_pass_opcheck():
    from flashtile import ops

    q, k, v = _qkv(1, 40, 40, 2, 2, 16, torch.float32)
    bm = ft.BlockMask.from_dense(_random_mask(1, 1, 40, 40, (16, 16)), block_size=(16, 16))
    args = (q, k, v, 0.25, None, None, 0.0, None, None, None, 0, 0, None, 0.0, 0, 0, "triton", *bm.parts())
    torch.library.opcheck(ops.attention_fwd, args)
