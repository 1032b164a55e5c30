"""Head dims as two power-of-two column chunks (tuning.head_dim_chunks) in the dense kernels.

D = 96 runs as 64 + 32 columns instead of a padded 128-wide tile; every kernel then carries a second
Q / K / V / dO tile and a second accumulator. These cases pick head dims whose tail chunk is whole
(48 = 32 + 16) or padded (40 = 32 + 16 with 8 masked columns), on Q/K, on V, or on both, with each
feature that touches the tile loops, against the float64 oracle (FlashAttention's rule).
"""

import pytest
import torch

import flashtile as ft
from flashtile.attention_launch import _head_dim_flags
from flashtile.reference import attention_ref
from flashtile.tuning import head_dim_chunks, padded_head_dim
from conftest import DEVICE, HAS_GPU
from oracle import assert_matches_oracle

DTYPES = [torch.float16, torch.bfloat16, torch.float32] if HAS_GPU else [torch.float16, torch.float32]

# (head_dim, head_dim_v): split with a whole tail, split with a padded tail, split on one side only
DIMS_CPU = [(48, 48), (40, 72), (80, 24), (24, 96)]
DIMS_GPU = DIMS_CPU + [(96, 96), (192, 128), (160, 160), (77, 199)]
DIMS = DIMS_GPU if HAS_GPU else DIMS_CPU
FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window-softcap": dict(window_size=(5, 11), softcap=2.0),
    "alibi": dict(alibi=True),
}


def _is_pow2(n):
    return n > 0 and n & (n - 1) == 0


def test_chunks_cover_the_head_dim_with_less_padding():
    assert head_dim_chunks(96) == (64, 32)
    assert head_dim_chunks(80) == (64, 16)
    assert head_dim_chunks(192) == (128, 64)
    assert head_dim_chunks(128) == (128, 0)
    assert head_dim_chunks(199) == (256, 0)  # 128 + 128: no saving, one tile
    assert head_dim_chunks(3) == (16, 0)
    for d in range(1, 257):
        first, tail = head_dim_chunks(d)
        assert _is_pow2(first) and first >= 16, d
        assert first + tail >= d and first + tail <= padded_head_dim(d), d
        if tail:
            assert _is_pow2(tail) and tail >= 16 and first < d and first + tail < padded_head_dim(d), d


def test_launch_flags_describe_the_chunks():
    flags = _head_dim_flags(40, 96)
    assert (flags["BLOCK_D"], flags["BLOCK_D2"], flags["EVEN_D"], flags["EVEN_D2"]) == (32, 16, True, False)
    assert (flags["BLOCK_DV"], flags["BLOCK_DV2"], flags["EVEN_DV"], flags["EVEN_DV2"]) == (64, 32, True, True)
    flags = _head_dim_flags(59, 128)
    assert (flags["BLOCK_D"], flags["BLOCK_D2"], flags["EVEN_D"]) == (64, 0, False)
    assert (flags["BLOCK_DV"], flags["BLOCK_DV2"], flags["EVEN_DV"]) == (128, 0, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"d{d[0]}_dv{d[1]}")
def test_split_head_dims_match_oracle(dims, feature, dtype):
    D, Dv = dims
    B, Sq, Sk, Hq, Hkv = (2, 300, 257, 4, 2) if HAS_GPU else (1, 37, 45, 4, 2)
    mk = lambda S, H, d: torch.randn(B, S, H, d, device=DEVICE, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = mk(Sq, Hq, D), mk(Sk, Hkv, D), mk(Sk, Hkv, Dv)
    kw = dict(FEATURES[feature])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(B, Hq, device=DEVICE, dtype=torch.float32)
    with ft.use_backend("triton"):
        out, lse, _ = ft.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert out.shape == (B, Sq, Hq, Dv)
    assert_matches_oracle((q, k, v), (out, lse), attention_ref(q, k, v, upcast=True, **kw),
                          attention_ref(q, k, v, upcast=False, **kw))
