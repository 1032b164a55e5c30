"""Dropout's random keep mask, defined once and evaluated identically by the kernels and by torch.

Query row i of head (b, h) is row r = (b * Hq + h) * Sq + i, and has the 32-bit key k_r = (r + seed_hi)
* ROW_MULT mod 2^32, the 64-bit seed being two 31-bit halves drawn from torch's default generator (so
torch.manual_seed makes runs reproducible). Keys j and j + 8 of the row (bit 3 of j clear) share the
hash mix(k_r + j + seed_lo), mix being lowbias32 without its first xorshift: key j reads its low 16
bits, key j + 8 its high 16 bits, and a key is kept iff its 16 bits are >= threshold(p). The drop
probability is therefore p rounded down to a multiple of 2^-16 (off by less than 1.6e-5); outputs are
still scaled by 1 / (1 - p). Nothing S x S is stored: the backward regenerates the bits.
kernels/common.py:dropout_row_keys and dropout_keep are the Triton form of keep_bits below: they work
in uint32 (multiplies wrap mod 2^32), which is this file's int64 arithmetic with the low 32 bits kept,
so the two agree bit for bit (tests/test_dropout.py checks it). The mixer's first multiply distributes
over the sum, so the kernels multiply the row part (one multiply-add a row, which the dK/dV kernels
recompute on every tile) and the key part (fixed per program) apart, and per element pay one add, the
rest of the mixer and a compare; row numbers are 32-bit, so B * Hq * Sq is at most 2^32 (MAX_ROWS;
api.py checks it).
"""

from __future__ import annotations

from typing import Tuple

import torch

_M32 = 0xFFFFFFFF
# Row numbers (b * Hq + h) * Sq + i are 32-bit in the kernels; a larger grid would repeat row keys
MAX_ROWS = 2**32
# The row key's odd multiplier (2^32 / golden ratio): rows map to keys one to one, and neighbouring
# rows' keys differ in many bits, before the element hash mixes them fully
ROW_MULT = 0x9E3779B1


# the mixer's first multiplier (the kernels apply it to the row and key parts apart: kernels/common.py)
MIX_MULT_1 = 0x7FEB352D


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 without its first xorshift: the row keys are products, so their high bits already
    reach every bit through the multiply-xorshift-multiply-xorshift that follows (every output bit
    depends on every input bit)."""
    x = (x * MIX_MULT_1) & _M32
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


def row_key(rows: torch.Tensor, seed: Tuple[int, int]) -> torch.Tensor:
    """The 32-bit key of query rows ``rows`` (int64 row numbers (b * Hq + h) * Sq + i, < MAX_ROWS)."""
    return ((rows + seed[1]) * ROW_MULT) & _M32


def keep_bits(rows: torch.Tensor, cols: torch.Tensor, seed: Tuple[int, int], dropout_p: float) -> torch.Tensor:
    """Bool keep mask of keys ``cols`` (int64) of query rows ``rows`` (int64 row numbers, broadcast
    against cols)."""
    x = _mix32((row_key(rows, seed) + (cols & ~8) + seed[0]) & _M32)
    return ((x >> (16 * ((cols >> 3) & 1))) & 0xFFFF) >= threshold(dropout_p)


def keep_tile(b0: int, b1: int, heads_q: int, heads_kv: int, q_lo: int, q_hi: int, k_lo: int, k_hi: int,
              seqlen_q: int, seed: Tuple[int, int], dropout_p: float, device: torch.device) -> torch.Tensor:
    """Keep mask of one CPU-path tile, laid out like its scores: [b1 - b0, Hkv, group * rows, keys];
    seqlen_q: the row grid's queries per head (varlen: the maximum)."""
    b = torch.arange(b0, b1, device=device, dtype=torch.int64)
    h = torch.arange(heads_q, device=device, dtype=torch.int64)
    i = torch.arange(q_lo, q_hi, device=device, dtype=torch.int64)
    j = torch.arange(k_lo, k_hi, device=device, dtype=torch.int64)
    rows = (b[:, None] * heads_q + h[None, :])[:, :, None] * seqlen_q + i  # [nb, Hq, rows]
    keep = keep_bits(rows[..., None], j, seed, dropout_p)  # [nb, Hq, rows, keys]
    return keep.view(b1 - b0, heads_kv, (heads_q // heads_kv) * (q_hi - q_lo), k_hi - k_lo)


def pattern(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, seed: Tuple[int, int], dropout_p: float,
            device: torch.device) -> torch.Tensor:
    """The whole keep mask [B, Hq, Sq, Sk] (what return_attn_probs=True returns with dropout)."""
    keep = keep_tile(0, batch, heads_q, heads_q, 0, seqlen_q, 0, seqlen_k, seqlen_q, seed, dropout_p, device)
    return keep.view(batch, heads_q, seqlen_q, seqlen_k)
