"""Dropout's random keep mask, defined once and evaluated identically by the kernels and by torch.

Element (i, j) of head (b, h) has the counter n = ((b * Hq + h) * Sq + i) * Sk + j. Keys j and j + 8
(bit 3 of j clear) share one 32-bit counter-based hash of n - (j & 8) and a 64-bit seed (two 31-bit
halves drawn from torch's default generator, so torch.manual_seed makes runs reproducible): key j
reads its low 16 bits, key j + 8 its high 16 bits, and a key is kept iff its 16 bits are >=
threshold(p). The drop probability is therefore p rounded down to a multiple of 2^-16 (off by less
than 1.6e-5); outputs are still scaled by 1 / (1 - p). Nothing S x S is stored: the backward
regenerates the bits. kernels/common.py:dropout_keep is the Triton form of keep_bits below: it works
in uint32 (multiplies wrap mod 2^32), which is this file's int64 arithmetic with the low 32 bits kept,
so the two agree bit for bit (tests/test_dropout.py checks it).
"""

from __future__ import annotations

from typing import Tuple

import torch

_M32 = 0xFFFFFFFF
# The kernels count a tile's counters from its first one in 32 bits: rows * Sk < 2^31 for tiles of up
# to 128 rows
MAX_KEYS = 2**24


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
    """Keep iff a key's 16 random bits are >= threshold: a keep probability of 1 - dropout_p (to 2^-16)."""
    return int(dropout_p * (1 << 16))


def pair_hash(counters: torch.Tensor, seed: Tuple[int, int]) -> torch.Tensor:
    """The 32-bit hash of int64 counters (each the counter of a key with bit 3 clear): lowbias32 of the low half,
    keyed by the seed and by lowbias32 of the high half."""
    key = _mix32((counters >> 32) ^ seed[1]) ^ seed[0]
    return _mix32((counters & _M32) ^ key)


def keep_bits(row_base: torch.Tensor, cols: torch.Tensor, seed: Tuple[int, int], dropout_p: float) -> torch.Tensor:
    """Bool keep mask of keys ``cols`` (int64) of rows whose first counter is ``row_base`` (int64,
    broadcast against cols: ((b * Hq + h) * Sq + i) * Sk)."""
    x = pair_hash(row_base + (cols & ~8), seed)
    return ((x >> (16 * ((cols >> 3) & 1))) & 0xFFFF) >= threshold(dropout_p)


def keep_tile(b0: int, b1: int, heads_q: int, heads_kv: int, q_lo: int, q_hi: int, k_lo: int, k_hi: int,
              seqlen_q: int, seqlen_k: int, seed: Tuple[int, int], dropout_p: float,
              device: torch.device) -> torch.Tensor:
    """Keep mask of one CPU-path tile, laid out like its scores: [b1 - b0, Hkv, group * rows, keys]."""
    b = torch.arange(b0, b1, device=device, dtype=torch.int64)
    h = torch.arange(heads_q, device=device, dtype=torch.int64)
    i = torch.arange(q_lo, q_hi, device=device, dtype=torch.int64)
    j = torch.arange(k_lo, k_hi, device=device, dtype=torch.int64)
    rows = (b[:, None] * heads_q + h[None, :])[:, :, None] * seqlen_q + i  # [nb, Hq, rows]
    keep = keep_bits(rows[..., None] * seqlen_k, j, seed, dropout_p)  # [nb, Hq, rows, keys]
    return keep.view(b1 - b0, heads_kv, (heads_q // heads_kv) * (q_hi - q_lo), k_hi - k_lo)


def pattern(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, seed: Tuple[int, int], dropout_p: float,
            device: torch.device) -> torch.Tensor:
    """The whole keep mask [B, Hq, Sq, Sk] (what return_attn_probs=True returns with dropout)."""
    keep = keep_tile(0, batch, heads_q, heads_q, 0, seqlen_q, 0, seqlen_k, seqlen_q, seqlen_k, seed, dropout_p,
                     device)
    return keep.view(batch, heads_q, seqlen_q, seqlen_k)
