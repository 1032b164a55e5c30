"""Wide-head attention (head dims > 256): split-D ("fine-grained") tiling, forward and backward.

The dense kernels keep a whole [rows, D] tile of Q (or K) in registers and multiply it at once, so
their on-chip memory grows with D and runs out past D = 256. Here every product that *reduces* over
a head dim (S = Q K^T over Dqk, dP = dO V^T over Dv) is an inner loop over chunks of BLOCK_K columns
(the K-loop of a GEMM, software-pipelined by Triton), so shared memory does not depend on D
(FFPA's fine-grained tiling; Metal FlashAttention blocks along D the same way).

What cannot be chunked is the accumulator of the product that *produces* a head dim (O = P V,
dQ = dS K, dK = dS^T Q, dV = P^T dO): it stays in fp32 registers for the whole walk. A program
therefore owns one slice of that head dim, of width PART_A + PART_B (two power-of-two register
tiles, so a width such as 320 = 256 + 64 wastes no columns), and the launcher splits a wider head
dim over several programs, each recomputing S for its slice. Nothing is S x S, no atomics:
  wide_fwd_kernel   out[:, slice], lse (slice 0 writes lse)
  wide_delta_kernel delta = rowsum(dO * O)
  wide_dq_kernel    dQ[:, slice]
  wide_dkdv_kernel  dK[:, slice] (DKDV = 1) or dV[:, slice] (DKDV = 0) of one key tile, summing the
                    GQA group in registers
Masking (causal / sliding window, torch SDPA's attn_mask), softcap, ALiBi and dropout reuse
kernels/common.py's helpers, so the semantics (and the dropout pattern) are the dense kernels'.
On sm_90 the plain, causal and GQA 16-bit calls run the Gluon kernels instead (attention_wide_gluon.py,
attention_wide_gluon_bwd.py): there one S is shared by two warpgroups, so it is recomputed far less.
"""

import triton
import triton.language as tl

from flashtile.kernels.attention_bwd import _load_lse2
from flashtile.kernels.common import (attn_mask_ptrs, dropout_col_keys, dropout_keep, dropout_head_row, dropout_row_keys, dropout_tile_keep, key_phases, online_softmax,
                                      query_phases, score_log2, score_params, sequence_bounds, visible)

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot_over_k(acc, a_ptrs, b_ptrs, a_ok, b_ok, offs_k, dim,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += A[:, :dim] @ B[:dim, :], BLOCK_K columns of the reduction dim at a time.

    a_ptrs [M, BLOCK_K] and b_ptrs [BLOCK_K, N] point at reduction index 0 (unit stride along it);
    a_ok [M, 1] / b_ok [1, N] bound the other dim. The loop is a GEMM K-loop: Triton pipelines it.
    """
    k_full = (dim // BLOCK_K) * BLOCK_K
    for kk in range(0, k_full, BLOCK_K):
        a = tl.load(a_ptrs + kk, mask=a_ok, other=0.0)
        b = tl.load(b_ptrs + kk, mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if not EVEN_K:  # the last, partial chunk
        a = tl.load(a_ptrs + k_full, mask=a_ok & (offs_k[None, :] + k_full < dim), other=0.0)
        b = tl.load(b_ptrs + k_full, mask=b_ok & (offs_k[:, None] + k_full < dim), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _store_part(ptrs, acc, rows_ok, cols, width):
    tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=rows_ok & (cols[None, :] < width))


@triton.jit
def _slice_cols(split, PART_A: tl.constexpr, PART_B: tl.constexpr):
    """Column offsets of the two register tiles of head-dim slice `split` (part B is a dummy 16 when 0)."""
    base = split * (PART_A + PART_B)
    return base + tl.arange(0, PART_A), base + PART_A + tl.arange(0, PART_B if PART_B > 0 else 16)


@triton.jit
def _query_program(n_split, seqlen_q, seqlen_k, heads_q, group_size, CuSeqQ, CuSeqK,
                   BLOCK_M: tl.constexpr, HAS_RIGHT: tl.constexpr, VARLEN: tl.constexpr):
    """(split, tile, b, h, h_kv, q_start, k_start, seqlen_q, seqlen_k) of a program over query tiles.

    Slices fastest (they share the Q and K tiles they each reduce over, so they run together and hit
    L2), then query tiles (heavy tiles first with a right mask edge), then batch x query head.
    """
    n_m_tiles = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    split = pid % n_split
    tile = (pid // n_split) % n_m_tiles
    bh = pid // (n_split * n_m_tiles)
    if HAS_RIGHT:
        tile = n_m_tiles - 1 - tile
    b = bh // heads_q
    h = bh % heads_q
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    return split, tile, b, h, h // group_size, q_start, k_start, seqlen_q, seqlen_k


# ------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_tiles(acc_a, acc_b, l_i, m_i, q_ptrs, q_ok, k_ptrs, va_ptrs, vb_ptrs, am_ptrs, stride_amn,
               drop_keys, drop_thr, offs_m, offs_n, offs_k, cols_a, cols_b, start, stop,
               stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k,
               head_dim, head_dim_v, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PART_B: tl.constexpr,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
               ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """Online-softmax update over key tiles [start, stop): S chunked over Dqk, O slice in registers.
    am_ptrs: torch SDPA's attn_mask at this tile's rows and key 0 (ATTN_MASK as in common.score_log2).
    DROPOUT: drop_keys are the tile's query rows' dropout keys (common.dropout_row_keys)
    (common.dropout_keep); l_i keeps the undropped sum, only P V sees the keep pattern."""
    for start_n in tl.range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        # -- V's slice first: its loads are in flight during the S loop below (loaded after the
        # softmax, they stalled every key tile: the outer loop is not software-pipelined) --
        v_rows = cols[:, None] < seqlen_k
        va = tl.load(va_ptrs + start_n * stride_vs, mask=v_rows & (cols_a[None, :] < head_dim_v), other=0.0)
        if PART_B > 0:
            vb = tl.load(vb_ptrs + start_n * stride_vs, mask=v_rows & (cols_b[None, :] < head_dim_v), other=0.0)
        qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        qk = _dot_over_k(qk, q_ptrs, k_ptrs + start_n * stride_ks, q_ok, cols[None, :] < seqlen_k, offs_k, head_dim,
                         BLOCK_K, EVEN_K, DOT_PRECISION)
        qk, _ = score_log2(qk, offs_m, cols, seqlen_q, seqlen_k, qk_scale, softcap_pre, softcap_post, alibi_log2,
                           SOFTCAP, HAS_ALIBI, am_ptrs + tl.cast(start_n, tl.int64) * stride_amn, ATTN_MASK)
        if MASKED:
            vis = visible(offs_m, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            qk = tl.where(vis, qk, float("-inf"))
        # a mask can hide every key a row has seen so far in any tile: guard the running max there too
        p, alpha, l_i, m_new = online_softmax(qk, m_i, l_i, MASKED or ATTN_MASK != 0)
        if DROPOUT:
            p = tl.where(dropout_tile_keep(drop_keys, start_n, offs_n, drop_thr), p, 0.0)
        acc_a = tl.dot(p.to(va.dtype), va, acc_a * alpha[:, None], input_precision=DOT_PRECISION)
        if PART_B > 0:
            acc_b = tl.dot(p.to(vb.dtype), vb, acc_b * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "heads_q", "group_size", "window_left", "window_right",
                               "stride_lse_b", "stride_lse_h", "n_split", "stride_amb", "stride_amh", "stride_amm",
                               "stride_amn", "seed_lo", "seed_hi", "drop_thr"])
def wide_fwd_kernel(
    Q, K, V, Out, Lse, Alibi, CuSeqQ, CuSeqK, AttnMask,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h, stride_alibi_b,
    seqlen_q, seqlen_k, heads_q, group_size, head_dim, head_dim_v,
    softmax_scale, softcap, window_left, window_right, n_split, stride_amb, stride_amh, stride_amm, stride_amn,
    seed_lo, seed_hi, drop_thr, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PART_A: tl.constexpr, PART_B: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Q [B, Sq, Hq, Dqk], K [B, Sk, Hkv, Dqk], V [B, Sk, Hkv, Dv] -> Out [B, Sq, Hq, Dv], Lse fp32 [B, Hq, Sq].

    Grid: one program per (Dv slice, query tile, batch x query head), see _query_program. Slice s
    covers Dv columns [s * W, s * W + W), W = PART_A + PART_B. VARLEN, ATTN_MASK (torch SDPA's
    attn_mask through its [B, Hq, Sq, Sk] broadcast strides) and DROPOUT (the same row keys and keep
    pattern) as in attention_fwd_kernel.
    """
    count_q = seqlen_q  # dropout rows are numbered in a [B, Hq, max Sq] grid
    split, tile, b, h, h_kv, q_start, k_start, seqlen_q, seqlen_k = _query_program(
        n_split, seqlen_q, seqlen_k, heads_q, group_size, CuSeqQ, CuSeqK, BLOCK_M, HAS_RIGHT, VARLEN)
    if VARLEN:
        if tile * BLOCK_M >= seqlen_q:
            return

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cols_a, cols_b = _slice_cols(split, PART_A, PART_B)
    q_rows = (q_start + offs_m).to(tl.int64)
    k_rows = (k_start + offs_n).to(tl.int64)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qs + offs_k[None, :]
    k_ptrs = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + k_rows[None, :] * stride_ks + offs_k[:, None]
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vs
    q_ok = offs_m[:, None] < seqlen_q

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, PART_A], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, PART_B if PART_B > 0 else 16], dtype=tl.float32)
    qk_scale, softcap_pre, softcap_post, alibi_log2 = score_params(Alibi, b, h, stride_alibi_b, softmax_scale, softcap,
                                                                    SOFTCAP, HAS_ALIBI)
    m_lo = tile * BLOCK_M
    m_hi = tl.minimum(m_lo + BLOCK_M, seqlen_q)
    a, bb, c, d = key_phases(m_lo, m_hi, seqlen_q, seqlen_k, window_left, window_right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    va_ptrs = v_base + cols_a[None, :]
    vb_ptrs = v_base + cols_b[None, :]
    am_ptrs = attn_mask_ptrs(AttnMask, b, h, offs_m[:, None], offs_n[None, :], stride_amb, stride_amh, stride_amm,
                             stride_amn)
    # each query row's dropout key (dropout.py's row_key; varlen: FlashAttention's padded pattern)
    drop_keys = dropout_row_keys(dropout_head_row(b, h, heads_q, count_q), tile * BLOCK_M + tl.arange(0, BLOCK_M),
                                 seed_hi, seed_lo)
    # key tiles [a, bb) and [c, d) need the visibility rule, [bb, c) is visible to every row; a left edge
    # (window) makes [a, bb) non-empty. One call site, unrolled per phase (MASKED is a constexpr)
    for phase in tl.static_range(0 if HAS_LEFT else 1, 3):
        lo = a if phase == 0 else (bb if phase == 1 else c)
        hi = bb if phase == 0 else (c if phase == 1 else d)
        acc_a, acc_b, l_i, m_i = _fwd_tiles(
            acc_a, acc_b, l_i, m_i, q_ptrs, q_ok, k_ptrs, va_ptrs, vb_ptrs, am_ptrs, stride_amn, drop_keys,
            drop_thr, offs_m, offs_n, offs_k, cols_a, cols_b, lo, hi, stride_ks, stride_vs, qk_scale,
            softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v, window_left,
            window_right, BLOCK_M, BLOCK_N, BLOCK_K, PART_B, phase != 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI,
            EVEN_K, DOT_PRECISION, ATTN_MASK, DROPOUT)

    # -- epilogue: normalise (dropout: and scale by 1 / (1 - p)); a row that saw no key gives out 0
    # and lse -inf --
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        acc_a = acc_a * drop_scale
        acc_b = acc_b * drop_scale
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_rows[:, None] * stride_os
    _store_part(o_base + cols_a[None, :], acc_a / l_safe[:, None], q_ok, cols_a, head_dim_v)
    if PART_B > 0:
        _store_part(o_base + cols_b[None, :], acc_b / l_safe[:, None], q_ok, cols_b, head_dim_v)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    lse_ptrs = Lse + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_rows
    tl.store(lse_ptrs, lse, mask=(offs_m < seqlen_q) & (split == 0))


# ------------------------------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=["seqlen_q", "heads_q", "stride_d_b", "stride_d_h"])
def wide_delta_kernel(Out, DOut, Delta, CuSeqQ, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
                      stride_d_b, stride_d_h, seqlen_q, heads_q, head_dim_v,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, VARLEN: tl.constexpr):
    """Delta fp32 [B, Hq, Sq] = rowsum(dO * O), BLOCK_K columns at a time (grid: query tiles x B*Hq)."""
    n_m_tiles = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    tile = pid % n_m_tiles
    bh = pid // n_m_tiles
    b = bh // heads_q
    h = bh % heads_q
    q_start, _, seqlen_q, _ = sequence_bounds(CuSeqQ, CuSeqQ, b, seqlen_q, seqlen_q, VARLEN)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (q_start + offs_m).to(tl.int64)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_os + offs_k[None, :]
    do_ptrs = DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dos + offs_k[None, :]
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kk in range(0, head_dim_v, BLOCK_K):
        ok = (offs_m[:, None] < seqlen_q) & (offs_k[None, :] + kk < head_dim_v)
        o = tl.load(o_ptrs + kk, mask=ok, other=0.0).to(tl.float32)
        do = tl.load(do_ptrs + kk, mask=ok, other=0.0).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(Delta + b.to(tl.int64) * stride_d_b + h.to(tl.int64) * stride_d_h + q_start + offs_m, delta,
             mask=offs_m < seqlen_q)


@triton.jit
def _dq_tiles(dq_a, dq_b, q_ptrs, do_ptrs, q_ok, lse2, delta, kt_ptrs, vt_ptrs, ka_ptrs, kb_ptrs, am_ptrs, stride_amn,
              drop_keys, drop_thr, drop_scale, db_base, db_write,
              offs_m, offs_n, offs_k, cols_a, cols_b, start, stop, stride_ks, stride_vs,
              qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v,
              window_left, window_right,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PART_B: tl.constexpr,
              MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KV: tl.constexpr, DOT_PRECISION: tl.constexpr,
              ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr):
    """dQ slice over key tiles [start, stop): S and dP chunked over Dqk / Dv, dQ += dS K[:, slice].
    DROPOUT: dP keeps the forward's pattern, scaled by 1 / (1 - p) (attention_bwd's _dq_tile).
    BIAS_GRAD: dS (the gradient of an additive attn_mask) goes to this head's fp32 [Sq, Sk] slice at
    db_base when db_write (one program of the query tile's Dqk slices writes it)."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k_ok = cols[None, :] < seqlen_k
        # -- K's slice first, in flight during the S and dP loops (see _fwd_tiles) --
        k_rows = cols[:, None] < seqlen_k
        ka = tl.load(ka_ptrs + start_n * stride_ks, mask=k_rows & (cols_a[None, :] < head_dim), other=0.0)
        if PART_B > 0:
            kb = tl.load(kb_ptrs + start_n * stride_ks, mask=k_rows & (cols_b[None, :] < head_dim), other=0.0)
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot_over_k(s, q_ptrs, kt_ptrs + start_n * stride_ks, q_ok, k_ok, offs_k, head_dim,
                        BLOCK_K, EVEN_K, DOT_PRECISION)
        s, t = score_log2(s, offs_m, cols, seqlen_q, seqlen_k, qk_scale, softcap_pre, softcap_post, alibi_log2,
                          SOFTCAP, HAS_ALIBI, am_ptrs + tl.cast(start_n, tl.int64) * stride_amn, ATTN_MASK)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            vis = visible(offs_m, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(vis, p, 0.0)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        dp = _dot_over_k(dp, do_ptrs, vt_ptrs + start_n * stride_vs, q_ok, k_ok, offs_k, head_dim_v,
                         BLOCK_K, EVEN_KV, DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(drop_keys, dropout_col_keys(cols, 0), drop_thr, False)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:  # the bias is added after softcap: its gradient is dS before the tanh factor
            tl.store(db_base + offs_m[:, None].to(tl.int64) * seqlen_k + cols[None, :], ds,
                     mask=(offs_m[:, None] < seqlen_q) & (cols[None, :] < seqlen_k) & db_write)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq_a = tl.dot(ds.to(ka.dtype), ka, dq_a, input_precision=DOT_PRECISION)
        if PART_B > 0:
            dq_b = tl.dot(ds.to(kb.dtype), kb, dq_b, input_precision=DOT_PRECISION)
    return dq_a, dq_b


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "heads_q", "group_size", "window_left", "window_right",
                               "stride_lse_b", "stride_lse_h", "n_split", "stride_amb", "stride_amh", "stride_amm",
                               "stride_amn", "seed_lo", "seed_hi", "drop_thr"])
def wide_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Alibi, CuSeqQ, CuSeqK, AttnMask, DBias,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh, stride_lse_b, stride_lse_h, stride_alibi_b,
    seqlen_q, seqlen_k, heads_q, group_size, head_dim, head_dim_v,
    softmax_scale, softcap, window_left, window_right, n_split, stride_amb, stride_amh, stride_amm, stride_amn,
    seed_lo, seed_hi, drop_thr, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PART_A: tl.constexpr, PART_B: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
):
    """dQ [B, Sq, Hq, Dqk], one Dqk slice of BLOCK_M query rows per program (grid as wide_fwd_kernel).
    BIAS_GRAD: also DBias fp32 [B, Hq, Sq, Sk] = dS, the gradient of the additive attn_mask (dense layout)."""
    count_q, count_k = seqlen_q, seqlen_k  # the maximum lengths: dropout row numbers and dbias rows use them
    split, tile, b, h, h_kv, q_start, k_start, seqlen_q, seqlen_k = _query_program(
        n_split, seqlen_q, seqlen_k, heads_q, group_size, CuSeqQ, CuSeqK, BLOCK_M, HAS_RIGHT, VARLEN)
    if VARLEN:
        if tile * BLOCK_M >= seqlen_q:
            return

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cols_a, cols_b = _slice_cols(split, PART_A, PART_B)
    q_rows = (q_start + offs_m).to(tl.int64)
    k_rows = (k_start + offs_n).to(tl.int64)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qs + offs_k[None, :]
    do_ptrs = DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_rows[:, None] * stride_dos + offs_k[None, :]
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    kt_ptrs = k_base + k_rows[None, :] * stride_ks + offs_k[:, None]
    vt_ptrs = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[None, :] * stride_vs + offs_k[:, None]
    ka_ptrs = k_base + k_rows[:, None] * stride_ks + cols_a[None, :]
    kb_ptrs = k_base + k_rows[:, None] * stride_ks + cols_b[None, :]
    q_ok = offs_m[:, None] < seqlen_q
    lse_offset = b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start
    lse2 = _load_lse2(Lse + lse_offset + offs_m, offs_m < seqlen_q)
    delta = tl.load(Delta + lse_offset + offs_m, mask=offs_m < seqlen_q, other=0.0)
    dq_a = tl.zeros([BLOCK_M, PART_A], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, PART_B if PART_B > 0 else 16], dtype=tl.float32)
    qk_scale, softcap_pre, softcap_post, alibi_log2 = score_params(Alibi, b, h, stride_alibi_b, softmax_scale, softcap,
                                                                    SOFTCAP, HAS_ALIBI)
    m_lo = tile * BLOCK_M
    m_hi = tl.minimum(m_lo + BLOCK_M, seqlen_q)
    a, bb, c, d = key_phases(m_lo, m_hi, seqlen_q, seqlen_k, window_left, window_right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    am_ptrs = attn_mask_ptrs(AttnMask, b, h, offs_m[:, None], offs_n[None, :], stride_amb, stride_amh, stride_amm,
                             stride_amn)
    # each query row's dropout key (dropout.py's row_key; varlen: FlashAttention's padded pattern)
    drop_keys = dropout_row_keys(dropout_head_row(b, h, heads_q, count_q), tile * BLOCK_M + tl.arange(0, BLOCK_M),
                                 seed_hi, seed_lo)
    db_base = DBias + (b * heads_q + h).to(tl.int64) * count_q * count_k
    for phase in tl.static_range(0 if HAS_LEFT else 1, 3):  # the forward's phases: [a, bb), [bb, c), [c, d)
        lo = a if phase == 0 else (bb if phase == 1 else c)
        hi = bb if phase == 0 else (c if phase == 1 else d)
        dq_a, dq_b = _dq_tiles(
            dq_a, dq_b, q_ptrs, do_ptrs, q_ok, lse2, delta, kt_ptrs, vt_ptrs, ka_ptrs, kb_ptrs, am_ptrs, stride_amn,
            drop_keys, drop_thr, drop_scale, db_base, split == 0, offs_m, offs_n, offs_k, cols_a,
            cols_b, lo, hi, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k,
            head_dim, head_dim_v, window_left, window_right, BLOCK_M, BLOCK_N, BLOCK_K, PART_B, phase != 1, HAS_LEFT,
            HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_K, EVEN_KV, DOT_PRECISION, ATTN_MASK, DROPOUT, BIAS_GRAD)
    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + q_rows[:, None] * stride_dqs
    _store_part(dq_base + cols_a[None, :], dq_a * softmax_scale, q_ok, cols_a, head_dim)
    if PART_B > 0:
        _store_part(dq_base + cols_b[None, :], dq_b * softmax_scale, q_ok, cols_b, head_dim)


@triton.jit
def _dkdv_tiles(acc_a, acc_b, k_ptrs, v_ptrs, k_ok, qt_base, dot_base, xa_base, xb_base, lse_base, delta_base,
                amt_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale,
                offs_m, offs_n, offs_k, cols_a, cols_b, start, stop, stride_qs, stride_dos, stride_xs,
                qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v,
                width, window_left, window_right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PART_B: tl.constexpr,
                DKDV: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KV: tl.constexpr,
                DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """One key tile over query tiles [start, stop) of one query head.

    S^T = K Q^T (chunked over Dqk), P^T = exp2(S^T - lse). DKDV = 0: dV += P^T dO[:, slice].
    DKDV = 1: dP^T = V dO^T (chunked over Dv), dS^T = P^T (dP^T - delta), dK += dS^T Q[:, slice].
    X (xa_base / xb_base, row stride stride_xs) is dO for dV and Q for dK, at query row 0.
    amt_ptrs: the attn_mask [BLOCK_N keys, BLOCK_M queries] at query row 0 (S^T's orientation).
    DROPOUT: drop_rows is this head's first row number (common.dropout_head_row); dV sees
    the kept P^T and dK the kept dP^T, both scaled by 1 / (1 - p) (attention_bwd's _dkdv_tile).
    """
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + offs_m
        q_ok = rows[None, :] < seqlen_q
        st = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        st = _dot_over_k(st, k_ptrs, qt_base + rows[None, :].to(tl.int64) * stride_qs + offs_k[:, None], k_ok, q_ok,
                         offs_k, head_dim, BLOCK_K, EVEN_K, DOT_PRECISION)
        st, tt = score_log2(st, offs_n, rows, seqlen_k, seqlen_q, qk_scale, softcap_pre, softcap_post, alibi_log2,
                            SOFTCAP, HAS_ALIBI, amt_ptrs + tl.cast(start_m, tl.int64) * stride_amm, ATTN_MASK)
        lse2 = _load_lse2(lse_base + rows, rows < seqlen_q)
        pt = tl.math.exp2(st - lse2[None, :])
        if MASKED:
            vis = visible(rows, offs_n, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(tl.trans(vis) & q_ok, pt, 0.0)
        if DKDV == 1:
            dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            dpt = _dot_over_k(dpt, v_ptrs, dot_base + rows[None, :].to(tl.int64) * stride_dos + offs_k[:, None], k_ok,
                              q_ok, offs_k, head_dim_v, BLOCK_K, EVEN_KV, DOT_PRECISION)
            if DROPOUT:  # the keep bits right at their one use: live across the dP^T loop they went to memory
                keep = dropout_keep(dropout_row_keys(drop_rows, start_m + offs_m, seed_hi, 0),
                                    dropout_col_keys(offs_n, seed_lo), drop_thr, True)
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            delta = tl.load(delta_base + rows, mask=rows < seqlen_q, other=0.0)
            pt = pt * (dpt - delta[None, :])
            if SOFTCAP:
                pt = pt * (1.0 - tt * tt)
        elif DROPOUT:
            keep = dropout_keep(dropout_row_keys(drop_rows, start_m + offs_m, seed_hi, 0),
                                dropout_col_keys(offs_n, seed_lo), drop_thr, True)
            pt = tl.where(keep, pt * drop_scale, 0.0)
        # X's slice is loaded here, after the S^T / dP^T loops: issued before them (as dQ and the
        # forward do) it measured no faster for dV and 4% slower for dK at D=320 on the H200
        x_rows = rows[:, None] < seqlen_q
        x_off = rows[:, None].to(tl.int64) * stride_xs
        xa = tl.load(xa_base + x_off, mask=x_rows & (cols_a[None, :] < width), other=0.0)
        acc_a = tl.dot(pt.to(xa.dtype), xa, acc_a, input_precision=DOT_PRECISION)
        if PART_B > 0:
            xb = tl.load(xb_base + x_off, mask=x_rows & (cols_b[None, :] < width), other=0.0)
            acc_b = tl.dot(pt.to(xb.dtype), xb, acc_b, input_precision=DOT_PRECISION)
    return acc_a, acc_b


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "heads_q", "group_size", "window_left", "window_right",
                               "stride_lse_b", "stride_lse_h", "n_split", "stride_amb", "stride_amh", "stride_amm",
                               "stride_amn", "seed_lo", "seed_hi", "drop_thr"])
def wide_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DX, Alibi, CuSeqQ, CuSeqK, AttnMask,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dxb, stride_dxs, stride_dxh, stride_lse_b, stride_lse_h, stride_alibi_b,
    seqlen_q, seqlen_k, heads_q, group_size, head_dim, head_dim_v,
    softmax_scale, softcap, window_left, window_right, n_split, stride_amb, stride_amh, stride_amm, stride_amn,
    seed_lo, seed_hi, drop_thr, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PART_A: tl.constexpr, PART_B: tl.constexpr, DKDV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
):
    """DKDV = 1: DX = dK [B, Sk, Hkv, Dqk]; DKDV = 0: DX = dV [B, Sk, Hkv, Dv]; one slice of BLOCK_N keys
    of one kv head per program, summed over the kv head's GQA group in registers (grid: slice,
    key tile, batch x kv head, slices fastest)."""
    count_q = seqlen_q  # dropout row numbers, as in the forward
    n_n_tiles = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    split = pid % n_split
    tile = (pid // n_split) % n_n_tiles
    bh = pid // (n_split * n_n_tiles)
    heads_kv = heads_q // group_size
    b = bh // heads_kv
    h_kv = bh % heads_kv
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    if VARLEN:
        if tile * BLOCK_N >= seqlen_k:
            return

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    cols_a, cols_b = _slice_cols(split, PART_A, PART_B)
    k_rows = (k_start + offs_n).to(tl.int64)
    k_ok = offs_n[:, None] < seqlen_k
    k_ptrs = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + k_rows[:, None] * stride_ks + offs_k[None, :]
    v_ptrs = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vs + offs_k[None, :]
    acc_a = tl.zeros([BLOCK_N, PART_A], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, PART_B if PART_B > 0 else 16], dtype=tl.float32)
    if DKDV == 1:
        width = head_dim
    else:
        width = head_dim_v

    n_lo = tile * BLOCK_N
    n_hi = tl.minimum(n_lo + BLOCK_N, seqlen_k)
    a, bb, c, d = query_phases(n_lo, n_hi, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, HAS_LEFT, HAS_RIGHT)
    for g in range(0, group_size):
        h = h_kv * group_size + g
        qt_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qs
        dot_base = DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_start.to(tl.int64) * stride_dos
        if DKDV == 1:
            x_base = qt_base
            stride_xs = stride_qs
        else:
            x_base = dot_base
            stride_xs = stride_dos
        xa_base = x_base + cols_a[None, :]
        xb_base = x_base + cols_b[None, :]
        lse_base = Lse + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start
        delta_base = Delta + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start
        qk_scale, softcap_pre, softcap_post, alibi_log2 = score_params(Alibi, b, h, stride_alibi_b, softmax_scale,
                                                                        softcap, SOFTCAP, HAS_ALIBI)
        amt_ptrs = attn_mask_ptrs(AttnMask, b, h, offs_m[None, :], offs_n[:, None], stride_amb, stride_amh,
                                  stride_amm, stride_amn)
        drop_rows = dropout_head_row(b, h, heads_q, count_q)
        # query tiles [a, bb) and [c, d) need the visibility rule, [bb, c) sees every key of the tile; a
        # right edge (causal) makes [a, bb) non-empty
        for phase in tl.static_range(0 if HAS_RIGHT else 1, 3):
            lo = a if phase == 0 else (bb if phase == 1 else c)
            hi = bb if phase == 0 else (c if phase == 1 else d)
            acc_a, acc_b = _dkdv_tiles(
                acc_a, acc_b, k_ptrs, v_ptrs, k_ok, qt_base, dot_base, xa_base, xb_base, lse_base, delta_base,
                amt_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n,
                offs_k, cols_a, cols_b, lo, hi, stride_qs, stride_dos, stride_xs, qk_scale, softcap_pre, softcap_post,
                alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v, width, window_left, window_right, BLOCK_M,
                BLOCK_N, BLOCK_K, PART_B, DKDV, phase != 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_K, EVEN_KV,
                DOT_PRECISION, ATTN_MASK, DROPOUT)
    if DKDV == 1:
        acc_a = acc_a * softmax_scale
        acc_b = acc_b * softmax_scale
    dx_base = DX + b.to(tl.int64) * stride_dxb + h_kv.to(tl.int64) * stride_dxh + k_rows[:, None] * stride_dxs
    _store_part(dx_base + cols_a[None, :], acc_a, k_ok, cols_a, width)
    if PART_B > 0:
        _store_part(dx_base + cols_b[None, :], acc_b, k_ok, cols_b, width)
