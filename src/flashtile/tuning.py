"""Tile sizes, warps and pipeline depth per (architecture, head dim, dtype, feature flags).

Fixed tables, chosen by sweeps on the hardware (see BENCHMARKS.md): no autotuning at call time, so
the first call is as fast as the hundredth and the interpreter (which cannot autotune) gets one
config too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch
import triton

from flashtile.dispatch import triton_interpreting


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    dkdv: KernelConfig
    dq: KernelConfig
    # dK/dV walks a causal key tile's masked and unmasked query tiles in separate loops (the kernel's
    # SPLIT_PHASES) instead of one loop with a per-tile mask branch
    split_phases: bool = False
    # dK/dV may take the sequence lengths as compile-time constants once a signature repeats
    # (attention_launch.constant_lengths; where, see dkdv_constant_lengths)
    constant_lengths: bool = False
    # with constant lengths, dK/dV loads lse / delta as aligned rows (the kernel's ALIGN_LSE; where,
    # see dkdv_aligned_rows)
    aligned_rows: bool = False


@functools.lru_cache(maxsize=None)
def padded_head_dim(d: int) -> int:
    """Register tiles need a power of two; tl.dot needs at least 16."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def head_dim_chunks(d: int) -> Tuple[int, int]:
    """(first, tail): a head dim as one or two power-of-two column chunks of the dense kernels.

    A register tile needs a power of two, so a head dim between two (96, 80, 160, 192) padded to the
    next one wastes up to half the tensor-core work. Two chunks, the largest power of two below d and
    the padded rest, cover it with less (96 = 64 + 32, 80 = 64 + 16, 192 = 128 + 64); tail = 0 where
    that saves nothing (d a power of two, 199 -> 128 + 128). H200, bf16, B=2, H=16, S=8192 forward
    (a prototype of the split against the padded kernel, TFLOP/s): D=80 304 -> 404, 96 367 -> 407,
    160 339 -> 470, 192 394 -> 507; D=128 as 64 + 64 503 against 493 unsplit.
    """
    padded = padded_head_dim(d)
    first = 1 << (max(d, 1).bit_length() - 1)
    if first < 16 or first == d:
        return padded, 0
    tail = padded_head_dim(d - first)
    return (first, tail) if first + tail < padded else (padded, 0)


def tile_width(d: int) -> int:
    """Columns of d's register tiles (head_dim_chunks' two chunks together)."""
    return sum(head_dim_chunks(d))


def padded_columns(head_dim: int, dtype: torch.dtype, backward: bool) -> int:
    """The column multiple that the dense launchers pad a head dim's rows to (row_align.aligned_rows):
    row_align.ALIGN (16), or the register tile's width where zero columns measured faster than the
    masked loads of a tile that ends inside the head dim (the results are the same bits).

    H200, bf16, B=2, H=16, S=8192, ms non-causal / causal, 16-column rows -> padded to the tile:
      backward: D=176 (tile 192) 14.55 -> 12.23 / 8.63 -> 7.42; D=200 (256) 25.07 -> 21.63 / 12.81 ->
        11.87; D=232 (256) 25.37 -> 21.67 / 13.06 -> 11.99; D=152 (160) 11.58 -> 11.60 / 6.31 -> 6.34;
        tiles of 128 and less stay: D=100 7.26 -> 7.06 / 4.99 -> 4.39 but D=112 7.08 -> 7.35 / 4.43 ->
        4.52, D=72 (80) unchanged;
      forward: D=200 5.19 -> 4.90 / 2.82 -> 2.74, D=232 5.34 -> 4.96 / 2.94 -> 2.81; but D=176 3.33 ->
        3.56 / 1.75 -> 2.02, D=112 2.39 -> 2.50 / 1.18 -> 1.44, D = 257..384 (B=1, H=48; 64-column
        rows) 257 / 352 causal -4% / -16%, 300 / 333 +5% / +11%: only 256-wide tiles pad.
    fp32 (other tiles, CUDA-core dots where they do not fit) is unmeasured and keeps 16.
    """
    from flashtile.row_align import ALIGN

    tile = tile_width(head_dim)
    if dtype not in (torch.float16, torch.bfloat16) or tile == head_dim or tile > 256:
        return ALIGN
    if tile == 256 or (backward and tile > 128):
        return tile
    return ALIGN


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _arch(device: torch.device) -> Optional[Tuple[int, int]]:
    if device.type != "cuda" or triton_interpreting():
        return None
    return device_capability(device.index if device.index is not None else torch.cuda.current_device())


# Short forward walks run tiles that fit two programs on an SM (_short_forward): causal calls up to this
# many keys, non-causal ones below LONG_FORWARD_KEYS
SHORT_CAUSAL_FORWARD_KEYS = 1024
LONG_FORWARD_KEYS = 2048  # from here plain calls above D = 64 run 128-key tiles (forward_config)


def forward_config(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                   causal: bool, plain_keys: int = 0, long_bool_mask: bool = False,
                   fixed_max: bool = False, alibi: bool = False, causal_blocks: bool = False) -> KernelConfig:
    """Config of attention_fwd_kernel. plain_keys: the key count of a call without per-score work
    beyond causal and ALiBi (no window, softcap, dropout, attn_mask, block mask; not varlen), else 0.
    long_bool_mask: at least LONG_FORWARD_KEYS keys and the same, except for a bool attn_mask.
    fixed_max: the kernel's MAX_MODE = MAX_FIXED (a softcap bounds the scores,
    attention_launch.fixed_max). alibi: ALiBi slopes are given; causal_blocks: a causal call with a
    block mask."""
    arch = _arch(device)
    d = max(tile_width(head_dim), tile_width(head_dim_v))
    if arch is None:  # interpreter: every op is a numpy call, so fewer larger tiles run faster
        return KernelConfig(32, 32, 4, 1)
    fp32 = dtype == torch.float32
    if arch[0] >= 9 and not fp32 and d <= 128:
        short = _short_forward(d, causal, plain_keys, alibi, causal_blocks)
        if short is not None:
            return short
    if arch[0] >= 9:
        # H200 sweep (bf16, S=4096): 128x64, 8 warps, 3 stages leads for D <= 128 (411 / 470 TFLOP/s
        # non-causal D=64 / 128); D=256 needs 2 stages to fit shared memory (479).
        if fp32:
            return KernelConfig(64, 32, 4, 2) if d > 128 else KernelConfig(128, 32, 8, 2)
        if fixed_max and 64 < d <= 128:
            # softcap without a running max (H200, cap 30, forward TFLOP/s, 128x64 s3 -> 128x32 s3):
            # B=2, H=16, S=8192 non-causal 412 -> 472-493, causal 408 -> 463-475; B=8, S=2048 377 ->
            # 459-466, causal 326 -> 369; D=96 322 -> 398-401. s4 / s5 within 2%, 64x64 w4 s3 and 128x32
            # w4 below; D=64 keeps 128x64 (128x32: 303 against 346), and so do caps above the bound
            # (cap 50: 413 -> 411: the per-tile max and rescale are what the narrow tiles shed). Wider
            # heads keep theirs too: D=192 474-501 against 428 (128x32 s3), D=256 (H=8) 467-470 / causal
            # 491 against 473-474 / 458-462
            return KernelConfig(128, 32, 8, 3)
        if plain_keys >= LONG_FORWARD_KEYS and 64 < d <= 128:
            # 128-key tiles (224 KB of shared memory): H200 A/B, 3 interleaved rounds, D=128 against
            # 128x64: S=8192 non-causal / causal / ALiBi / ALiBi causal / GQA causal +3.6 / +5.0 /
            # +3.8 / +4.2 / +2.0%, S=2048 +1.9 / +0.4%; but S=512 -2.2%, windows -6 / -7%, softcap
            # -3 / -12%, dropout -13%, varlen -4%, random block masks -6% and D=64 -17%, which keep
            # 128x64 (a bool attn_mask: below). Head dims in two chunks (head_dim_chunks) gain too,
            # forward, S = 2048 / 8192 (B*S = 16384, H = 2048 // D): D=96 +3.5 / +4.3%, causal +5.5 /
            # +9.7%; D=80 +0.7 / +1.5%, causal +2.5 / +4.4%
            return KernelConfig(128, 128, 8, 3)
        if long_bool_mask and d == 128 and max(head_dim, head_dim_v) > 64:
            # scripts/tune_forward.py attn_mask (B=4, H=16, S=4096, bool [B, 1, S, S] mask): 128x128 w8
            # on 2 stages (the mask tile leaves no room for 3) 1.21x 128x64 w8 s3; 128x64 s2 1.01x,
            # 64x64 w4 0.96x. An additive bias prefers 128x64 s3 (128x128 s2: 0.92x)
            return KernelConfig(128, 128, 8, 2)
        if d <= 128:
            return KernelConfig(128, 64, 8, 3)
        if d <= 192:  # head dims split in two chunks (head_dim_chunks): the 3-stage prototype's tiles
            return KernelConfig(128, 64, 8, 3)
        if d > 256:
            # 16-bit heads of 257..384 (dispatch.wide_forward_heads). H200, bf16, B=1, H=48, S=8192,
            # TFLOP/s at D = 320 / 384: 128x32 w8 s3 461 / 356 (384's 3 stages do not fit: the launch
            # falls back to 2), s2 327 / 358; 64x32 w4 s3 340 / 313; 128x64 s1 310 / 253; 64x64 w8 s2
            # 242 / 176; 64x64 w4 s2 185 / 102
            return KernelConfig(128, 32, 8, 3 if d <= 320 else 2)
        return KernelConfig(128, 64, 8, 2)
    # Ampere and older: smaller shared memory
    if d <= 64:
        return KernelConfig(128, 64, 4, 3)
    if d <= 128:
        return KernelConfig(128, 32 if fp32 else 64, 8, 2)
    return KernelConfig(64, 32, 8, 1)


def _short_forward(d: int, causal: bool, plain_keys: int, alibi: bool, causal_blocks: bool) -> Optional[KernelConfig]:
    """forward_config's tiles for short walks (16-bit, head dims up to 128, sm_90), or None.

    A program that walks few key tiles spends much of its time loading Q and storing O; tiles of at
    most 128 registers a thread (128x32 w8: 125, 64x64 w4: 214 with 128 threads) let two programs share
    an SM, so one's prologue and epilogue overlap the other's loop. H200, bf16, forward through
    flash_attn_func, 16k tokens (B = 16384 / S, H = 2048 / D), speed-up over 128x64 w8 s3, 5 rounds:
    - non-causal, 64 < D <= 128: 128x32 w8 s3 at D=128 S=512 / 1024 1.13 / 1.08 (64x64 w4 1.07 / 1.06;
      at S=2048 the 128-key tiles' 1.07 lead it), D=96 1.12 / 1.06; but ALiBi 0.82 and D=64 0.87, which
      keep theirs;
    - causal: 64x64 w4 s3 at D=128 S=512 / 1024 1.11 / 1.06 (the 128-key tiles 0.92 / 0.95), ALiBi
      and GQA (4:1) at 1024 1.07 / 1.10, D=96 at 1024 1.12, D=64 at 512 / 1024 1.12 / 1.09; the variants
      suite's 8-document mask (causal, S=8192, documents of 354-2828 tokens) 1.08 (its random block
      masks, non-causal: 0.98-1.03, and varlen 1.00 keep theirs). This sweep also put 64x64 ahead at
      2048 keys (D=128 1.05 against the 128-key tiles' 1.01; D=64 1.05, at 4096 1.04), but the
      standard suite's A/B (the benchmark, 3 rounds alternating with the tree before) measured it
      slower there: D=128 S=2048 370-371 -> 357-383 TFLOP/s, D=64 S=2048 338-343 -> 330-336, S=4096
      377-381 -> 362-376; at 512 / 1024 it confirmed the gains (D=128 206-208 -> 228-229 / 298-299 ->
      307-310, D=64 195-197 -> 219-220 / 275-276 -> 284-287), so the rule stops at 1024 keys."""
    if causal and (causal_blocks or 0 < plain_keys <= SHORT_CAUSAL_FORWARD_KEYS):
        return KernelConfig(64, 64, 4, 3)
    if not causal and not alibi and 64 < d and 0 < plain_keys < LONG_FORWARD_KEYS:
        return KernelConfig(128, 32, 8, 3)
    return None


# Key counts over which a causal backward walks its tiles in phases (BackwardConfig.split_phases):
# measured faster at 4096 and 8192 keys (with the heads in tile-major groups, attention_launch.
# program_order) and no faster at 1024-2048. At 16384 keys (B=1, H=16, head-major) it had lost with
# run-time lengths (forward+backward 9990 us one-loop against 10141-10269 for every split / grouped
# variant); with constant lengths and their aligned lse / delta loads it wins: dK/dV 5039-5069 ->
# 3884-3928 us, step 9808-10323 -> 9099-9249 (longer sequences are unmeasured)
LONG_CAUSAL_KEYS = (4096, 16384)
# A masked backward whose dK/dV programs walk few query tiles (a causal one with at most this many keys,
# or a window at most SHORT_WINDOW wide) runs 32x64 dK/dV tiles (BackwardConfig, short_walk)
SHORT_CAUSAL_KEYS = 1024
SHORT_WINDOW = 512
# Up to these lengths (medium_walk) the 32x64 tiles also win once the dK/dV launch takes the lengths as
# compile-time constants (dkdv_constant_lengths). H200, bf16, D=128, dK/dV launch alone, the tiles
# then in use -> 32x64 w4 with constants (us): causal S=2048 808 -> 710, S=4096 (split phases) 1347 ->
# 1255, S=8192 2438 -> 2511 (so it stops at 4096); window (1024, 0) 785 -> 722, (1024, 1024) 1354 ->
# 1305. Not for dropout (its own tiles, backward_config) or GQA (unmeasured; its split phases gain from
# the constants).
# A call that runs these tiles with run-time lengths (a signature's first call, or past
# MAX_CONSTANT_SHAPES) ran 1.5% faster than the 64x128 tiles at 2048 keys, 2.6-5.8% slower at 4096
MEDIUM_CAUSAL_KEYS = 4096
MEDIUM_WINDOW = 2048
# The narrow dK/dV tile (32 keys x 64 queries, 4 warps) of softcap causal, short and medium walks,
# two-chunk causal dropout and D = 129..160: 3 stages since session 35 (the third stage cut their dK/dV
# time by up to 17%, but lost at D=160 causal; 4 stages lost everywhere; _backward_tiles has the numbers)
NARROW_DKDV = KernelConfig(32, 64, 4, 3)


def backward_config(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                    causal: bool, block_sparse: bool = False, softcap: bool = False,
                    partial_blocks: bool = False, long_causal: bool = False,
                    short_walk: bool = False, dropout: bool = False, grouped: bool = False,
                    medium_walk: bool = False) -> BackwardConfig:
    """Configs of attention_bwd_dkdv_kernel and attention_bwd_dq_kernel (block_sparse: a block_mask is
    set, partial_blocks: it has partial blocks; softcap: softcap > 0; long_causal: causal without a
    window, block mask or varlen, with a key count in LONG_CAUSAL_KEYS; short_walk: causal with at most
    SHORT_CAUSAL_KEYS keys or a window at most SHORT_WINDOW wide, without a block mask; dropout: p > 0;
    grouped: GQA / MQA; medium_walk: causal, neither block mask nor varlen, with at most
    MEDIUM_CAUSAL_KEYS keys or a window at most MEDIUM_WINDOW wide). Dropout runs 64x64 w4 dK/dV tiles
    at head dims <= 64 and causal ones in one 128-column chunk (in one loop), causal 32x64 w4 ones for
    the other head dims up to 128, with constant lengths."""
    if medium_walk and not dropout and not grouped:  # the short walk's tiles, with constant lengths
        short_walk, long_causal = True, False
    tiles = _backward_tiles(device, head_dim, head_dim_v, dtype, causal, block_sparse, softcap, partial_blocks,
                            long_causal, short_walk)
    d = max(tile_width(head_dim), tile_width(head_dim_v))
    if dropout and not block_sparse and _arch(device) is not None and dtype != torch.float32:
        # H200, p=0.1, forward+backward TFLOP/s, the tiles before -> these, with constant lengths (a
        # keep mask whose pairs sit in one thread since session 18). B*S = 16384, H=16, causal, 32x64
        # w4: D=128 S=2048 239 -> 255, S=4096 265 -> 295, S=8192 287 -> 307 (64x64 w4 with constants:
        # 233 / 264 / 275); D=96 S=8192 211 -> 238; split phases or one loop within 1%. D=64 (B=2,
        # H=32, S=8192), 64x64 w4 against 32x128 w4 s3: non-causal 214 -> 249, causal 188 -> 210
        # (32x64 w4 209, 64x128 w8 205)
        # Session 31 (row keys as one multiply-add, dK/dV loop 64x64 661 instructions): causal head
        # dims in one 128-column chunk gain on 64x64 w4 in one loop, sustained forward+backward step
        # (us, 32x64 -> 64x64 w4 s2, B*S = 16384): S=1024 1036 -> 1016, 2048 1734 -> 1667, 4096 3028 ->
        # 2898, 8192 5745 -> 5454, 16384 10968 -> 10531 (B=1); the 64x64 tiles in split phases ran
        # 7530. D=96 (64 + 32 columns) lost: 5523 -> 6125, so two-chunk heads keep 32x64, on 3 stages
        # since session 35 (D=96, B=2, H=16, S=8192: 5080-5084 -> 4782-4835, dK/dV 2383-2435 ->
        # 2027-2067; 4 stages 4875-4922). Non-causal dropout keeps 64x64 w4 s2: 32x64 w4 s3 ran 4-7%
        # slower steps at D=128 (S=8192 and 2048) and 1-3% at D=96
        if d <= 64:
            tiles = dataclasses.replace(tiles, dkdv=KernelConfig(64, 64, 4, 2))
        elif d <= 128 and causal and min(head_dim_chunks(head_dim)[0], head_dim_chunks(head_dim_v)[0]) > 64:
            tiles = dataclasses.replace(tiles, dkdv=KernelConfig(64, 64, 4, 2), split_phases=False)
        elif d <= 128 and causal:
            tiles = dataclasses.replace(tiles, dkdv=NARROW_DKDV)
    if dkdv_constant_lengths(device, head_dim, head_dim_v, dtype, tiles, block_sparse, dropout, causal):
        return dataclasses.replace(tiles, constant_lengths=True,
                                   aligned_rows=dkdv_aligned_rows(head_dim, block_sparse, partial_blocks))
    return tiles


def dkdv_aligned_rows(head_dim: int, block_sparse: bool, partial_blocks: bool) -> bool:
    """Whether a dK/dV launch with constant lengths loads lse / delta as aligned rows (8-byte copies;
    the kernel's ALIGN_LSE, which it honours when Sq is a multiple of 16). Like the lengths themselves,
    a change of register allocation in a 255-register kernel, so measured (H200, bf16, dK/dV launch, us,
    4-byte -> 8-byte): D=128 non-causal 3709-3767 -> 3623-3675, causal GQA 4:1 2010-2050 -> 1898-1948,
    causal softcap 2722-2755 -> 2654-2693, 8-document mask 402 -> 386-388, windows on the medium-walk
    tiles -4 to -6%; slower: D=64 4540-4644 -> 4723-4788, block masks without partial blocks 596 -> 603.
    Dropout lost with its old counter hash (sm_90 SASS: spill stores in the loop); with the row keys
    (dropout.py, session 30) it gains: forward+backward step at p = 0.1, S=8192, sustained, 10474-10484
    -> 10127-10181 us, causal 5904-5911 -> 5865-5875, S=2048 (B=8) 2856 -> 2747-2764. Head dims whose
    first column chunk is 64 wide (head_dim_chunks: D <= 64, 80, 96) are unmeasured beyond D=64 and
    keep the 4-byte loads."""
    return head_dim_chunks(head_dim)[0] > 64 and not (block_sparse and not partial_blocks)


def dkdv_constant_lengths(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                          tiles: BackwardConfig, block_sparse: bool, dropout: bool,
                          causal: bool) -> bool:
    """Whether the dK/dV launch takes the lengths as compile-time constants on a repeated signature.

    The constants fold the loops' bounds, but they also change the register allocation of a kernel
    that sits at 255 registers with spills, so this is a measured table, not a rule of thumb. H200,
    bf16, D=128, dK/dV launch alone, run-time -> constant lengths (us):
      faster: non-causal 64x64 w4 S=2048 1170 -> 1069, softcap 5352 -> 5154, ALiBi 4183 -> 3954;
              32x64 w4: causal S=1024 (short walk) 464 -> 429, softcap causal S=8192 2947 -> 2785;
              split-phase GQA 4:1 causal S=8192 2438 -> 2090; block masks (random 50 / 25 / 10%,
              8 documents): -11.6 / -11.3 / -9.9 / -7.1%.
      slower: 64x128 w8: causal S=2048 806 -> 1086, window (1024, 0) 784 -> 1058, (1024, 1024)
              1351 -> 1785; dropout non-causal +6.6%, causal +7.8% (before session 18's keep mask; now
              faster, below).
      split-phase causal MHA lost with constants (S=4096 / 8192 +6.5 / +4.7%, with ALiBi +10.7%) until
      they also aligned the lse / delta loads (dkdv_aligned_rows): B=2, H=16,
      S=8192, run-time -> constant lengths, dK/dV 2523-2524 -> 1987-1991 us, with ALiBi 2702-2755 ->
      2115-2158; B=1, S=16384 (split phases from then on, LONG_CAUSAL_KEYS) 5039-5069 -> 3884-3928.
    The dQ launch never gained (+1 to +6%): it keeps the run-time lengths. fp32, head dims above 128
    and other GPUs are unmeasured and keep them too.
    """
    d = max(tile_width(head_dim), tile_width(head_dim_v))
    if _arch(device) is None or dtype == torch.float32 or d > 128:
        return False
    if d <= 64:
        # D=64 (session 18; B*S = 16384, H=32, forward+backward TFLOP/s, run-time -> constant lengths,
        # the 32x128 w4 s3 tiles, A/B in one session): non-causal S=512 / 1024 / 2048 / 4096 / 8192 265
        # -> 286, 313 -> 338, 345 -> 366, 355 -> 379, 367 -> 386; ALiBi +3%, softcap within 0.5%;
        # dropout (64x64 w4, backward_config) 214 -> 249. Causal (a window (1024, 0) within 0.5%) lost:
        # S=512 / 1024 -2.2 / -1.1%, ALiBi -4.3% (4096 / 8192 +1-2%), so causal keeps run-time lengths.
        # Block masks' tiles are unmeasured
        return not block_sparse and (dropout or (not causal and tiles.dkdv == KernelConfig(32, 128, 4, 3)))
    if dropout:
        # session 18's keep mask (no layout conversion in the dK/dV loop), run-time -> constant lengths,
        # forward+backward TFLOP/s: non-causal 64x64 w4 D=128 S=2048 / 4096 / 8192 256 -> 331, 272 ->
        # 343, 279 -> 351, D=96 207 -> 281; causal 32x64 w4 (backward_config) with and without split
        # phases gains too (above). With the old mask the constants had cost 6.6-7.8%
        return True
    if block_sparse:
        return True
    if tiles.split_phases:
        return True  # GQA or not (see the docstring)
    return tiles.dkdv.block_n == 64  # not the 64x128 w8 tiles of medium causal lengths and windows


def _backward_tiles(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype, causal: bool,
                    block_sparse: bool, softcap: bool, partial_blocks: bool, long_causal: bool,
                    short_walk: bool) -> BackwardConfig:
    """backward_config's tiles (the measured table below)."""
    arch = _arch(device)
    d = max(tile_width(head_dim), tile_width(head_dim_v))
    if arch is None:
        return BackwardConfig(KernelConfig(32, 32, 4, 1), KernelConfig(32, 32, 4, 1))
    fp32 = dtype == torch.float32
    if fp32:
        if d <= 64:
            return BackwardConfig(KernelConfig(32, 128, 8, 3), KernelConfig(128, 32, 8, 3))
        if d <= 128:
            return BackwardConfig(KernelConfig(32, 64, 8, 2), KernelConfig(64, 32, 8, 2))
        return BackwardConfig(KernelConfig(16, 64, 8, 1), KernelConfig(64, 32, 8, 1))
    # H200 sweep (bf16, S=4096, non-causal), each kernel timed with the other fixed
    if block_sparse and partial_blocks and d <= 128:
        # scripts/tune_dkdv.py document (8 causal documents, S=8192, programs heaviest first): the
        # element-mask tile adds live values; dK/dV 32x128 w8 s3 1.51 ms, 64x128 w8 s3 1.62
        return BackwardConfig(KernelConfig(32, 128, 8, 3), KernelConfig(128, 64, 8, 3))
    if block_sparse and d <= 128:
        # scripts/tune_variants.py --sparse (S=16384, D=128, 25% of 128x128 blocks), with the flat
        # pipelined block-list loops: dK/dV 64x128 w8 s3 330 TFLOP/s, 32x128 w8 s3 313, 64x64 w4 s2 324.
        # Re-measured with constant lengths (session 28; variants suite's random 50% / 25%, dK/dV us):
        # 64x128 w8 s3 1131-1138 / 592-594, 64x64 w4 s2 1093-1099 / 584-592, but the forward+backward
        # step was not faster (2623-2644 against 2599-2608 us at 50%), so these tiles stay
        return BackwardConfig(KernelConfig(64, 128, 8, 3), KernelConfig(128, 64, 8, 3))
    if d <= 64:
        return BackwardConfig(KernelConfig(32, 128, 4, 3), KernelConfig(128, 64, 4, 3))
    if softcap and causal and d <= 128:
        # scripts/tune_dkdv.py softcap_causal (B=2, H=16, S=8192, D=128, cap 30): the tanh factor kept
        # for dS adds live values; 32x64 w4 takes the backward from 6.13 to 4.77 ms (non-causal
        # keeps the default: 8.81 against 8.93 ms). Re-swept once the factor was folded into P^T early
        # (session 19, forward+backward TFLOP/s): S=8192 32x64 w4 326-331, 64x64 w4 one loop with
        # constant lengths 303-308, split phases 286-293, 64x128 w8 278-281; S=2048 (B=8) 270-279
        # against 250-252 / 232-234 / 225. A third stage (session 35; forward+backward step through
        # flash_attn_func, us, 2-3 rounds alternating, s2 -> s3): S=8192 5557-5564 -> 5286-5365 (dK/dV
        # 2640 -> 2200), S=2048 (B=8) 1645-1661 -> 1603-1617; a fourth lost (5374-5420)
        return BackwardConfig(NARROW_DKDV, KernelConfig(128, 64, 8, 3))
    if short_walk and 64 < d <= 128:
        # H200 (B*S = 16384, H=16, D=128, backward alone, 3 rounds), 32x64 w4 s2 against 64x128 w8 s2:
        # causal S=512 -8.3%, S=1024 -5.1%, S=2048 -1.5%; at S=1024 ALiBi -2.1%, GQA (4:1) -2.2%,
        # dropout -6.4%, D=96 -3.0%; window (256, 0) -10.7% at every S from 512 to 4096. At 2048 keys
        # ALiBi, GQA and D=96 lose 1.3-1.9%, at 4096 keys 2.6-5.8%, so the rule stops at 1024 keys.
        # (Why is not measured: a short walk gives each program few query tiles, and the 4-warp
        # programs run several to an SM, so one's K / V loads and dK / dV stores overlap another's math)
        # These tiles on 3 stages instead of 2 (session 35, H200, bf16, D=128, forward+backward step
        # through flash_attn_func, us, 2-3 rounds alternating): medium walks causal S=2048 (B=8)
        # 1509-1535 -> 1487-1504, window (1024, 0) at S=16384 1529-1539 -> 1497-1511, (1024, 1024)
        # 2679-2687 -> 2611-2676, (256, 0) at S=4096 706 -> 697-700; causal S=1024 (B=16) 909-933 ->
        # 902-933 over two A/Bs (dK/dV 405-417 -> 393-405); causal GQA (4:1, B=16, S=1024) 1847-1861 ->
        # 1774-1781 (dK/dV 770-782 -> 637-644), causal ALiBi there 949-952 -> 955-969 (within the step's
        # spread, so it takes the same tiles). 4 stages lost (causal S=2048 1530-1548, S=1024 928-934)
        return BackwardConfig(NARROW_DKDV, KernelConfig(128, 64, 8, 3))
    if long_causal and 64 < d <= 128:
        # H200 (B=2, H=16, S=8192, D=128 causal, dK/dV launch alone, 2 rounds): one loop with a per-tile
        # mask branch on 64x128 w8 2704 us; the masked and unmasked query tiles in separate loops 2694,
        # on 64x64 w4 2661, and with heads in tile-major groups of 4 (program_order) 2507. GQA (4 query
        # heads per kv head): 2659 -> 2401. Short sequences keep the one loop (each phase's loop drains
        # the software pipeline: S=1024 causal forward+backward ran 205 against 245 TFLOP/s)
        return BackwardConfig(KernelConfig(64, 64, 4, 2), KernelConfig(128, 64, 8, 3), split_phases=True)
    if causal and d <= 128:
        # scripts/tune_dkdv.py (B=2, H=16, S=8192): dK/dV on 128 keys x 64 queries with 8 warps ties
        # 64x64 w4 on plain causal (4.08 / 4.09 ms), causal dropout (5.90 / 5.89) and window (1.21 /
        # 1.21), and leads with ALiBi (4.14 / 4.39) and GQA (4 query heads per kv head: 3.95 / 4.16)
        return BackwardConfig(KernelConfig(64, 128, 8, 2), KernelConfig(128, 64, 8, 3))
    # dropout: with one hash per pair of keys the default tiles lead again (non-causal 9.52 ms against
    # 10.67 for the 32x128 w8 tiles that the per-key hash's spills had called for)
    if d <= 128:
        return BackwardConfig(KernelConfig(64, 64, 4, 2), KernelConfig(128, 64, 8, 3))
    # head dims in two chunks (head_dim_chunks) between 128 and 192 columns: H200, B*S = 16384,
    # H = 2048 // D, S=8192, forward+backward TFLOP/s non-causal / causal, against the D=256 tiles
    # below (dK/dV 64x64 w8 s2, dQ 128x32 w8 s3): D=160 dK/dV 32x64 w4 s2 with dQ 128x64 w8 s3 346 /
    # 338 against 244 / 225 (32x128 w8 s2 316 / 312); D=192 dK/dV 32x128 w8 s3 with dQ 128x32 392 /
    # 355 against 280 / 265 (s2 352 / 360; 32x64 w4 260 / 324; dQ 128x64 340 / 353). At D=256 the
    # 32-query tiles run at half speed (141 / 135 against 307 / 294). A third stage (session 35, D=160,
    # B=2, H=12, S=8192, step us): non-causal 10387-10532 -> 10143-10404, causal 5309-5380 -> 5390-5413
    # (dK/dV +2.5%), so causal keeps 2
    if d <= 160:
        dkdv = dataclasses.replace(NARROW_DKDV, num_stages=2) if causal else NARROW_DKDV
        return BackwardConfig(dkdv, KernelConfig(128, 64, 8, 3))
    if d <= 192:
        return BackwardConfig(KernelConfig(32, 128, 8, 3), KernelConfig(128, 32, 8, 3))
    return BackwardConfig(KernelConfig(64, 64, 8, 2), KernelConfig(128, 32, 8, 3))


def wide_parts(dim: int, max_part: int) -> Tuple[int, int, int]:
    """(part_a, part_b, n_split): each program accumulates dim-columns [s*W, s*W + W), W = part_a + part_b.

    The slice is as narrow as the split allows (a multiple of 64), made of two powers of two so that a
    width like 320 = 256 + 64 costs no padded columns; part_b = 0 when one tile covers it.
    """
    n = triton.cdiv(triton.cdiv(dim, 64) * 64, max_part)
    width = triton.cdiv(triton.cdiv(dim, n), 64) * 64
    a = 1 << (width.bit_length() - 1)
    b = 0 if width == a else 1 << (width - a - 1).bit_length()
    if b == a:
        a, b = 2 * a, 0
    return a, b, triton.cdiv(dim, a + b)


@dataclasses.dataclass(frozen=True)
class WideConfig:
    """Config of one wide-head kernel (kernels/attention_wide.py).

    block_k: columns of the reduced head dim per step of the inner (pipelined) loop; max_part: the
    widest slice of the produced head dim one program keeps in fp32 registers (wider dims are split
    over programs, each recomputing S).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    max_part: int


@dataclasses.dataclass(frozen=True)
class WideBackwardConfig:
    dq: WideConfig
    dk: WideConfig
    dv: WideConfig


def wide_forward_config(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                        causal: bool) -> WideConfig:
    """Config of wide_fwd_kernel (head dims > 256)."""
    if _arch(device) is None:
        return WideConfig(32, 32, 64, 4, 1, 512)
    if dtype == torch.float32:
        return WideConfig(64, 32, 32, 8, 2, 256)
    # H200 sweep (bf16, B=1, H=48, S=8192; scripts/tune_wide.py), 256-wide O slices (each recomputes
    # S; one 512 slice on 64 x 64 tiles: 207 TFLOP/s at D=512). 128 queries x 128 keys, 4 stages, TFLOP/s
    # at D = 320 / 512 / 768 / 1024: 270 / 293 / 241 / 203, causal 512: 294; 128 x 64 keys: 191 / 227 /
    # 190 / 156, causal 236. Q's chunks are re-read from L2 once per key tile, so 128-key tiles halve
    # that traffic per FLOP. 3 stages: 255 / 273 / 222 / 184; 5: 267 at 320, 196 at 1024; 32-wide
    # chunks (4-8 stages) 5-15% slower; 128 x 256 keys with 128 slices 131 at 512. Slices of up to
    # 320 columns (256 + 64) instead of 256 where that saves one: D = 320 / 576 / 640 / 896 / 960
    # 271 / 229 / 225 / 193 / 188 -> 288 / 241 / 251 / 207 / 214; 384-wide slices spill (142 at 1024)
    return WideConfig(128, 128, 64, 8, 4, 320)


def wide_backward_config(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                         causal: bool) -> WideBackwardConfig:
    """Configs of wide_dq_kernel and wide_dkdv_kernel (dK and dV launches)."""
    if _arch(device) is None:
        one = WideConfig(32, 32, 64, 4, 1, 512)
        return WideBackwardConfig(one, one, one)
    if dtype == torch.float32:
        one = WideConfig(64, 32, 32, 8, 2, 256)
        return WideBackwardConfig(one, one, one)
    # H200 sweeps (bf16, B=1, H=48, S=8192; scripts/tune_wide.py): one slice of up to 512 columns per
    # program (no recomputed S / dP; 256-wide slices: ~100 TFLOP/s). TFLOP/s of each kernel's share,
    # 64 x 64 tiles 5 stages against 128 queries x 64 keys 4 stages, at D = 320 / 512 / 1024:
    #   dQ 198 / 238 / 168 against 289 / 110 / 95, dV 173 / 206 / 159 against 239 / 163 / 140:
    #   128 query rows pay off while the produced slice is narrow (320 = 256 + 64 fp32 columns per
    #   row), a 512-wide slice on 128 rows spills; at 384-wide slices (D = 384 / 768) dV still gains
    #   (193 / 149 -> 259 / 205), dQ does not (214 / 153 -> 182 / 140);
    #   dK 174 / 214 / 150 against 256 / 279 / 201 (its accumulator is [keys, slice]: the query tile
    #   does not grow it). 3 stages, 32-wide chunks or 32-key tiles are slower.
    rows128, rows64 = WideConfig(128, 64, 64, 8, 4, 512), WideConfig(64, 64, 64, 8, 5, 512)

    def by_width(dim: int, widest: int) -> WideConfig:
        part_a, part_b, _ = wide_parts(dim, 512)
        return rows128 if part_a + part_b <= widest else rows64
    return WideBackwardConfig(by_width(head_dim, 320), rows128, by_width(head_dim_v, 384))
