"""Head-dim padding for attention inputs whose rows the kernels cannot load in 16-element vectors.

Why: on the H200 with Triton 3.6, the fp16 forward kernel at head dim 29 with a value head dim of
1-8 and a V row stride of 2-16 elements (more than one head) returned wrong outputs with its
default config and hit illegal memory accesses with dropout (tests/test_fuzz.py found it; the
probe swept D in {16, 29, 64} and Dv in 1..24, 1..8 at D=64). Every failing launch had K or V rows that the
compiler could not load as vectors; no launch with head dims and strides that are multiples of 16
failed (docs/perf_notes.md, session 11).
FlashAttention-2's interface pads head dims the same way (to multiples of 8) before its kernels.

So the attention launchers hand the kernels only tensors whose last dim is a multiple of ALIGN,
whose other strides are multiples of ALIGN and whose data starts on a 16-byte boundary. Anything
else is copied into a fresh zero-padded buffer: zero columns of Q and K add nothing to the scores,
zero columns of V / dO / O give zero output and gradient columns, which are sliced off. The common
shapes (D = 64, 96, 128, 256 in contiguous or head-transposed layouts) pass through untouched.

The split-D kernels (wide_launch.py) get head dims padded further, to SPLIT_D_COLUMNS: they step
over the head dims in 64-column chunks, and a chunk that ends inside the head dim takes masked
loads all the way through. H200, bf16, B=1, H=48, S=8192, backward ms, masked -> padded (the same
bits out): D=257 84.1 -> 60.3 (causal 44.6 -> 28.4), D=300 92.7 -> 60.7, D=333 125.8 -> 77.9, D=352
124.9 -> 78.0 (causal 64.3 -> 41.6); H=16: D=480 62.1 -> 37.9, D=1000 164.8 -> 102.9. The split-D
forward gains too (D=480 9.12 -> 8.13 ms, D=1000 26.4 -> 23.0). The dense forward of D = 257..384
keeps the 16-column rule: there the copies cost about what the masks do (D=333 +11%, D=352 causal
-16%, docs/perf_notes.md, session 21).
"""

from __future__ import annotations

import torch

ALIGN = 16  # elements: Triton's binder marks an integer argument divisible by 16 or not at all
SPLIT_D_COLUMNS = 64  # the split-D kernels' head-dim step (WideConfig.block_k is 32 or 64)


def padded_width(d: int, columns: int = ALIGN) -> int:
    """The head dim the kernels see for a head dim of d (columns: ALIGN, or SPLIT_D_COLUMNS)."""
    return -(-d // columns) * columns


def rows_aligned(t: torch.Tensor, columns: int = ALIGN) -> bool:
    """Whether t can go to the kernels as is: last dim a multiple of columns and unit-stride, every
    other stride a multiple of ALIGN, data 16-byte aligned."""
    strides = t.stride()  # checked on every launch (about 1 us a tensor)
    return (t.shape[-1] % columns == 0 and strides[-1] == 1 and not any(map(ALIGN.__rmod__, strides[:-1]))
            and t.data_ptr() % 16 == 0)


def aligned_rows(t: torch.Tensor, columns: int = ALIGN) -> torch.Tensor:
    """t itself when rows_aligned, else a contiguous copy zero-padded to padded_width in its last dim."""
    if t.numel() == 0 or rows_aligned(t, columns):
        return t
    d = t.shape[-1]
    out = torch.empty((*t.shape[:-1], padded_width(d, columns)), dtype=t.dtype, device=t.device)
    out[..., :d].copy_(t)
    out[..., d:].zero_()
    return out


def narrowed(t: torch.Tensor, d: int) -> torch.Tensor:
    """t's first d columns of its last dim, contiguous (t itself when it already has d)."""
    return t if t.shape[-1] == d else t[..., :d].contiguous()
