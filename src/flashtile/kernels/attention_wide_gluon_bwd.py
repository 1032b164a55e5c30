"""Wide-head backward in Gluon (sm_90): dV, dK or dQ of one head-dim slice, S and dP shared by two warpgroups.

The split-D Triton backward (attention_wide.py) holds at most a [64, 512] slice of a gradient per
program and splits S / dP over one warpgroup's tiles; at D = 512 its three kernels execute 8 S x S x D
products for the 5 a backward needs, at 240-270 TFLOP/s (docs/perf_notes.md, session 31). This kernel
is the Gluon forward's tiling (attention_wide_gluon.py) applied to each gradient: a program owns 64
rows of one gradient and walks 256-row tiles of the other side, and per walk tile

  reduce  R1 = X1 Y1^T [64, 256] over Dqk (S, or S^T), two warpgroups of 128 columns each;
          R2 = X2 Y2^T [64, 256] over Dv (dP, or dP^T; dK and dQ only);
  combine T = P (dV) or dS = P * (dP - delta) (dK, dQ), P = exp2(S * qk_scale - lse2), into shared memory;
  produce acc [64, DZP] += T Z[walk tile, slice] (the gradient's slice, DZP / 2 columns a warpgroup).

      MODE  owner rows   X1  Y1  X2  Y2  Z    walk                     lse / delta
  dV   0    key tile     K   Q   -   -   dO   query tiles of each      per column (query)
  dK   1    key tile     K   Q   V   dO  Q    query head of the group  per column
  dQ   2    query tile   Q   K   dO  V   K    key tiles                per row

All operands stream through one ring of 32 KB TMA stages in the order the products consume them (a
walk tile's X / Y chunks [64, KC] + [256, KC], then Z chunks [VK, DVA] and [VKB, DVB] as in the
forward), so shared memory does not depend on the head dims. Nothing is S x S, nothing is atomic: the
GQA group's query heads are summed in registers (dK, dV), and dQ recomputes S and dP (FlashAttention-2's
deterministic split). A gradient wider than a slice runs more programs, each recomputing R1 (and R2).
PARK: past 512 columns the slice's further register tiles wait in shared memory while S is computed.
Causal: key j is visible to query i iff j <= i + Sk - Sq; only walk tiles that hold such pairs or rows
past the sequence end pay for the mask. Features the kernel lacks stay on attention_wide.py
(wide_gluon_launch.gluon_features).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared

from flashtile.kernels.attention_wide_gluon import (_issue, produce_chunks, reduce_chunks, slice_tiles, split_layout,
                                                     store_slice, stream_buffers)

LOG2E = gl.constexpr(1.4426950408889634)
DV_MODE = gl.constexpr(0)
DK_MODE = gl.constexpr(1)
DQ_MODE = gl.constexpr(2)


@gluon.jit
def _lse2(ptrs, ok):
    """lse at ptrs in the log2 domain; a row that saw no key (lse = -inf) gets +inf, so p = 0."""
    lse = gl.load(ptrs, mask=ok, other=0.0)
    return gl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@gluon.jit
def wide_bwd_gluon_kernel(x1_desc, y1_desc, x2_desc, y2_desc, z_desc, DX, Lse, Delta,
                          stride_xb, stride_xs, stride_xh, stride_lse_b, stride_lse_h,
                          seqlen_q, seqlen_k, heads_q, group_size, qk_scale, out_scale, n_pass, z_col_base,
                          MODE: gl.constexpr, DQK: gl.constexpr, DV: gl.constexpr, DZP: gl.constexpr,
                          BM: gl.constexpr, BN: gl.constexpr, KC: gl.constexpr, STAGES: gl.constexpr,
                          CAUSAL: gl.constexpr, PARK: gl.constexpr):
    """One gradient slice (module doc's table). Descriptors over [B, S, H * D] views: x*_desc boxes
    [1, BM, KC], y*_desc [1, BN, KC], z_desc [1, BN // 8, 64] (dV: X2 / Y2 unused, pass X1 / Y1).
    DX [B, rows, H_rows, DZ] (DZ = DV for dV, else DQK; pointer stores), Lse / Delta fp32 [B, Hq, Sq]
    (natural log; delta = rowsum(dO * O)). qk_scale = softmax_scale * log2(e); out_scale multiplies the
    gradient (softmax_scale for dK / dQ, 1 for dV). Grid: (n_pass * ceil(rows / BM) * B * H_rows,),
    slices fastest: slice p owns columns z_col_base + p * DZP + [0, DZP) below DZ."""
    dtype: gl.constexpr = x1_desc.dtype
    TRANS: gl.constexpr = MODE != DQ_MODE  # the program owns keys, walks queries: S^T, stats per column
    DZ: gl.constexpr = DV if MODE == DV_MODE else DQK
    NK1: gl.constexpr = DQK // KC
    NK2: gl.constexpr = 0 if MODE == DV_MODE else DV // KC
    s_layout: gl.constexpr = split_layout(BN)
    # the slice as register tiles of powers of two, fed by NZ Z chunks [VKA, DVA], [VKB, DVB], ..
    # (attention_wide_gluon.slice_tiles)
    DVA: gl.constexpr = slice_tiles(DZP, BN, KC, "DVA")
    DVB: gl.constexpr = slice_tiles(DZP, BN, KC, "DVB")
    NZ: gl.constexpr = slice_tiles(DZP, BN, KC, "NZ")
    o_layout: gl.constexpr = split_layout(DVA)

    # -- which rows this program owns and which tiles it walks --
    off = seqlen_k - seqlen_q  # causal: key j visible to query i iff j <= i + off
    rows_len = seqlen_k if TRANS else seqlen_q
    n_m = gl.cdiv(rows_len, BM)
    pid = gl.program_id(0)
    zpass = pid % n_pass
    tile = (pid // n_pass) % n_m
    bh = pid // (n_pass * n_m)
    z_col0 = z_col_base + zpass * DZP
    if TRANS:
        heads_kv = heads_q // group_size
        b = bh // heads_kv
        h_row = bh % heads_kv
        hq0 = h_row * group_size  # first query head of the group
        x0 = tile * BM
        x1_col = h_row * DQK  # K
        x2_col = h_row * DV  # V
        y1_col = hq0 * DQK  # Q of query head hq0 (+ g * DQK)
        y2_col = hq0 * DV  # dO
        z_col = hq0 * DZ + z_col0  # dO (dV) or Q (dK)
        n_walk_heads = group_size
        t_lo = 0
        if CAUSAL:  # queries below x0 - off see none of these keys
            t_lo = gl.maximum(x0 - off, 0) // BN
        n_t = gl.maximum(gl.cdiv(seqlen_q, BN) - t_lo, 0)
    else:
        b = bh // heads_q
        h_row = bh % heads_q
        hq0 = h_row
        if CAUSAL:  # the longest walks first
            tile = n_m - 1 - tile
        x0 = tile * BM
        h_kv = h_row // group_size
        x1_col = h_row * DQK  # Q
        x2_col = h_row * DV  # dO
        y1_col = h_kv * DQK  # K
        y2_col = h_kv * DV  # V
        z_col = h_kv * DQK + z_col0  # K
        n_walk_heads = 1
        t_lo = 0
        hi = seqlen_k
        if CAUSAL:
            hi = gl.maximum(gl.minimum(seqlen_k, x0 + BM + off), 0)
        n_t = gl.cdiv(hi, BN)
    n_walk = n_t * n_walk_heads
    descs = (x1_desc, y1_desc, x2_desc, y2_desc, z_desc)
    coords = (b, x0, x1_col, x2_col, y1_col, y2_col, z_col, t_lo, n_t, n_walk * (NK1 + NK2 + NZ))
    # the column steps from one query head of the group to the next (a group walk only where TRANS)
    DY1: gl.constexpr = DQK if TRANS else 0
    DY2: gl.constexpr = DV if TRANS else 0
    DZS: gl.constexpr = DZ if TRANS else 0

    ring, x_ring, t_smem, parks, ready = stream_buffers(x1_desc, y1_desc, PARK, DZP, BM, BN, KC, STAGES)

    for c in gl.static_range(STAGES - 1):  # prologue: STAGES - 1 chunks in flight
        _issue(c, descs, coords, ring, x_ring, ready, NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZS)

    rows = x0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    cols0 = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    stats_bh = b.to(gl.int64) * stride_lse_b
    if not TRANS:  # this program's query rows' lse and delta, once
        row_ok = rows < seqlen_q
        lse2_row = gl.expand_dims(_lse2(Lse + stats_bh + h_row.to(gl.int64) * stride_lse_h + rows, row_ok), 1)
        delta_row = gl.expand_dims(gl.load(Delta + stats_bh + h_row.to(gl.int64) * stride_lse_h + rows, mask=row_ok,
                                           other=0.0), 1)
    acc = gl.zeros([BM, DVA], gl.float32, o_layout)
    if DVB > 0:
        if not PARK:
            acc_b = gl.zeros([BM, DVB], gl.float32, split_layout(DVB))
    c = 0
    for w in range(n_walk):
        g = w // n_t
        t = t_lo + w - g * n_t
        cols = t * BN + cols0
        # -- R1 = S (or S^T), NK1 chunks over Dqk --
        s_acc, c = reduce_chunks(gl.zeros([BM, BN], gl.float32, s_layout), c, NK1, descs, coords, ring, x_ring, ready,
                                 NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZS, BM)

        # -- P = exp2(S * qk_scale - lse2); pairs past the sequence ends or (causal) invisible are
        # -inf before the exp (only the walk tiles that hold such pairs pay for the mask) --
        if TRANS:
            col_ok = cols < seqlen_q
            stats = stats_bh + (hq0 + g).to(gl.int64) * stride_lse_h + cols
            lse2 = gl.expand_dims(_lse2(Lse + stats, col_ok), 0)
            edge = (t + 1) * BN > seqlen_q
            if CAUSAL:
                edge = edge | (t * BN + off < x0 + BM - 1)
            if edge:
                ok = gl.expand_dims(col_ok, 0)
                if CAUSAL:
                    ok = ok & (gl.expand_dims(rows, 1) <= gl.expand_dims(cols, 0) + off)
                s_acc = gl.where(ok, s_acc, float("-inf"))
        else:
            lse2 = lse2_row
            edge = (t + 1) * BN > seqlen_k
            if CAUSAL:
                edge = edge | ((t + 1) * BN > x0 + 1 + off)
            if edge:
                ok = gl.expand_dims(cols, 0) < seqlen_k
                if CAUSAL:
                    ok = ok & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1) + off)
                s_acc = gl.where(ok, s_acc, float("-inf"))
        p = gl.exp2(s_acc * qk_scale - lse2)
        t_smem.store(p.to(dtype))

        if MODE != DV_MODE:
            # -- R2 = dP (or dP^T), NK2 chunks over Dv; then dS = P * (dP - delta) replaces P --
            dp, c = reduce_chunks(gl.zeros([BM, BN], gl.float32, s_layout), c, NK2, descs, coords, ring, x_ring, ready,
                                  NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZS, BM)
            if TRANS:
                delta = gl.expand_dims(gl.load(Delta + stats, mask=col_ok, other=0.0), 0)
            else:
                delta = delta_row
            p = t_smem.load(s_layout).to(gl.float32)  # each thread reads back what it stored
            t_smem.store((p * (dp - delta)).to(dtype))
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of T are in shared memory

        # -- acc += T Z: NVA chunks of Z [VKA, DVA] into acc, then those of the further tiles --
        if DVB > 0 and not PARK:
            acc, acc_b, c = produce_chunks(acc, acc_b, parks, rows, t_smem, c, descs, coords, ring, x_ring, ready,
                                           False, PARK, NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZS, BM)
        else:  # no second tile in registers (acc stands in for it)
            acc, _, c = produce_chunks(acc, acc, parks, rows, t_smem, c, descs, coords, ring, x_ring, ready, False,
                                       PARK, NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZS, BM)
        gl.thread_barrier()  # the next walk tile rewrites t_smem (and reloads the parked tiles)

    # -- epilogue: the gradient slice, scaled (dK, dQ: softmax_scale) --
    dx_base = DX + b.to(gl.int64) * stride_xb + h_row.to(gl.int64) * stride_xh
    scale = gl.full([BM], out_scale, gl.float32, gl.SliceLayout(1, s_layout))
    if DVB > 0 and not PARK:
        store_slice(acc, acc_b, parks, scale, dx_base, stride_xs, x0, z_col0, rows_len, DZ, PARK, DZP, BN, KC, BM)
    else:
        store_slice(acc, acc, parks, scale, dx_base, stride_xs, x0, z_col0, rows_len, DZ, PARK, DZP, BN, KC, BM)
