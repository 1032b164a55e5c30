"""The one forward attention kernel (FlashAttention-2 algorithm).

Each program owns BLOCK_M query rows of one (batch, query head) and streams the visible key/value
tiles through an online softmax held in registers, so the S x S score matrix never exists.
Features are tl.constexpr flags (causal / sliding window as HAS_LEFT / HAS_RIGHT, padded head dims
as EVEN_D), so an unused feature costs nothing: Triton compiles one specialisation per flag set.
"""

import triton
import triton.language as tl

from flashtile.kernels.common import (ELEM_INTERVALS, ELEM_TILE, attn_mask_ptrs, load_tail, store_rows, dropout_tile_keep, dropout_head_row, dropout_row_keys, fp32_fence, key_phases, list_tile,
                                      and_element_mask, merged_row_tile, row_walk, online_softmax, program_tile, row_tile_ptrs, score_log2, score_params,
                                      sequence_bounds, visible)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# MAX_MODE: what the online softmax subtracts before exp2 (attention_launch.max_mode chooses)
MAX_RUNNING = tl.constexpr(0)  # the running row max, the accumulator rescaled at every key tile
MAX_FIXED = tl.constexpr(1)  # a softcap's bound on every score: no max, no rescale
MAX_LAZY = tl.constexpr(2)  # a stale row max, rescaled only when some row's max grows past it + RESCALE_SLACK
# the running max over unscaled q.k (the score is q.k * scale, scale > 0), scaled after the max: one
# multiply a row, the scale folded into exp2's argument (one FMA a score, FlashAttention-2's order)
MAX_RAW = tl.constexpr(3)
RESCALE_SLACK = tl.constexpr(8.0)  # log2 domain: p <= 2^8, far inside P's and the fp32 sums' range


@triton.jit
def _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, em_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
              start_n, need_vis, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
              seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
              MASKED: tl.constexpr, ELEM: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
              BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr, EVEN_DV2: tl.constexpr, MAX_MODE: tl.constexpr):
    """Online-softmax update with the key tile starting at start_n.

    MASKED: 0 = every key visible and in range (no per-element work); 1 = apply the visibility rule
    and the sequence end; 2 = loads stop at the sequence end, the visibility rule applies when the
    run-time need_vis is set (block-sparse lists mix both kinds of tile in one pipelined loop).
    ELEM also ANDs a partial block's element mask: ELEM_TILE, em_ptrs points at this tile's
    [BLOCK_M, BLOCK_N] window of a uint8 partial-block tile (masks.BlockMask.partial_tiles);
    ELEM_INTERVALS, em_ptrs is the rows' key intervals, already loaded (common.merged_row_tile).
    BLOCK_D2 / BLOCK_DV2 > 0: the head dims' tail chunks (q2, k2_ptrs at columns offs_d2; v2_ptrs and
    acc2 at offs_dv2), see the kernel's docstring.
    MAX_MODE: MAX_FIXED: m_i holds the softcap's bound and never changes (no row max, no rescale).
    MAX_LAZY: m_i stays until a tile raises some row's max by more than RESCALE_SLACK; only then are
    acc and l_i rescaled (all rows, in one branch the whole program takes or skips). Exact: acc, l_i
    and lse all refer to the same m_i, and p <= 2^RESCALE_SLACK meanwhile.
    MAX_RAW: MAX_RUNNING on unscaled q.k (masked as -inf), scaled after the row max.
    """
    cols = start_n + offs_n
    # -- load K tile (as K^T) and V tile; only masked tiles can cross the sequence end --
    if MASKED != 0:
        k_mask = cols[None, :] < seqlen_k
        if not EVEN_D:
            k_mask = k_mask & (offs_d[:, None] < head_dim)
        kt = tl.load(k_ptrs + start_n * stride_ks, mask=k_mask, other=0.0)
    elif EVEN_D:
        kt = tl.load(k_ptrs + start_n * stride_ks)
    else:
        kt = tl.load(k_ptrs + start_n * stride_ks, mask=offs_d[:, None] < head_dim, other=0.0)
    if ELEM == ELEM_TILE:
        em = tl.load(em_ptrs)
    elif ELEM == ELEM_INTERVALS:  # loaded by the merged walk (common.merged_row_tile)
        em = em_ptrs
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:  # the head dim's tail chunk adds its part of q.k
        kt2 = load_tail(k2_ptrs + start_n * stride_ks, cols[None, :] < seqlen_k, offs_d2[:, None] < head_dim,
                         MASKED != 0, EVEN_D2)
        qk = tl.dot(q2, kt2, qk, input_precision=DOT_PRECISION)
    # -- scores in the log2 domain: qk_scale = softmax_scale * log2(e) (MAX_RAW: scaled below) --
    qk, _ = score_log2(qk, offs_m, cols, seqlen_q, seqlen_k,
                       qk_scale, softcap_pre, softcap_post, alibi_log2, SOFTCAP, HAS_ALIBI,
                       am_ptrs + tl.cast(start_n, tl.int64) * stride_amn, ATTN_MASK, start_n,
                       SCALED=MAX_MODE != MAX_RAW)
    if MASKED == 1:
        vis = visible(offs_m, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        if ELEM:
            vis = and_element_mask(vis, em, cols, ELEM)
        qk = tl.where(vis, qk, float("-inf"))
    elif MASKED == 2:
        if need_vis:
            vis = visible(offs_m, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            if ELEM:
                vis = and_element_mask(vis, em, cols, ELEM)
            qk = tl.where(vis, qk, float("-inf"))
    if MAX_MODE == MAX_FIXED:
        # -- the scores' upper bound m_i (softcap) stands in for the running max: nothing to rescale --
        p = tl.math.exp2(qk - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        m_new = m_i
    elif MAX_MODE == MAX_LAZY:
        # -- rescale only when some row's max outgrew m_i by more than the slack: the program-wide max
        # of the growth costs a shared-memory reduction and a barrier per tile, which pays only where
        # the accumulator is wide (attention_launch.max_mode). A -inf row (nothing seen yet) that
        # sees a score grows by +inf, so the first visible tile always sets m_i; NaN scores never
        # compare greater and reach the output through p --
        m_tile = tl.max(qk, 1)
        grow = tl.max(tl.where(m_tile > m_i, m_tile - m_i, 0.0), 0)
        m_new = m_i
        if grow > RESCALE_SLACK:
            m_new = tl.maximum(m_i, m_tile)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_sub)
            acc = acc * alpha[:, None]
            if BLOCK_DV2 > 0:
                acc2 = acc2 * alpha[:, None]
            l_i = l_i * alpha
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        l_i = l_i + tl.sum(p, 1)
    else:
        # -- online softmax: new running max, rescale what was accumulated (MAX_RAW: qk unscaled; a
        # positive scale commutes with the max, rounding included, so m_new is the same number) --
        p, alpha, l_i, m_new = online_softmax(qk, m_i, l_i, MASKED != 0 or ATTN_MASK != 0, MAX_MODE == MAX_RAW,
                                              qk_scale)
        acc = acc * alpha[:, None]
        if BLOCK_DV2 > 0:
            acc2 = acc2 * alpha[:, None]
    if MASKED != 0:
        v_mask = cols[:, None] < seqlen_k
        if not EVEN_DV:
            v_mask = v_mask & (offs_dv[None, :] < head_dim_v)
        v = tl.load(v_ptrs + start_n * stride_vs, mask=v_mask, other=0.0)
    elif EVEN_DV:
        v = tl.load(v_ptrs + start_n * stride_vs)
    else:
        v = tl.load(v_ptrs + start_n * stride_vs, mask=offs_dv[None, :] < head_dim_v, other=0.0)
    if DROPOUT:  # l_i keeps the undropped sum (softmax normaliser); only P @ V sees the mask
        keep = dropout_tile_keep(drop_keys, start_n, offs_n, drop_thr)
        p = tl.where(keep, p, 0.0)
        if DROPOUT == 2:  # select in fp32, then convert (see fp32_fence)
            p = fp32_fence(p)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    if BLOCK_DV2 > 0:
        v2 = load_tail(v2_ptrs + start_n * stride_vs, cols[:, None] < seqlen_k, offs_dv2[None, :] < head_dim_v,
                        MASKED != 0, EVEN_DV2)
        acc2 = tl.dot(p.to(v2.dtype), v2, acc2, input_precision=DOT_PRECISION)
    return acc, acc2, l_i, m_new


@triton.jit
def _fwd_tiles(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
               start, stop, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
               seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
               BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr, EVEN_DV2: tl.constexpr, MAX_MODE: tl.constexpr):
    """Online-softmax update over key tiles [start, stop) in steps of BLOCK_N (MASKED 0 or 1)."""
    for start_n in range(start, stop, BLOCK_N):
        acc, acc2, l_i, m_i = _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, k_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                  start_n, False, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                  seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                                  MASKED, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV,
                                  DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)
    return acc, acc2, l_i, m_i


@triton.jit
def _fwd_block_list(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, Tiles, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                    Num, Idx, PNum, PIdx, TileIdx, row, q_block, n_q_blocks, n_k_blocks, full_lo, full_hi,
                    stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                    seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SQ: tl.constexpr, BLOCK_SK: tl.constexpr,
                    ELEM: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
               BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, EVEN_D2: tl.constexpr, EVEN_DV2: tl.constexpr, MAX_MODE: tl.constexpr):
    """Visit the key blocks of one block-sparse list (full or partial) of this query block.

    One flat loop over the list's key tiles (BLOCK_SK / BLOCK_N per block), so the software pipeline
    prefetches the next block's K / V while this one computes (a loop per block would drain it).
    A full block inside [full_lo, full_hi) (key_phases: keys that every row of the tile sees and that
    lie inside the sequence) runs without per-element work; other full blocks apply the causal /
    window rule and the sequence end; partial blocks (ELEM) also AND their element-mask tile.
    ELEM_INTERVALS: one merged walk over this list (full blocks) and then PNum / PIdx's (partial ones),
    full and partial tiles in one pipelined loop (common.merged_row_tile).
    """
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SK // BLOCK_N
    count, base, n_full, p_base, first_tile, em_local = row_walk(Num, Idx, PNum, PIdx, TileIdx, row, q_block, n_q_blocks,
                                                                 n_k_blocks, offs_m, offs_n, BLOCK_SQ, BLOCK_SK, ELEM)
    for i in range(0, count * TILES_PER_BLOCK):
        if ELEM == ELEM_INTERVALS:
            start_n, em, need_vis = merged_row_tile(Idx, base, PIdx, p_base, n_full, Tiles, first_tile, em_local, i, full_lo,
                                                    full_hi, TILES_PER_BLOCK, BLOCK_N, BLOCK_SQ, BLOCK_SK)
            acc, acc2, l_i, m_i = _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, em, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                      start_n, need_vis, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                      seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                                      2, ELEM, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV,
                                      DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)
        elif ELEM:
            entry, part, start_n = list_tile(Idx, base, i, TILES_PER_BLOCK, BLOCK_N, BLOCK_SK)
            em_ptrs = row_tile_ptrs(Tiles, first_tile, i, TILES_PER_BLOCK, part, em_local, BLOCK_SQ, BLOCK_SK, ELEM)
            acc, acc2, l_i, m_i = _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, em_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                      start_n, True, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                      seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                                      1, ELEM, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV,
                                      DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)
        else:
            entry, part, start_n = list_tile(Idx, base, i, TILES_PER_BLOCK, BLOCK_N, BLOCK_SK)
            need_vis = (start_n < full_lo) | (start_n + BLOCK_N > full_hi)  # crosses an edge or the end
            acc, acc2, l_i, m_i = _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, k_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                      start_n, need_vis, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                      seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                                      2, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV,
                                      DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)
    return acc, acc2, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "heads_q", "group_size", "window_left", "window_right",
                               "stride_lse_b", "stride_lse_h", "sparse_mb", "sparse_mh", "sparse_nq", "sparse_nk",
                               "stride_amb", "stride_amh", "stride_amm", "stride_amn",
                               "seed_lo", "seed_hi", "drop_thr"])
def attention_fwd_kernel(
    Q, K, V, Out, Lse, Alibi, CuSeqQ, CuSeqK,
    FullNum, FullIdx, PartNum, PartIdx, PartTile, ElemTiles, AttnMask,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h, stride_alibi_b,
    seqlen_q, seqlen_k, heads_q, group_size, head_dim, head_dim_v,
    softmax_scale, softcap, window_left, window_right,
    sparse_mb, sparse_mh, sparse_nq, sparse_nk, stride_amb, stride_amh, stride_amm, stride_amn,
    seed_lo, seed_hi, drop_thr, drop_scale, ProgramOrder,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_SPARSE: tl.constexpr, BLOCK_SQ: tl.constexpr, BLOCK_SK: tl.constexpr,
    ATTN_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, TILE_MAJOR: tl.constexpr, HEAD_GROUP: tl.constexpr,
    BLOCK_D2: tl.constexpr = 0, BLOCK_DV2: tl.constexpr = 0, EVEN_D2: tl.constexpr = True, EVEN_DV2: tl.constexpr = True,
    MAX_MODE: tl.constexpr = 0,
):
    """Q [B, Sq, Hq, D], K [B, Sk, Hkv, D], V [B, Sk, Hkv, Dv] -> Out [B, Sq, Hq, Dv], Lse fp32 [B, Hq, Sq].

    Head dims as one or two power-of-two chunks (tuning.head_dim_chunks): columns [0, BLOCK_D), and
    with BLOCK_D2 > 0 a tail [BLOCK_D, BLOCK_D + BLOCK_D2), so that D = 96 runs 64 + 32 columns instead
    of a 128-wide tile with a quarter of padding (V / Out: BLOCK_DV, BLOCK_DV2). EVEN_D: the first chunk
    lies inside D (no column mask); EVEN_D2: so does the tail.

    Grid: one program per (query tile, batch x query head), query tiles fastest so that programs
    sharing K/V run together (L2 reuse); with a right mask edge the heavy tiles go first.
    TILE_MAJOR orders tiles first (last tiles first) to balance sequences of different lengths
    (VARLEN) or the causal tiles of GQA, whose kv heads' K/V fit in L2 (attention_launch.tile_major);
    BLOCK_SPARSE programs start in ProgramOrder (heaviest block lists first).
    VARLEN: sequences are packed ([total, H, D], batch strides 0); sequence b spans rows
    CuSeqQ[b]:CuSeqQ[b+1] (keys: CuSeqK), seqlen_q / seqlen_k are the maxima, lse is [Hq, total_q].
    BLOCK_SPARSE (0 none, 1 full and partial lists, 2 full lists only): only the key blocks listed for
    this query block are visited (masks.BlockMask's full / partial lists, blocks of BLOCK_SQ x
    BLOCK_SK); partial blocks AND their uint8 element-mask tile (ElemTiles [P, BLOCK_SQ, BLOCK_SK],
    PartTile: the tile of each partial-list entry). 2, for a mask without partial blocks, leaves the
    partial-list loop out of the kernel (attention_launch._Sparse.flag): its code, run or not, shapes
    the register allocation of the whole kernel (H200, random block masks at 50 / 25 / 10% density:
    forward 1-3% faster, forward+backward ~3%). 3: every partial row is one interval of keys
    (document, causal, window masks): ElemTiles holds the intervals (BlockMask.partial_intervals, two
    numbers per row instead of a byte per element), and the full and partial lists are walked in one
    loop (common.merged_row_tile), so the few partial blocks of a row no longer fill and drain a
    software pipeline of their own (H200, 8-document mask, us: forward 229 -> 226, dQ 296 -> 255,
    with the dK/dV kernel's form 417 -> 399: forward+backward step 945 -> 885).
    MAX_MODE (attention_launch.max_mode): MAX_RUNNING, FlashAttention-2's running row max; MAX_FIXED,
    a softcap bounds every log2-domain score by softcap * log2(e), which then stands in for the
    running max (attention_launch.fixed_max says where that is exact): no per-tile row max, no
    rescaling of the accumulator; MAX_LAZY, a stale row max rescaled only when a tile outgrows it by
    RESCALE_SLACK (_fwd_tile); MAX_RAW, MAX_RUNNING with the row max taken over the unscaled q.k
    (no softcap, ALiBi or additive mask, softmax_scale > 0): same results, one multiply a row
    instead of one a score.
    """
    # -- which tile of which head --
    n_m_tiles = tl.cdiv(seqlen_q, BLOCK_M)
    tile, bh = program_tile(ProgramOrder, n_m_tiles, BLOCK_SPARSE, TILE_MAJOR, HEAD_GROUP, HAS_RIGHT, True)
    b = bh // heads_q
    h = bh % heads_q
    h_kv = h // group_size
    count_q = seqlen_q  # dropout rows are numbered in a [B, Hq, max Sq] grid (see below)
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    if VARLEN:
        if tile * BLOCK_M >= seqlen_q:  # a tile past this sequence's end (the grid covers the longest)
            return

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = (q_start + offs_m).to(tl.int64)
    k_rows = (k_start + offs_n).to(tl.int64)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :]
    k_ptrs = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + k_rows[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vs + offs_dv[None, :]

    q_mask = offs_m[:, None] < seqlen_q
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < head_dim)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    # the head dims' tail chunks; without one, placeholders that no tile reads
    acc2 = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    q2, k2_ptrs, v2_ptrs, offs_d2, offs_dv2 = q, k_ptrs, v_ptrs, offs_d, offs_dv
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = load_tail(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qs
                        + offs_d2[None, :], offs_m[:, None] < seqlen_q, offs_d2[None, :] < head_dim, True, EVEN_D2)
        k2_ptrs = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + k_rows[None, :] * stride_ks + offs_d2[:, None]
    if BLOCK_DV2 > 0:
        offs_dv2 = BLOCK_DV + tl.arange(0, BLOCK_DV2)
        v2_ptrs = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vs + offs_dv2[None, :]
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV2], dtype=tl.float32)

    # torch SDPA's attn_mask (bool or additive), broadcast through 0 strides; read tile by tile
    am_ptrs = attn_mask_ptrs(AttnMask, b, h, offs_m[:, None], offs_n[None, :], stride_amb, stride_amh, stride_amm,
                             stride_amn)

    # dropout: query row i of head (b, h) is row (b * Hq + h) * Sq + i, whose key (dropout.py's row_key)
    # with the key index j gives element (i, j)'s bits (varlen: i, j within sequence b, Sq the maximum,
    # so the keep pattern is FlashAttention's padded one)
    drop_keys = dropout_row_keys(dropout_head_row(b, h, heads_q, count_q), tile * BLOCK_M + tl.arange(0, BLOCK_M),
                                 seed_hi, seed_lo)

    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    qk_scale, softcap_pre, softcap_post, alibi_log2 = score_params(Alibi, b, h, stride_alibi_b, softmax_scale, softcap,
                                                                   SOFTCAP, HAS_ALIBI)
    if MAX_MODE == MAX_FIXED:  # softcap bounds every score by softcap * log2(e) (attention_launch.fixed_max)
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + softcap_post
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    m_lo = tile * BLOCK_M
    m_hi = tl.minimum(m_lo + BLOCK_M, seqlen_q)
    # key tiles [a, bb) and [c, d) need the element mask; [bb, c) is visible to every row
    a, bb, c, d = key_phases(m_lo, m_hi, seqlen_q, seqlen_k, window_left, window_right,
                             BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if BLOCK_SPARSE:
        # -- block-sparse: full blocks, then partial blocks with their element masks; key intervals
        # (3) walk both lists in one loop, element-mask tiles (1) in a second one --
        row = b * sparse_mb + h * sparse_mh
        q_block = m_lo // BLOCK_SQ
        acc, acc2, l_i, m_i = _fwd_block_list(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, ElemTiles, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                        FullNum, FullIdx, PartNum, PartIdx, PartTile, row, q_block, sparse_nq, sparse_nk, bb, c,
                                        stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                        seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                                        BLOCK_M, BLOCK_N, BLOCK_SQ, BLOCK_SK, (BLOCK_SPARSE // 3) * ELEM_INTERVALS, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI,
                                        EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)
        if BLOCK_SPARSE == 1:  # 2: the mask has no partial blocks, so no partial-list loop
            acc, acc2, l_i, m_i = _fwd_block_list(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, ElemTiles, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                            PartNum, PartIdx, PartNum, PartIdx, PartTile, row, q_block, sparse_nq, sparse_nk, bb, c,
                                            stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                            seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                                            BLOCK_M, BLOCK_N, BLOCK_SQ, BLOCK_SK, ELEM_TILE, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI,
                                            EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)
    elif HAS_LEFT:
        # -- sliding window: one pipelined loop over the visible tiles [a, d); only tiles outside the
        # fully visible band [bb, c) pay for the mask. Per-phase loops would each drain the software
        # pipeline, which for a window's ~16 tiles per row costs more than a uniform branch per tile
        # (H200, S=16k, window 1024: 322 -> 353 TFLOP/s); for plain causal the split below is as fast. --
        for start_n in range(a, d, BLOCK_N):
            acc, acc2, l_i, m_i = _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, k_ptrs, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                      start_n, (start_n < bb) | (start_n >= c), stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2,
                                      seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                                      2, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV,
                                      DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)
    else:
        # -- an unmasked body, then the masked tail (causal diagonal, sequence end) --
        acc, acc2, l_i, m_i = _fwd_tiles(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                   bb, c, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k,
                                   head_dim, head_dim_v, window_left, window_right,
                                   BLOCK_N, 0, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)
        acc, acc2, l_i, m_i = _fwd_tiles(acc, acc2, l_i, m_i, q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, offs_d2, offs_dv2, am_ptrs, stride_amn, drop_keys, drop_thr, offs_m, offs_n, offs_d, offs_dv,
                                   c, d, stride_ks, stride_vs, qk_scale, softcap_pre, softcap_post, alibi_log2, seqlen_q, seqlen_k,
                                   head_dim, head_dim_v, window_left, window_right,
                                   BLOCK_N, 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PRECISION, ATTN_MASK, DROPOUT, BLOCK_D2, BLOCK_DV2, EVEN_D2, EVEN_DV2, MAX_MODE)

    # -- epilogue: normalise; a row that saw no key gives out 0 and lse -inf --
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if DROPOUT:
        acc = acc * drop_scale  # 1 / (1 - p)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)

    lse_ptrs = Lse + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_rows
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    store_rows(o_base, q_rows, stride_os, offs_dv, acc, offs_m < seqlen_q, head_dim_v, EVEN_DV)
    if BLOCK_DV2 > 0:
        acc2 = acc2 / l_safe[:, None]
        if DROPOUT:
            acc2 = acc2 * drop_scale
        store_rows(o_base, q_rows, stride_os, offs_dv2, acc2, offs_m < seqlen_q, head_dim_v, EVEN_DV2)
