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
"""

from __future__ import annotations

import torch

ALIGN = 16  # elements: Triton's binder marks an integer argument divisible by 16 or not at all


def padded_width(d: int) -> int:
    """The head dim the kernels see for a head dim of d."""
    return -(-d // ALIGN) * ALIGN


def rows_aligned(t: torch.Tensor) -> bool:
    """Whether t can go to the kernels as is: last dim a multiple of ALIGN and unit-stride, every
    other stride a multiple of ALIGN, data 16-byte aligned."""
    strides = t.stride()  # checked on every launch (about 1 us a tensor)
    return (t.shape[-1] % ALIGN == 0 and strides[-1] == 1 and not any(map(ALIGN.__rmod__, strides[:-1]))
            and t.data_ptr() % 16 == 0)


def aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself when rows_aligned, else a contiguous copy zero-padded to padded_width in its last dim."""
    if t.numel() == 0 or rows_aligned(t):
        return t
    d = t.shape[-1]
    out = torch.empty((*t.shape[:-1], padded_width(d)), dtype=t.dtype, device=t.device)
    out[..., :d].copy_(t)
    out[..., d:].zero_()
    return out


def narrowed(t: torch.Tensor, d: int) -> torch.Tensor:
    """t's first d columns of its last dim, contiguous (t itself when it already has d)."""
    return t if t.shape[-1] == d else t[..., :d].contiguous()
