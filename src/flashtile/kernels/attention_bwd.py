"""The backward attention kernels, deterministic and without atomics (Metal FlashAttention's design).

Two launches, in this order:
  1. attention_bwd_dq_kernel: a program owns BLOCK_M queries; it first computes and stores
     delta = rowsum(dO * O) for its rows (the softmax Jacobian term, fp32), then walks the visible key
     tiles accumulating dQ in registers.
  2. attention_bwd_dkdv_kernel: a program owns BLOCK_N keys of one kv head and walks every query
     tile (of every query head that program covers) that can see them, accumulating dK and dV in
     registers; it reads the delta written by launch 1. Each dK/dV element is written by one program.
P is recomputed from the saved log-sum-exp: p = exp2(s * scale * log2(e) - lse * log2(e)).

SEQLEN_Q / SEQLEN_K (dK/dV launch, constexpr, 0 = read the run-time seqlen_q / seqlen_k): the
launch may fix the sequence lengths at compile time. The loops' trip counts and the masked tail are
then constants, which drops run-time guards of the software pipeline, but the register allocation
changes with them too: only configs measured faster take them (tuning.BackwardConfig.constant_lengths;
H200, D=128 non-causal: dK/dV 0.91x the time at S=2048), and only for repeated signatures, since each
length pair costs a compile (attention_launch.constant_lengths).

BLOCK_SPARSE as in the forward kernel (0 none, 1 full and partial block lists, 2 full lists only: a
mask without partial blocks compiles no partial-list loop, 3 full and partial lists with key-interval
rows: the dQ kernel walks both in one loop, as the forward does).
"""

import triton
import triton.language as tl

from flashtile.kernels.common import (ALIBI_KEY_TERM, ELEM_INTERVALS, ELEM_TILE, alibi_query_term, and_element_mask, attn_mask_ptrs, load_tail, store_rows, block_list, dropout_col_keys, dropout_keep, dropout_head_row, dropout_row_keys, key_phases, list_tile,
                                      merged_row_tile, row_walk, partial_local, partial_tile_ptrs, program_tile, row_tile_ptrs, query_phases, score_log2, score_params,
                                      sequence_bounds, visible)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_lse2(ptrs, in_rows):
    """lse at ptrs (rows where in_rows) in the log2 domain; a fully masked row (lse = -inf) gets +inf
    so that p = exp2(-inf) = 0."""
    lse = tl.load(ptrs, mask=in_rows, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, em_ptrs, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
               start_m, need_vis, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
               seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
               MASKED: tl.constexpr, ELEM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
               BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr, EVEN_DV2: tl.constexpr,
               ALIGNED_ROWS: tl.constexpr):
    """Accumulate dK, dV for one key tile over the query tile starting at start_m of one query head.

    MASKED as in the forward's _fwd_tile (0 none, 1 always, 2 when the run-time need_vis is set);
    ELEM ANDs the element mask: ELEM_TILE, the uint8 tile at em_ptrs ([BLOCK_M, BLOCK_N], queries by
    keys); ELEM_INTERVALS, em_ptrs is the query rows' key intervals, already loaded.
    BLOCK_D2 / BLOCK_DV2 > 0: the head dims' tail chunks (k2, dk2 at columns offs_d2; v2, dv2 at
    offs_dv2; see the forward kernel's docstring).
    """
    rows = start_m + offs_m
    q_ptrs = q_base + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    do_ptrs = do_base + rows[:, None].to(tl.int64) * stride_dos + offs_dv[None, :]
    # -- load the query tile; only masked tiles can cross the sequence end --
    if MASKED != 0:
        q_mask = rows[:, None] < seqlen_q
        do_mask = rows[:, None] < seqlen_q
    else:
        q_mask = rows[:, None] >= 0
        do_mask = rows[:, None] >= 0
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < head_dim)
    if not EVEN_DV:
        do_mask = do_mask & (offs_dv[None, :] < head_dim_v)
    if MASKED != 0 or not EVEN_D:
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    else:
        q = tl.load(q_ptrs)
    if MASKED != 0 or not EVEN_DV:
        do = tl.load(do_ptrs, mask=do_mask, other=0.0)
    else:
        do = tl.load(do_ptrs)
    if ELEM == ELEM_TILE:
        em = tl.load(em_ptrs)
    elif ELEM == ELEM_INTERVALS:  # loaded by the walk
        em = em_ptrs
    if BLOCK_D2 > 0:
        q2 = load_tail(q_base + rows[:, None].to(tl.int64) * stride_qs + offs_d2[None, :], rows[:, None] < seqlen_q,
                       offs_d2[None, :] < head_dim, MASKED != 0, EVEN_D2)
    if BLOCK_DV2 > 0:
        do2 = load_tail(do_base + rows[:, None].to(tl.int64) * stride_dos + offs_dv2[None, :], rows[:, None] < seqlen_q,
                        offs_dv2[None, :] < head_dim_v, MASKED != 0, EVEN_DV2)
    lse_ptrs = lse_base + rows
    delta_ptrs = delta_base + rows
    if ALIGNED_ROWS:  # see the dK/dV kernel
        lse_ptrs = tl.max_contiguous(tl.multiple_of(lse_ptrs, 16), 16)
        delta_ptrs = tl.max_contiguous(tl.multiple_of(delta_ptrs, 16), 16)
    lse2 = _load_lse2(lse_ptrs, rows < seqlen_q)
    if DROPOUT:  # P^T / (1 - p) from the exponent; delta was stored scaled (attention_bwd_dq_kernel)
        lse2 = lse2 - tl.log2(drop_scale)
    delta = tl.load(delta_ptrs, mask=rows < seqlen_q, other=0.0)
    # -- P^T = exp2(K Q^T * scale - lse), recomputed from the forward's statistics --
    kqt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        kqt = tl.dot(k2, tl.trans(q2), kqt, input_precision=DOT_PRECISION)
    st, tt = score_log2(kqt, offs_n, rows, seqlen_k, seqlen_q,
                        qk_scale, softcap_pre, softcap_post, alibi_log2, SOFTCAP, HAS_ALIBI,
                        am_ptrs + tl.cast(start_m, tl.int64) * stride_amm, ATTN_MASK, key0, True)
    if HAS_ALIBI == ALIBI_KEY_TERM:  # one-sided ALiBi: the query term joins lse
        lse2 = lse2 + alibi_query_term(rows, seqlen_q, seqlen_k, alibi_log2, key0)
    pt = tl.math.exp2(st - lse2[None, :])
    if MASKED == 1:
        vis = visible(rows, offs_n, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        if ELEM:
            vis = and_element_mask(vis, em, offs_n, ELEM)
        pt = tl.where(tl.trans(vis) & (rows[None, :] < seqlen_q), pt, 0.0)
    elif MASKED == 2:
        if need_vis:
            vis = visible(rows, offs_n, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            if ELEM:
                vis = and_element_mask(vis, em, offs_n, ELEM)
            pt = tl.where(tl.trans(vis) & (rows[None, :] < seqlen_q), pt, 0.0)
    # -- dV += P^T dO ; dP^T = V dO^T ; dS^T = P^T * (dP^T - delta) ; dK += dS^T Q --
    if DROPOUT:
        # dS^T = P^T * (dP^T * keep - delta) = (P^T * keep) * dP^T - P^T * delta: the keep bits have one
        # use, right where they are computed, so they stay in predicates. Used twice (the P^T and dP^T
        # selects on either side of the dots), ptxas packed a thread's 32 bits into a register and
        # unpacked them again: 206 LOP3s in the 64x64 loop against the hash's 64 (sm_90 SASS, loop 929
        # -> 727 instructions). dP^T comes first so both operands are ready.
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if BLOCK_DV2 > 0:
            dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=DOT_PRECISION)
        # drop_rows: this head's first row number; transposed
        keep = dropout_keep(dropout_row_keys(drop_rows, start_m + offs_m, seed_hi, 0), dropout_col_keys(offs_n, seed_lo),
                            drop_thr, True)
        pt_kept = tl.where(keep, pt, 0.0)
        dv = tl.dot(pt_kept.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if BLOCK_DV2 > 0:
            dv2 = tl.dot(pt_kept.to(do2.dtype), do2, dv2, input_precision=DOT_PRECISION)
        if SOFTCAP:  # d/dx c*tanh(x/c) = 1 - tanh^2
            slope = 1.0 - tt * tt
            pt_kept = pt_kept * slope
            pt = pt * slope
        dst = pt_kept * dpt - pt * delta[None, :]
    else:
        pt_kept = pt.to(do.dtype)
        if SOFTCAP:  # d/dx c*tanh(x/c) = 1 - tanh^2, folded in now: tt then dies before the two dots (no spills)
            pt = pt * (1.0 - tt * tt)
        dv = tl.dot(pt_kept, do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if BLOCK_DV2 > 0:
            dv2 = tl.dot(pt_kept, do2, dv2, input_precision=DOT_PRECISION)
            dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        dk2 = tl.dot(dst.to(q2.dtype), q2, dk2, input_precision=DOT_PRECISION)
    return dk, dk2, dv, dv2


@triton.jit
def _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                start, stop, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr, EVEN_DV2: tl.constexpr,
                ALIGNED_ROWS: tl.constexpr):
    """Accumulate dK, dV for one key tile over query tiles [start, stop) of one query head (MASKED 0 or 1)."""
    for start_m in range(start, stop, BLOCK_M):
        dk, dk2, dv, dv2 = _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, q_base, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                            start_m, False, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                            seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                            MASKED, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
    return dk, dk2, dv, dv2


@triton.jit
def _dkdv_block_list(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, Tiles, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                     Num, Idx, TileIdx, row, k_block, n_k_blocks, n_q_blocks, full_lo, full_hi,
                     stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                     seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SQ: tl.constexpr, BLOCK_SK: tl.constexpr, ELEM: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr, EVEN_DV2: tl.constexpr,
                ALIGNED_ROWS: tl.constexpr):
    """Visit the query blocks of one block-sparse list (full or partial) of this key block: one flat,
    pipelined loop over their query tiles (see the forward's _fwd_block_list). A full block inside
    [full_lo, full_hi) (query_phases) runs without per-element work.
    Interval rows (ELEM_INTERVALS) take their entry from the column's first one plus the list
    position (BlockMask.partial_q_interval: consecutive along a key-block column), uint8 tiles
    (ELEM_TILE) load each entry's number. Unlike the forward and dQ walks, the partial list stays a
    second loop: merged into the full-block loop, dK/dV ran slower (H200, 8-document mask: 420 ->
    433 us; this form 399, the tiles' form 417)."""
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SQ // BLOCK_M
    count, base = block_list(Num, Idx, row, k_block, n_k_blocks, n_q_blocks)
    em_local = partial_local(offs_m, offs_n % BLOCK_SK, BLOCK_SK, ELEM)  # queries by keys, in the entry
    first_entry = 0
    if ELEM == ELEM_INTERVALS:
        first_entry = tl.load(TileIdx + base)
    for i in range(0, count * TILES_PER_BLOCK):
        if ELEM == ELEM_INTERVALS:
            entry, part, start_m = list_tile(Idx, base, i, TILES_PER_BLOCK, BLOCK_M, BLOCK_SQ)
            em = tl.load(row_tile_ptrs(Tiles, first_entry, i, TILES_PER_BLOCK, part, em_local, BLOCK_SQ, BLOCK_SK, ELEM))
            dk, dk2, dv, dv2 = _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, em, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                start_m, True, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                                1, ELEM, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
        elif ELEM:
            entry, part, start_m = list_tile(Idx, base, i, TILES_PER_BLOCK, BLOCK_M, BLOCK_SQ)
            em = partial_tile_ptrs(Tiles, TileIdx, entry, part * BLOCK_SK, em_local, BLOCK_SQ, BLOCK_SK)
            dk, dk2, dv, dv2 = _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, em, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                start_m, True, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                                1, ELEM, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
        else:
            entry, part, start_m = list_tile(Idx, base, i, TILES_PER_BLOCK, BLOCK_M, BLOCK_SQ)
            need_vis = (start_m < full_lo) | (start_m + BLOCK_M > full_hi)
            dk, dk2, dv, dv2 = _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, q_base, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                start_m, need_vis, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                                2, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
    return dk, dk2, dv, dv2


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "heads_q", "group_size", "heads_per_program", "n_head_programs",
                               "window_left", "window_right", "stride_lse_b", "stride_lse_h", "sparse_mb", "sparse_mh", "sparse_nq", "sparse_nk",
                               "stride_amb", "stride_amh", "stride_amm", "stride_amn",
                               "seed_lo", "seed_hi", "drop_thr"])
def attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Alibi, CuSeqQ, CuSeqK,
    FullNum, FullIdx, PartNum, PartIdx, PartTile, ElemTiles, AttnMask,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh, stride_lse_b, stride_lse_h, stride_alibi_b,
    seqlen_q, seqlen_k, heads_q, group_size, heads_per_program, n_head_programs,
    head_dim, head_dim_v, softmax_scale, softcap, window_left, window_right,
    sparse_mb, sparse_mh, sparse_nq, sparse_nk, stride_amb, stride_amh, stride_amm, stride_amn,
    seed_lo, seed_hi, drop_thr, drop_scale, ProgramOrder,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_SPARSE: tl.constexpr, BLOCK_SQ: tl.constexpr, BLOCK_SK: tl.constexpr,
    ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, TILE_MAJOR: tl.constexpr, HEAD_GROUP: tl.constexpr,
    SPLIT_PHASES: tl.constexpr, SEQLEN_Q: tl.constexpr, SEQLEN_K: tl.constexpr,
    BLOCK_D2: tl.constexpr = 0, BLOCK_DV2: tl.constexpr = 0, EVEN_D2: tl.constexpr = True, EVEN_DV2: tl.constexpr = True,
    ALIGN_LSE: tl.constexpr = False,
):
    """dK, dV for BLOCK_N keys. Program p covers query heads [p*hpp, (p+1)*hpp) of one kv head and
    writes head p of DK/DV: hpp = group_size sums the GQA group in registers (DK is [B, Sk, Hkv, D]);
    hpp = 1 writes per-query-head partials (DK is [B, Sk, Hq, D]) that the launcher sums.
    SEQLEN_Q / SEQLEN_K: the lengths as compile-time constants, or 0 (see the module docstring).
    Head dims in one or two column chunks (BLOCK_D2 / BLOCK_DV2, as in the forward kernel)."""
    if SEQLEN_Q != 0:
        seqlen_q = SEQLEN_Q
    if SEQLEN_K != 0:
        seqlen_k = SEQLEN_K
    n_n_tiles = tl.cdiv(seqlen_k, BLOCK_N)
    tile, bh = program_tile(ProgramOrder, n_n_tiles, BLOCK_SPARSE, TILE_MAJOR, HEAD_GROUP, HAS_RIGHT, False)
    b = bh // n_head_programs
    hp = bh % n_head_programs
    h_q0 = hp * heads_per_program
    h_kv = h_q0 // group_size
    count_q = seqlen_q  # dropout row numbers (see the forward)
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    if VARLEN:
        if tile * BLOCK_N >= seqlen_k:  # a key tile past this sequence's end
            return

    key0 = tile * BLOCK_N  # one-sided ALiBi's reference key (common.score_log2)
    offs_n = key0 + tl.arange(0, BLOCK_N)
    k_rows = (k_start + offs_n).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # -- this program's K and V tiles stay in registers for the whole walk over queries --
    k_mask = offs_n[:, None] < seqlen_k
    if not EVEN_D:
        k_mask = k_mask & (offs_d[None, :] < head_dim)
    v_mask = offs_n[:, None] < seqlen_k
    if not EVEN_DV:
        v_mask = v_mask & (offs_dv[None, :] < head_dim_v)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + k_rows[:, None] * stride_ks + offs_d[None, :],
                mask=k_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vs + offs_dv[None, :],
                mask=v_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # the head dims' tail chunks stay in registers too; without one, placeholders that no tile reads
    k2, v2, offs_d2, offs_dv2 = k, v, offs_d, offs_dv
    dk2 = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        k2 = load_tail(K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + k_rows[:, None] * stride_ks
                       + offs_d2[None, :], offs_n[:, None] < seqlen_k, offs_d2[None, :] < head_dim, True, EVEN_D2)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    if BLOCK_DV2 > 0:
        offs_dv2 = BLOCK_DV + tl.arange(0, BLOCK_DV2)
        v2 = load_tail(V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vs
                       + offs_dv2[None, :], offs_n[:, None] < seqlen_k, offs_dv2[None, :] < head_dim_v, True, EVEN_DV2)
        dv2 = tl.zeros([BLOCK_N, BLOCK_DV2], dtype=tl.float32)

    n_lo = tile * BLOCK_N
    n_hi = tl.minimum(n_lo + BLOCK_N, seqlen_k)
    a, bb, c, d = query_phases(n_lo, n_hi, seqlen_q, seqlen_k, window_left, window_right,
                               BLOCK_M, HAS_LEFT, HAS_RIGHT)
    # ALIGN_LSE (where the launcher measured it faster, tuning.BackwardConfig.aligned_rows): lse and
    # delta are [B, Hq, Sq] contiguous, so with the lengths constant and Sq a multiple of 16 each head's
    # rows start 64-byte aligned; told so, the walk loads them in 8-byte copies instead of 4-byte ones
    # (sm_90 SASS loop instructions, 64x64 w4 dense 474 -> 442). The kernel checks the lengths itself,
    # so a request it cannot honour keeps the 4-byte loads
    ALIGNED_ROWS: tl.constexpr = ALIGN_LSE and SEQLEN_Q != 0 and SEQLEN_Q % 16 == 0 and not VARLEN
    for g in range(0, heads_per_program):
        h = h_q0 + g
        # bases at this sequence's first query row: the tile loops index rows from 0
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qs
        do_base = DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_start.to(tl.int64) * stride_dos
        lse_base = Lse + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start
        delta_base = Delta + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start
        qk_scale, softcap_pre, softcap_post, alibi_log2 = score_params(Alibi, b, h, stride_alibi_b, softmax_scale,
                                                                        softcap, SOFTCAP, HAS_ALIBI)
        drop_rows = dropout_head_row(b, h, heads_q, count_q)  # this head's first row number
        # attn_mask tile in the transposed orientation [keys, queries], at query row 0
        am_ptrs = attn_mask_ptrs(AttnMask, b, h, offs_m[None, :], offs_n[:, None], stride_amb, stride_amh,
                                 stride_amm, stride_amn)
        if BLOCK_SPARSE:
            # -- block-sparse: the query blocks listed for this key block (lists of the transposed mask) --
            row = b * sparse_mb + h * sparse_mh
            k_block = n_lo // BLOCK_SK
            dk, dk2, dv, dv2 = _dkdv_block_list(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, ElemTiles, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                      FullNum, FullIdx, PartTile, row, k_block, sparse_nk, sparse_nq, bb, c,
                                      stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                      seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                                      BLOCK_M, BLOCK_N, BLOCK_SQ, BLOCK_SK, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI,
                                      EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
            if BLOCK_SPARSE != 2:  # 2: the mask has no partial blocks, so no partial-list loop
                dk, dk2, dv, dv2 = _dkdv_block_list(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, ElemTiles, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                          PartNum, PartIdx, PartTile, row, k_block, sparse_nk, sparse_nq, bb, c,
                                          stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                          seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                                          BLOCK_M, BLOCK_N, BLOCK_SQ, BLOCK_SK, 1 + BLOCK_SPARSE // 3, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI,
                                          EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
        elif (HAS_LEFT or HAS_RIGHT) and not SPLIT_PHASES:
            # -- causal / window: one pipelined loop over the query tiles [a, d) that see this key tile;
            # only tiles outside the band [bb, c) pay for the mask. Per-phase loops each drain the
            # software pipeline (H200, D=128 causal fwd+bwd: S=1024 205 -> 245 TFLOP/s, window +7%) --
            for start_m in range(a, d, BLOCK_M):
                dk, dk2, dv, dv2 = _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, q_base, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                    start_m, (start_m < bb) | (start_m >= c), stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                    seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, key0,
                                    2, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
        else:
            # -- the query tiles in phases, each its own loop: masked [a, bb) (only with a mask edge),
            # the unmasked band [bb, c), masked [c, d). With a right edge (SPLIT_PHASES: long causal
            # sequences) the band's loop then carries no mask code (H200, B=2, H=16, S=8192, D=128
            # causal: dK/dV 2704 -> 2507 us on 64x64 tiles; GQA 2659 -> 2401) --
            if HAS_LEFT or HAS_RIGHT:
                dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                     a, bb, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v,
                                     window_left, window_right, key0, BLOCK_M, 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
            dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                 bb, c, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v,
                                 window_left, window_right, key0, BLOCK_M, 0, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)
            dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, offs_d2, offs_dv2, q_base, do_base, lse_base, delta_base, am_ptrs, stride_amm, drop_rows, seed_lo, seed_hi, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                 c, d, stride_qs, stride_dos, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v,
                                 window_left, window_right, key0, BLOCK_M, 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, ALIGNED_ROWS)

    dk_base = DK + b.to(tl.int64) * stride_dkb + hp.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + hp.to(tl.int64) * stride_dvh
    in_seq = offs_n < seqlen_k
    store_rows(dk_base, k_rows, stride_dks, offs_d, dk * softmax_scale, in_seq, head_dim, EVEN_D)
    store_rows(dv_base, k_rows, stride_dvs, offs_dv, dv, in_seq, head_dim_v, EVEN_DV)
    if BLOCK_D2 > 0:
        store_rows(dk_base, k_rows, stride_dks, offs_d2, dk2 * softmax_scale, in_seq, head_dim, EVEN_D2)
    if BLOCK_DV2 > 0:
        store_rows(dv_base, k_rows, stride_dvs, offs_dv2, dv2, in_seq, head_dim_v, EVEN_DV2)


@triton.jit
def _dq_tile(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, em_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
             start_n, need_vis, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
             seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
             MASKED: tl.constexpr, ELEM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
             EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
             BIAS_GRAD: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr,
             EVEN_DV2: tl.constexpr):
    """Accumulate dQ with the key tile starting at start_n (MASKED / need_vis / ELEM as in the forward's
    _fwd_tile); BIAS_GRAD also writes dS (the gradient of the additive attn_mask bias) to this head's
    fp32 [Sq, Sk] slice at db_base (a scalar pointer)."""
    cols = start_n + offs_n
    if MASKED != 0:
        k_mask = cols[:, None] < seqlen_k
        v_mask = cols[:, None] < seqlen_k
    else:
        k_mask = cols[:, None] >= 0
        v_mask = cols[:, None] >= 0
    if not EVEN_D:
        k_mask = k_mask & (offs_d[None, :] < head_dim)
    if not EVEN_DV:
        v_mask = v_mask & (offs_dv[None, :] < head_dim_v)
    if MASKED != 0 or not EVEN_D:
        k = tl.load(k_ptrs + start_n * stride_ks, mask=k_mask, other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_ks)
    if MASKED != 0 or not EVEN_DV:
        v = tl.load(v_ptrs + start_n * stride_vs, mask=v_mask, other=0.0)
    else:
        v = tl.load(v_ptrs + start_n * stride_vs)
    if BLOCK_D2 > 0:
        k2 = load_tail(k2_ptrs + start_n * stride_ks, cols[:, None] < seqlen_k, offs_d2[None, :] < head_dim,
                       MASKED != 0, EVEN_D2)
    if BLOCK_DV2 > 0:
        v2 = load_tail(v2_ptrs + start_n * stride_vs, cols[:, None] < seqlen_k, offs_dv2[None, :] < head_dim_v,
                       MASKED != 0, EVEN_DV2)
    if ELEM == ELEM_TILE:
        em = tl.load(em_ptrs)
    elif ELEM == ELEM_INTERVALS:  # loaded by the merged walk (common.merged_row_tile)
        em = em_ptrs
    # -- P = exp2(Q K^T * scale - lse); dP = dO V^T; dS = P * (dP - delta); dQ += dS K --
    qkt = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        qkt = tl.dot(q2, tl.trans(k2), qkt, input_precision=DOT_PRECISION)
    s, t = score_log2(qkt, offs_m, cols, seqlen_q, seqlen_k,
                      qk_scale, softcap_pre, softcap_post, alibi_log2, SOFTCAP, HAS_ALIBI,
                      am_ptrs + tl.cast(start_n, tl.int64) * stride_amn, ATTN_MASK, start_n)
    if HAS_ALIBI == ALIBI_KEY_TERM:  # one-sided ALiBi: the query term joins lse
        p = tl.math.exp2(s - (lse2 + alibi_query_term(offs_m, seqlen_q, seqlen_k, alibi_log2, start_n))[:, None])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    if MASKED == 1:
        vis = visible(offs_m, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        if ELEM:
            vis = and_element_mask(vis, em, cols, ELEM)
        p = tl.where(vis, p, 0.0)
    elif MASKED == 2:
        if need_vis:
            vis = visible(offs_m, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            if ELEM:
                vis = and_element_mask(vis, em, cols, ELEM)
            p = tl.where(vis, p, 0.0)
    if SOFTCAP and not BIAS_GRAD:  # the tanh factor folded in before the dot: t dies early (no spills)
        p = p * (1.0 - t * t)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if BLOCK_DV2 > 0:
        dp = tl.dot(do2, tl.trans(v2), dp, input_precision=DOT_PRECISION)
    if DROPOUT:  # p and delta carry the scale (attention_bwd_dq_kernel)
        # the keys' part per tile: as loop invariants (dropout_tile_keep) they held 8 more registers, and
        # the 4-warp dQ at D = 64 spilled in its loop (17% slower on the H200)
        keep = dropout_keep(drop_keys, dropout_col_keys(cols, 0), drop_thr, False)
        dp = tl.where(keep, dp, 0.0)
    ds = p * (dp - delta[:, None])
    if BIAS_GRAD:  # the bias is added after softcap: its gradient is dS before the tanh factor
        tl.store(db_base + offs_m[:, None].to(tl.int64) * seqlen_k + cols[None, :], ds,
                 mask=(offs_m[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        dq2 = tl.dot(ds.to(k2.dtype), k2, dq2, input_precision=DOT_PRECISION)
    return dq, dq2


@triton.jit
def _dq_tiles(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
              start, stop, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
              seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
              BIAS_GRAD: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr,
             EVEN_DV2: tl.constexpr):
    """Accumulate dQ over key tiles [start, stop) (MASKED 0 or 1)."""
    for start_n in range(start, stop, BLOCK_N):
        dq, dq2 = _dq_tile(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, k_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                      start_n, False, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                      seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
                      MASKED, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT,
                      BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)
    return dq, dq2


@triton.jit
def _dq_block_list(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, Tiles, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                   Num, Idx, PNum, PIdx, TileIdx, row, q_block, n_q_blocks, n_k_blocks, full_lo, full_hi,
                   stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                   seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
                   BLOCK_N: tl.constexpr, BLOCK_SQ: tl.constexpr, BLOCK_SK: tl.constexpr, ELEM: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                   BIAS_GRAD: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr,
             EVEN_DV2: tl.constexpr):
    """Visit the key blocks of one block-sparse list of this query block: one flat, pipelined loop over
    their key tiles (see the forward's _fwd_block_list; ELEM_INTERVALS: one merged walk over both lists)."""
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SK // BLOCK_N
    count, base, n_full, p_base, first_tile, em_local = row_walk(Num, Idx, PNum, PIdx, TileIdx, row, q_block, n_q_blocks,
                                                                 n_k_blocks, offs_m, offs_n, BLOCK_SQ, BLOCK_SK, ELEM)
    for i in range(0, count * TILES_PER_BLOCK):
        if ELEM == ELEM_INTERVALS:
            start_n, em, need_vis = merged_row_tile(Idx, base, PIdx, p_base, n_full, Tiles, first_tile, em_local, i, full_lo,
                                                    full_hi, TILES_PER_BLOCK, BLOCK_N, BLOCK_SQ, BLOCK_SK)
            dq, dq2 = _dq_tile(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, em, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                          start_n, need_vis, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                          seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
                          2, ELEM, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT,
                          BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)
        elif ELEM:
            entry, part, start_n = list_tile(Idx, base, i, TILES_PER_BLOCK, BLOCK_N, BLOCK_SK)
            em_ptrs = row_tile_ptrs(Tiles, first_tile, i, TILES_PER_BLOCK, part, em_local, BLOCK_SQ, BLOCK_SK, ELEM)
            dq, dq2 = _dq_tile(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, em_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                          start_n, True, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                          seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
                          1, ELEM, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT,
                          BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)
        else:
            entry, part, start_n = list_tile(Idx, base, i, TILES_PER_BLOCK, BLOCK_N, BLOCK_SK)
            need_vis = (start_n < full_lo) | (start_n + BLOCK_N > full_hi)
            dq, dq2 = _dq_tile(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, k_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                          start_n, need_vis, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                          seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
                          2, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT,
                          BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)
    return dq, dq2


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "heads_q", "group_size", "window_left", "window_right",
                               "stride_lse_b", "stride_lse_h", "sparse_mb", "sparse_mh", "sparse_nq", "sparse_nk",
                               "stride_amb", "stride_amh", "stride_amm", "stride_amn",
                               "seed_lo", "seed_hi", "drop_thr"])
def attention_bwd_dq_kernel(
    Q, K, V, Out, DOut, Lse, Delta, DQ, Alibi, CuSeqQ, CuSeqK,
    FullNum, FullIdx, PartNum, PartIdx, PartTile, ElemTiles, AttnMask, DBias,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh, stride_lse_b, stride_lse_h, stride_alibi_b,
    seqlen_q, seqlen_k, heads_q, group_size, head_dim, head_dim_v,
    softmax_scale, softcap, window_left, window_right,
    sparse_mb, sparse_mh, sparse_nq, sparse_nk, stride_amb, stride_amh, stride_amm, stride_amn,
    seed_lo, seed_hi, drop_thr, drop_scale, ProgramOrder,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_SPARSE: tl.constexpr, BLOCK_SQ: tl.constexpr, BLOCK_SK: tl.constexpr,
    ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, BIAS_GRAD: tl.constexpr,
    TILE_MAJOR: tl.constexpr, HEAD_GROUP: tl.constexpr,
    BLOCK_D2: tl.constexpr = 0, BLOCK_DV2: tl.constexpr = 0, EVEN_D2: tl.constexpr = True, EVEN_DV2: tl.constexpr = True,
):
    """dQ [B, Sq, Hq, D] and Delta fp32 [B, Hq, Sq] for BLOCK_M query rows of one (batch, query head).
    Head dims in one or two column chunks (BLOCK_D2 / BLOCK_DV2, as in the forward kernel)."""
    n_m_tiles = tl.cdiv(seqlen_q, BLOCK_M)
    tile, bh = program_tile(ProgramOrder, n_m_tiles, BLOCK_SPARSE, TILE_MAJOR, HEAD_GROUP, HAS_RIGHT, True)
    b = bh // heads_q
    h = bh % heads_q
    h_kv = h // group_size
    count_q = seqlen_q  # dropout row numbers (see the forward)
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    if VARLEN:
        if tile * BLOCK_M >= seqlen_q:
            return

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = (q_start + offs_m).to(tl.int64)
    k_rows = (k_start + offs_n).to(tl.int64)

    q_mask = offs_m[:, None] < seqlen_q
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < head_dim)
    do_mask = offs_m[:, None] < seqlen_q
    if not EVEN_DV:
        do_mask = do_mask & (offs_dv[None, :] < head_dim_v)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_rows[:, None] * stride_dos + offs_dv[None, :],
                 mask=do_mask, other=0.0)
    lse_offset = b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start
    lse2 = _load_lse2(Lse + lse_offset + offs_m, offs_m < seqlen_q)
    # -- delta = rowsum(dO * O): computed here once per row, read again by the dK/dV launch --
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_rows[:, None] * stride_os + offs_dv[None, :],
                mask=do_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)

    k_ptrs = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + k_rows[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vs + offs_dv[None, :]
    # the head dims' tail chunks; without one, placeholders that no tile reads
    q2, do2, k2_ptrs, v2_ptrs, offs_d2, offs_dv2 = q, do, k_ptrs, v_ptrs, offs_d, offs_dv
    dq2 = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = load_tail(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qs
                       + offs_d2[None, :], offs_m[:, None] < seqlen_q, offs_d2[None, :] < head_dim, True, EVEN_D2)
        k2_ptrs = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + k_rows[:, None] * stride_ks + offs_d2[None, :]
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    if BLOCK_DV2 > 0:
        offs_dv2 = BLOCK_DV + tl.arange(0, BLOCK_DV2)
        do2_ptrs = q_rows[:, None] * stride_dos + offs_dv2[None, :]
        do2 = load_tail(DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + do2_ptrs,
                        offs_m[:, None] < seqlen_q, offs_dv2[None, :] < head_dim_v, True, EVEN_DV2)
        o2 = load_tail(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_rows[:, None] * stride_os
                       + offs_dv2[None, :], offs_m[:, None] < seqlen_q, offs_dv2[None, :] < head_dim_v, True, EVEN_DV2)
        delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), 1)
        v2_ptrs = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vs + offs_dv2[None, :]
    if DROPOUT:
        # dS = P * (keep * dP / (1 - p) - delta) = (P / (1 - p)) * (keep * dP - delta * (1 - p)): the
        # scale moves into P's exponent (lse - log2 scale) and into delta, which the dK/dV launch reads
        # scaled too; no per-element multiply is left
        delta = delta / drop_scale
        lse2 = lse2 - tl.log2(drop_scale)
    tl.store(Delta + lse_offset + offs_m, delta, mask=offs_m < seqlen_q)
    am_ptrs = attn_mask_ptrs(AttnMask, b, h, offs_m[:, None], offs_n[None, :], stride_amb, stride_amh, stride_amm,
                             stride_amn)
    # each query row's dropout key (dropout.py's row_key; varlen: FlashAttention's padded pattern)
    drop_keys = dropout_row_keys(dropout_head_row(b, h, heads_q, count_q), tile * BLOCK_M + tl.arange(0, BLOCK_M),
                                 seed_hi, seed_lo)
    db_base = DBias + (b * heads_q + h).to(tl.int64) * seqlen_q * seqlen_k  # dS of this head, [Sq, Sk]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale, softcap_pre, softcap_post, alibi_log2 = score_params(Alibi, b, h, stride_alibi_b, softmax_scale, softcap,
                                                                    SOFTCAP, HAS_ALIBI)

    m_lo = tile * BLOCK_M
    m_hi = tl.minimum(m_lo + BLOCK_M, seqlen_q)
    a, bb, c, d = key_phases(m_lo, m_hi, seqlen_q, seqlen_k, window_left, window_right,
                             BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if BLOCK_SPARSE:
        # -- block-sparse: the key blocks listed for this query block, full then partial (as the forward) --
        row = b * sparse_mb + h * sparse_mh
        q_block = m_lo // BLOCK_SQ
        dq, dq2 = _dq_block_list(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, ElemTiles, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                            FullNum, FullIdx, PartNum, PartIdx, PartTile, row, q_block, sparse_nq, sparse_nk, bb, c,
                            stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                            seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
                            BLOCK_N, BLOCK_SQ, BLOCK_SK, (BLOCK_SPARSE // 3) * ELEM_INTERVALS, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV,
                            DOT_PRECISION, ATTN_MASK, DROPOUT, BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)
        if BLOCK_SPARSE == 1:  # 2: the mask has no partial blocks, so no partial-list loop
            dq, dq2 = _dq_block_list(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, ElemTiles, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                                PartNum, PartIdx, PartNum, PartIdx, PartTile, row, q_block, sparse_nq, sparse_nk, bb, c,
                                stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
                                BLOCK_N, BLOCK_SQ, BLOCK_SK, ELEM_TILE, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV,
                                DOT_PRECISION, ATTN_MASK, DROPOUT, BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)
    elif HAS_LEFT or HAS_RIGHT:
        # -- causal / window: one pipelined loop over the visible key tiles (see the dK/dV kernel) --
        for start_n in range(a, d, BLOCK_N):
            dq, dq2 = _dq_tile(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, k_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                          start_n, (start_n < bb) | (start_n >= c), stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                          seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, db_base,
                          2, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT,
                          BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)
    else:
        dq, dq2 = _dq_tiles(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                       bb, c, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v,
                       window_left, window_right, db_base, BLOCK_N, 0, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)
        dq, dq2 = _dq_tiles(dq, dq2, q, q2, do, do2, lse2, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, am_ptrs, stride_amn, drop_keys, drop_thr, drop_scale, offs_m, offs_n, offs_d, offs_dv,
                       c, d, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k, head_dim, head_dim_v,
                       window_left, window_right, db_base, BLOCK_N, 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BIAS_GRAD, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2)

    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    store_rows(dq_base, q_rows, stride_dqs, offs_d, dq * softmax_scale, offs_m < seqlen_q, head_dim, EVEN_D)
    if BLOCK_D2 > 0:
        store_rows(dq_base, q_rows, stride_dqs, offs_d2, dq2 * softmax_scale, offs_m < seqlen_q, head_dim, EVEN_D2)
