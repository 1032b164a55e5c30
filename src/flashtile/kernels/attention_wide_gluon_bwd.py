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
PARK: past 512 columns the slice's second register tile waits in shared memory while S is computed.
Causal: key j is visible to query i iff j <= i + Sk - Sq; only walk tiles that hold such pairs or rows
past the sequence end pay for the mask. Features the kernel lacks stay on attention_wide.py
(wide_gluon_launch.gluon_features).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from flashtile.kernels.attention_wide_gluon import _issue_v

LOG2E = gl.constexpr(1.4426950408889634)
DV_MODE = gl.constexpr(0)
DK_MODE = gl.constexpr(1)
DQ_MODE = gl.constexpr(2)


@gluon.jit
def _issue(c, x1_desc, y1_desc, x2_desc, y2_desc, z_desc, ring, x_ring, ready, b, x0, x1_col, x2_col, y1_col, y2_col,
           z_col, t_lo, n_t, total, NK1: gl.constexpr, NK2: gl.constexpr, NV: gl.constexpr, NVB: gl.constexpr,
           BN: gl.constexpr, KC: gl.constexpr, VK: gl.constexpr, VKB: gl.constexpr, DVA: gl.constexpr,
           STAGES: gl.constexpr, DQK: gl.constexpr, DV: gl.constexpr, DZ: gl.constexpr):
    """Start the TMA load of chunk c of the stream into ring stage c % STAGES (predicated off past
    `total`). Per walk step w = g * n_t + (t - t_lo) (query head g of the group, walk tile t): NK1
    chunks of X1 / Y1, NK2 of X2 / Y2, NV of Z [VK, DVA], NVB of Z [VKB, DVB]. As in the forward, c's
    place is computed at run time, so no per-chunk coordinate lives in a register across the walk."""
    PER: gl.constexpr = NK1 + NK2 + NV + NVB
    s = c % STAGES
    w = c // PER
    i = c - w * PER
    g = w // gl.maximum(n_t, 1)
    y0 = (t_lo + w - g * n_t) * BN
    bar = ready.index(s)
    do = c < total
    VBOX: gl.constexpr = BN // 8  # rows of a Z box [VBOX, 64]: the launcher's Z descriptor
    zbuf = ring.index(s)._reinterpret(z_desc.dtype, [8, 1, VBOX, 64], z_desc.layout)
    if i < NK1:  # X1's chunk travels with Y1's
        mbarrier.expect(bar, y1_desc.block_type.nbytes + x1_desc.block_type.nbytes, pred=do)
        tma.async_copy_global_to_shared(x1_desc, [b, x0, x1_col + i * KC], bar, x_ring.index(s), pred=do)
        tma.async_copy_global_to_shared(y1_desc, [b, y0, y1_col + g * DQK + i * KC], bar, ring.index(s), pred=do)
    elif i < NK1 + NK2:
        mbarrier.expect(bar, y2_desc.block_type.nbytes + x2_desc.block_type.nbytes, pred=do)
        tma.async_copy_global_to_shared(x2_desc, [b, x0, x2_col + (i - NK1) * KC], bar, x_ring.index(s), pred=do)
        tma.async_copy_global_to_shared(y2_desc, [b, y0, y2_col + g * DV + (i - NK1) * KC], bar, ring.index(s),
                                        pred=do)
    elif i < NK1 + NK2 + NV:  # Z [VK, DVA]: the slice's first register tile
        _issue_v(z_desc, zbuf, bar, b, y0 + (i - NK1 - NK2) * VK, z_col + g * DZ, do, VK, VBOX)
    else:  # Z [VKB, DVB]: the second tile's columns
        _issue_v(z_desc, zbuf, bar, b, y0 + (i - NK1 - NK2 - NV) * VKB, z_col + g * DZ + DVA, do, VKB, VBOX)


@gluon.jit
def _reduce(acc, c, NCH, x1_desc, y1_desc, x2_desc, y2_desc, z_desc, ring, x_ring, ready, b, x0, x1_col, x2_col,
            y1_col, y2_col, z_col, t_lo, n_t, total, NK1: gl.constexpr, NK2: gl.constexpr, NV: gl.constexpr,
            NVB: gl.constexpr, BN: gl.constexpr, KC: gl.constexpr, VK: gl.constexpr, VKB: gl.constexpr,
            DVA: gl.constexpr, STAGES: gl.constexpr, DQK: gl.constexpr, DV: gl.constexpr, DZ: gl.constexpr,
            BM: gl.constexpr):
    """acc [BM, BN] += the next NCH chunk pairs of the ring (X chunk times Y chunk transposed); after
    each wgmma is issued the previous one is done in this warpgroup, and the thread barrier makes its
    stage free in both before it is refilled. Returns (acc, c)."""
    for kc in range(NCH):
        st = c % STAGES
        mbarrier.wait(ready.index(st), (c // STAGES) & 1)
        x_chunk = x_ring.index(st).reshape([BM, KC])
        y_chunk = ring.index(st).reshape([BN, KC])
        acc = warpgroup_mma(x_chunk, y_chunk.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        gl.thread_barrier()
        _issue(c + STAGES - 1, x1_desc, y1_desc, x2_desc, y2_desc, z_desc, ring, x_ring, ready, b, x0, x1_col, x2_col,
               y1_col, y2_col, z_col, t_lo, n_t, total, NK1, NK2, NV, NVB, BN, KC, VK, VKB, DVA, STAGES, DQK, DV, DZ)
        c += 1
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    return acc, c


@gluon.jit
def _store_grad(acc, scale, dx_base, stride_xs, x0, col0, rows_len, DZ: gl.constexpr, BM: gl.constexpr,
                W: gl.constexpr, layout: gl.constexpr):
    """dX[x0 : x0 + BM, col0 : col0 + W] = acc * scale (rows below rows_len, columns below DZ)."""
    rows = x0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, W, layout=gl.SliceLayout(0, layout))
    ptrs = dx_base + gl.expand_dims(rows.to(gl.int64) * stride_xs, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, (acc * scale).to(dx_base.dtype.element_ty),
             mask=(gl.expand_dims(rows, 1) < rows_len) & (gl.expand_dims(cols, 0) < DZ))


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
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BN // 2, 16])
    # the slice as two register tiles when DZP is not a power of two (the forward's DVA / DVB)
    DVA: gl.constexpr = 512 if DZP >= 512 else (256 if DZP >= 256 else (128 if DZP >= 128 else 64))
    DVB: gl.constexpr = DZP - DVA
    VK: gl.constexpr = BN * KC // DVA
    NV: gl.constexpr = BN // VK
    VKB: gl.constexpr = BN * KC // max(DVB, 64)
    NVB: gl.constexpr = BN // VKB if DVB > 0 else 0
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, DVA // 2, 16])
    ob_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, max(DVB, 16) // 2, 16])
    z_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    t_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(64, 2 * VK), element_bitwidth=16, rank=2)

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
    PER: gl.constexpr = NK1 + NK2 + NV + NVB
    total = n_walk * PER

    ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BN, KC], y1_desc.layout)
    x_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BM, KC], x1_desc.layout)
    t_smem = gl.allocate_shared_memory(dtype, [BM, BN], t_layout)
    t_blocks = t_smem._reinterpret(dtype, [NV, BM, VK], t_layout)
    t_blocks_b = t_smem._reinterpret(dtype, [max(NVB, 1), BM, VKB], t_layout)
    if PARK:
        park_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        park = gl.allocate_shared_memory(gl.float32, [BM, DVB], park_layout)
        park.store(gl.zeros([BM, DVB], gl.float32, ob_layout))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)

    for c in gl.static_range(STAGES - 1):  # prologue: STAGES - 1 chunks in flight
        _issue(c, x1_desc, y1_desc, x2_desc, y2_desc, z_desc, ring, x_ring, ready, b, x0, x1_col, x2_col, y1_col,
               y2_col, z_col, t_lo, n_t, total, NK1, NK2, NV, NVB, BN, KC, VK, VKB, DVA, STAGES, DQK, DV, DZ)

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
            acc_b = gl.zeros([BM, DVB], gl.float32, ob_layout)
    c = 0
    for w in range(n_walk):
        g = w // n_t
        t = t_lo + w - g * n_t
        cols = t * BN + cols0
        # -- R1 = S (or S^T), NK1 chunks over Dqk --
        s_acc, c = _reduce(gl.zeros([BM, BN], gl.float32, s_layout), c, NK1, x1_desc, y1_desc, x2_desc, y2_desc,
                           z_desc, ring, x_ring, ready, b, x0, x1_col, x2_col, y1_col, y2_col, z_col, t_lo, n_t,
                           total, NK1, NK2, NV, NVB, BN, KC, VK, VKB, DVA, STAGES, DQK, DV, DZ, BM)

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
            dp, c = _reduce(gl.zeros([BM, BN], gl.float32, s_layout), c, NK2, x1_desc, y1_desc, x2_desc, y2_desc,
                            z_desc, ring, x_ring, ready, b, x0, x1_col, x2_col, y1_col, y2_col, z_col, t_lo, n_t,
                            total, NK1, NK2, NV, NVB, BN, KC, VK, VKB, DVA, STAGES, DQK, DV, DZ, BM)
            if TRANS:
                delta = gl.expand_dims(gl.load(Delta + stats, mask=col_ok, other=0.0), 0)
            else:
                delta = delta_row
            p = t_smem.load(s_layout).to(gl.float32)  # each thread reads back what it stored
            t_smem.store((p * (dp - delta)).to(dtype))
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of T are in shared memory

        # -- acc += T Z: NV chunks of Z [VK, DVA] into acc, then NVB of Z [VKB, DVB] into acc_b --
        for j in range(NV):
            st = c % STAGES
            mbarrier.wait(ready.index(st), (c // STAGES) & 1)
            z_chunk = ring.index(st)._reinterpret(dtype, [VK, DVA], z_layout)
            acc = warpgroup_mma(t_blocks.index(j), z_chunk, acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            gl.thread_barrier()
            _issue(c + STAGES - 1, x1_desc, y1_desc, x2_desc, y2_desc, z_desc, ring, x_ring, ready, b, x0, x1_col,
                   x2_col, y1_col, y2_col, z_col, t_lo, n_t, total, NK1, NK2, NV, NVB, BN, KC, VK, VKB, DVA, STAGES,
                   DQK, DV, DZ)
            c += 1
        if DVB > 0:
            if PARK:
                acc_x = park.load(ob_layout)
            else:
                acc_x = acc_b
            for j in range(NVB):
                st = c % STAGES
                mbarrier.wait(ready.index(st), (c // STAGES) & 1)
                z_chunk = ring.index(st)._reinterpret(dtype, [VKB, DVB], z_layout)
                acc_x = warpgroup_mma(t_blocks_b.index(j), z_chunk, acc_x, is_async=True)
                acc, acc_x = warpgroup_mma_wait(1, deps=(acc, acc_x))
                gl.thread_barrier()
                _issue(c + STAGES - 1, x1_desc, y1_desc, x2_desc, y2_desc, z_desc, ring, x_ring, ready, b, x0, x1_col,
                       x2_col, y1_col, y2_col, z_col, t_lo, n_t, total, NK1, NK2, NV, NVB, BN, KC, VK, VKB, DVA,
                       STAGES, DQK, DV, DZ)
                c += 1
            acc, acc_x = warpgroup_mma_wait(0, deps=(acc, acc_x))
            if PARK:
                park.store(acc_x)  # read back after the barrier below
            else:
                acc_b = acc_x
        else:
            acc = warpgroup_mma_wait(0, deps=(acc, ))
        gl.thread_barrier()  # the next walk tile rewrites t_smem

    # -- epilogue: the gradient slice, scaled (dK, dQ: softmax_scale) --
    dx_base = DX + b.to(gl.int64) * stride_xb + h_row.to(gl.int64) * stride_xh
    _store_grad(acc, out_scale, dx_base, stride_xs, x0, z_col0, rows_len, DZ, BM, DVA, o_layout)
    if DVB > 0:
        if PARK:
            acc_b = park.load(ob_layout)
        _store_grad(acc_b, out_scale, dx_base, stride_xs, x0, z_col0 + DVA, rows_len, DZ, BM, DVB, ob_layout)
