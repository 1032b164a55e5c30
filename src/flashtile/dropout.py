"""Dropout's random keep mask, defined once and evaluated identically by the kernels and by torch.

Element (i, j) of head (b, h) has the counter ((b * Hq + h) * Sq + i) * Sk + j; its keep bit is a
counter-based hash of that counter and a 64-bit seed (two 31-bit halves drawn from torch's default
generator, so torch.manual_seed makes runs reproducible). Nothing S x S is stored: the backward
regenerates the bits. kernels/common.py:dropout_keep is the Triton form of keep_bits below: it works
in uint32 (multiplies wrap mod 2^32), which is this file's int64 arithmetic with the low 32 bits kept,
so the two agree bit for bit (tests/test_dropout.py checks it).
"""

from __future__ import annotations

from typing import Tuple

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def new_seed() -> Tuple[int, int]:
    """Two 31-bit seed halves from torch's default generator (reproducible under torch.manual_seed)."""
    lo, hi = torch.randint(0, 2**31 - 1, (2,)).tolist()
    return int(lo), int(hi)


def threshold(dropout_p: float) -> int:
    """Keep iff (hash >> 8) >= threshold: a keep probability of 1 - dropout_p (to 2^-24)."""
    return int(dropout_p * (1 << 24))


def keep_bits(offsets: torch.Tensor, seed: Tuple[int, int], dropout_p: float) -> torch.Tensor:
    """Bool keep mask of the elements whose counters are `offsets` (int64)."""
    x = _mix32((offsets & _M32) ^ seed[0])
    x = _mix32(x ^ (offsets >> 32) ^ seed[1])
    return (x >> 8) >= threshold(dropout_p)


def keep_tile(b0: int, b1: int, heads_q: int, heads_kv: int, q_lo: int, q_hi: int, k_lo: int, k_hi: int,
              seqlen_q: int, seqlen_k: int, seed: Tuple[int, int], dropout_p: float,
              device: torch.device) -> torch.Tensor:
    """Keep mask of one CPU-path tile, laid out like its scores: [b1 - b0, Hkv, group * rows, keys]."""
    b = torch.arange(b0, b1, device=device, dtype=torch.int64)
    h = torch.arange(heads_q, device=device, dtype=torch.int64)
    i = torch.arange(q_lo, q_hi, device=device, dtype=torch.int64)
    j = torch.arange(k_lo, k_hi, device=device, dtype=torch.int64)
    rows = (b[:, None] * heads_q + h[None, :])[:, :, None] * seqlen_q + i  # [nb, Hq, rows]
    offsets = rows[..., None] * seqlen_k + j  # [nb, Hq, rows, keys]
    keep = keep_bits(offsets, seed, dropout_p)
    return keep.view(b1 - b0, heads_kv, (heads_q // heads_kv) * (q_hi - q_lo), k_hi - k_lo)


def pattern(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, seed: Tuple[int, int], dropout_p: float,
            device: torch.device) -> torch.Tensor:
    """The whole keep mask [B, Hq, Sq, Sk] (what return_attn_probs=True returns with dropout)."""
    keep = keep_tile(0, batch, heads_q, heads_q, 0, seqlen_q, 0, seqlen_k, seqlen_q, seqlen_k, seed, dropout_p,
                     device)
    return keep.view(batch, heads_q, seqlen_q, seqlen_k)
