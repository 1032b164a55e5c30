"""Key / value layouts whose offsets inside the kernels' key loops fit in 32 bits.

Why: the kernels' key loops address key tile start_n of K and V as start_n * stride_s, a product of
two 32-bit scalars (every per-program base offset is 64-bit). In the usual [B, S, H, D] layout
stride_s = H * D, so a batch's keys of 2^31 elements or more (e.g. 512K keys x 32 heads x 128)
would wrap around and address the wrong memory. Such K / V go to the kernels heads-first instead:
the same [B, S, H, D] view of a [B, H, S, D] copy, whose sequence stride is the head dim. The copy
is made only for inputs that large; a single head of 2^31 elements or more raises instead.
Keeping the loops' 32-bit products leaves the kernels that every other shape runs unchanged.
"""

from __future__ import annotations

import torch

from flashtile.errors import UnsupportedError

INT32_LIMIT = 2**31


def keys_in_range(t: torch.Tensor, seqlen: int, varlen: bool) -> torch.Tensor:
    """t (K or V: [B, Sk, H, D], or packed [total_k, H, D] when varlen) itself when seqlen key rows
    of it span less than 2^31 elements, else a heads-first copy (same shape and values)."""
    seq_dim = 0 if varlen else 1
    if seqlen * t.stride(seq_dim) < INT32_LIMIT:
        return t
    if seqlen * t.shape[-1] >= INT32_LIMIT:  # heads-first, the sequence stride is the head dim
        raise UnsupportedError(f"{seqlen} keys x head dim {t.shape[-1]}: one head's keys or values pass the "
                               "kernels' 32-bit offsets (2^31 elements)")
    return t.transpose(seq_dim, seq_dim + 1).contiguous().transpose(seq_dim, seq_dim + 1)
