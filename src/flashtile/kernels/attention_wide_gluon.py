"""Wide-head forward in Gluon (sm_90): one S shared by two warpgroups, so Dv <= 768 never recomputes S.

The split-D Triton forward (attention_wide.py) keeps a program's O slice in one warpgroup's registers,
which holds at most 256 columns next to S: a 512-wide head runs two slices, each recomputing S (3
S x S x D products where 2 are needed). Triton cannot split one S over two warpgroups the way needed
here (it gave 64x16 wgmmas and spills, docs/perf_notes.md session 31). Gluon lays it out by hand:

- a program owns 64 query rows and runs 8 warps = 2 warpgroups;
- S = Q K^T [64, BN] is one wgmma over both warpgroups (each takes BN / 2 keys, warps_per_cta [4, 2]),
  its K-loop over KC-column chunks of Q and K;
- P goes through shared memory, so O = P V [64, DVP] is one wgmma over both warpgroups as well, each
  owning DVP / 2 columns of O: DVP / 4 fp32 registers a thread, 128 at DVP = 512. Register
  tensors are powers of two, so a DVP that is not one is held as two tiles, DVA (the largest power of
  two below it) + DVB (320 = 256 + 64, 576 = 512 + 64, 768 = 512 + 256), each fed by its own V chunks;
- past 512 columns (PARK) the second tile waits in shared memory while S is computed, so S's 64
  registers a thread fit beside acc's 128 (held in registers, 576 / 640 / 768 spilled 40 / 264 /
  1300 bytes a thread);
- Q chunks [BM, KC] with K chunks [BN, KC], then V chunks [VK, DVA] and [VKB, DVB], stream through
  one ring of TMA stages of 32 KB (Q's travel beside K's), in the order the products consume them
  (keeping Q resident in shared memory at D <= 512 measured no faster, docs/perf_notes.md session 37);
- the loops over chunks are not unrolled, so no per-chunk coordinate or address lives in a register
  across the key loop (unrolled, they spilled: _issue);
- only the key tiles that hold keys past Sk or past the causal diagonal pay for the mask.
O widths above 768 run more programs per query tile, one O slice each (the launcher picks DVP and
v_col_base per launch, wide_gluon_launch.o_slices), each recomputing S. The launcher
(wide_gluon_launch.gluon_forward) takes this kernel only where dispatch.gluon_forward_heads says so;
the features it lacks (softcap, ALiBi, windows, dropout, attn_mask, varlen) stay on attention_wide.py.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

LN2 = gl.constexpr(0.6931471805599453)
BLOCK_M = 64  # query rows a program: one wgmma row tile, shared by both warpgroups
CHUNK = 64  # columns of a Q / K chunk, and of each TMA box of V (one 128-byte swizzle row of 16-bit data)


@gluon.jit
def _issue(c, q_desc, k_desc, v_desc, ring, q_ring, ready, b, q0, qh_col, kh_col, vh_col, total,
           NK: gl.constexpr, NV: gl.constexpr, NVB: gl.constexpr, BN: gl.constexpr, KC: gl.constexpr,
           VK: gl.constexpr, VKB: gl.constexpr, DVA: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA load of chunk c of the stream (per key tile: NK chunks of Q and K, NV chunks of
    V [VK, DVA], NVB chunks of V [VKB, DVB]) into ring stage c % STAGES; chunks past the walk's end
    (c >= total) are predicated off. c's place in its key tile is computed at run time: with it a
    compile-time constant (unrolled loops), the compiler hoisted a register per chunk's coordinates
    and smem address out of the key loop and spilled them (Dqk = 640 / 1024 ran 139 / 153 TFLOP/s,
    docs/perf_notes.md session 37)."""
    s = c % STAGES
    t = c // (NK + NV + NVB)
    i = c - t * (NK + NV + NVB)
    bar = ready.index(s)
    do = c < total
    # a V chunk is 8 TMA boxes [VBOX, 64] (32 KB, a stage), placed as the [rows, width] tile the MMA
    # reads: 64-column blocks one after another, each its rows top to bottom
    VBOX: gl.constexpr = BN // 8  # rows of a box [VBOX, 64]: the launcher's V descriptor
    vbuf = ring.index(s)._reinterpret(v_desc.dtype, [8, 1, VBOX, 64], v_desc.layout)
    if i < NK:  # Q's chunk travels with K's
        mbarrier.expect(bar, k_desc.block_type.nbytes + q_desc.block_type.nbytes, pred=do)
        tma.async_copy_global_to_shared(q_desc, [b, q0, qh_col + i * KC], bar, q_ring.index(s), pred=do)
        tma.async_copy_global_to_shared(k_desc, [b, t * BN, kh_col + i * KC], bar, ring.index(s), pred=do)
    elif i < NK + NV:  # V [VK, DVA]: O's first register tile
        _issue_v(v_desc, vbuf, bar, b, t * BN + (i - NK) * VK, vh_col, do, VK, VBOX)
    else:  # V [VKB, DVB]: the second tile's columns
        _issue_v(v_desc, vbuf, bar, b, t * BN + (i - NK - NV) * VKB, vh_col + DVA, do, VKB, VBOX)


@gluon.jit
def _issue_v(v_desc, vbuf, bar, b, row0, col0, do, ROWS: gl.constexpr, VBOX: gl.constexpr):
    """The TMA load of V [row0 : row0 + ROWS, col0 : col0 + 8 * VBOX * 64 / ROWS] as 8 boxes [VBOX, 64]
    into vbuf, box jj at column block jj // (ROWS / VBOX), row block jj % (ROWS / VBOX)."""
    mbarrier.expect(bar, 8 * v_desc.block_type.nbytes, pred=do)
    for jj in gl.static_range(8):
        row = row0 + (jj % (ROWS // VBOX)) * VBOX
        col = col0 + (jj // (ROWS // VBOX)) * 64
        tma.async_copy_global_to_shared(v_desc, [b, row, col], bar, vbuf.index(jj), pred=do)


@gluon.jit
def _store_o(acc, l_safe, out_base, stride_os, q0, col0, seqlen_q, DV: gl.constexpr, BM: gl.constexpr,
             W: gl.constexpr, layout: gl.constexpr):
    """Out[q0 : q0 + BM, col0 : col0 + W] = acc / l (rows below seqlen_q, columns below DV)."""
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, layout)), 1)
    o_rows = q0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    o_cols = col0 + gl.arange(0, W, layout=gl.SliceLayout(0, layout))
    o_ptrs = out_base + gl.expand_dims(o_rows.to(gl.int64) * stride_os, 1) + gl.expand_dims(o_cols, 0)
    gl.store(o_ptrs, out.to(out_base.dtype.element_ty),
             mask=(gl.expand_dims(o_rows, 1) < seqlen_q) & (gl.expand_dims(o_cols, 0) < DV))


@gluon.jit
def wide_fwd_gluon_kernel(q_desc, k_desc, v_desc, Out, Lse, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
                          seqlen_q, seqlen_k, heads_q, group_size, qk_scale, n_pass, v_col_base,
                          DQK: gl.constexpr, DV: gl.constexpr, DVP: gl.constexpr, BM: gl.constexpr,
                          BN: gl.constexpr, KC: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                          PARK: gl.constexpr):
    """q_desc / k_desc: [B, S, H * DQK] boxes [1, rows, KC]; v_desc: [B, Sk, Hkv * DV] boxes [1, BN // 8, 64]
    -> Out [B, Sq, Hq, DV] (pointer stores), Lse fp32 [B, Hq, Sq] (natural log; -inf for a row that
    sees no key). qk_scale = softmax_scale * log2(e). CAUSAL: key j is visible to query i iff
    j <= i + Sk - Sq. Grid: (n_pass * ceil(Sq / BM) * B * Hq,), O slices fastest: program slice p owns
    O columns v_col_base + p * DVP + [0, DVP) below DV; the slice at column 0 writes Lse. PARK: keep
    O's second register tile (DVP - DVA columns) in shared memory between key tiles."""
    dtype: gl.constexpr = q_desc.dtype
    NK: gl.constexpr = DQK // KC
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BN // 2, 16])
    # O [64, DVP] as two register tiles when DVP is not a power of two (register tensors are):
    # DVA = the largest power of two <= DVP (at most 512), DVB = the rest (320 = 256 + 64, 576 = 512 + 64)
    DVA: gl.constexpr = 512 if DVP >= 512 else (256 if DVP >= 256 else (128 if DVP >= 128 else 64))
    DVB: gl.constexpr = DVP - DVA
    # V streams as chunks that fill a stage: NV of [VK, DVA], then NVB of [VKB, DVB]
    VK: gl.constexpr = BN * KC // DVA
    NV: gl.constexpr = BN // VK
    VKB: gl.constexpr = BN * KC // max(DVB, 64)
    NVB: gl.constexpr = BN // VKB if DVB > 0 else 0
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, DVA // 2, 16])
    # the second tile's layout (unused, but still a valid layout, when DVB == 0)
    ob_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, max(DVB, 16) // 2, 16])
    v_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # the PV loop reads P in VK-column slices (VK = 32 at BN = 256 and DVA = 512): a swizzle of at most
    # VK columns (64 bytes; 32 at VK = 16) stores them as whole blocks one after another
    p_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(64, 2 * VK), element_bitwidth=16, rank=2)

    n_m = gl.cdiv(seqlen_q, BM)
    pid = gl.program_id(0)
    vpass = pid % n_pass
    tile = (pid // n_pass) % n_m
    bh = pid // (n_pass * n_m)
    if CAUSAL:  # the longest walks first
        tile = n_m - 1 - tile
    b = bh // heads_q
    h = bh % heads_q
    h_kv = h // group_size
    q0 = tile * BM
    v_col0 = v_col_base + vpass * DVP

    ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BN, KC], k_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BM, KC], q_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [BM, BN], p_layout)
    # the same bytes as NV column blocks [BM, VK] (a 64-byte swizzle stores VK = 32 columns a block)
    p_blocks = p_smem._reinterpret(dtype, [NV, BM, VK], p_layout)
    p_blocks_b = p_smem._reinterpret(dtype, [max(NVB, 1), BM, VKB], p_layout)
    if PARK:  # acc_b waits in shared memory while S is computed: registers for S beside acc
        park_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        park = gl.allocate_shared_memory(gl.float32, [BM, DVB], park_layout)
        park.store(gl.zeros([BM, DVB], gl.float32, ob_layout))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)

    # keys [0, hi): a causal row sees keys up to its own index + Sk - Sq
    hi = seqlen_k
    if CAUSAL:
        hi = gl.maximum(gl.minimum(seqlen_k, q0 + BM + seqlen_k - seqlen_q), 0)
    n_tiles = gl.cdiv(hi, BN)
    total = n_tiles * (NK + NV + NVB)
    qh_col = h * DQK
    kh_col = h_kv * DQK
    vh_col = h_kv * DV + v_col0

    for c in gl.static_range(STAGES - 1):  # prologue: STAGES - 1 chunks in flight
        _issue(c, q_desc, k_desc, v_desc, ring, q_smem, ready, b, q0, qh_col, kh_col, vh_col, total,
               NK, NV, NVB, BN, KC, VK, VKB, DVA, STAGES)

    m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BM, DVA], gl.float32, o_layout)
    if DVB > 0:
        if not PARK:
            acc_b = gl.zeros([BM, DVB], gl.float32, ob_layout)
    rows = q0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    cols0 = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    c = 0
    for t in range(n_tiles):
        # -- S = Q K^T, NK chunks; after each wgmma is issued the previous one is done in this
        # warpgroup, and the thread barrier makes its stage free in both before it is refilled --
        s_acc = gl.zeros([BM, BN], gl.float32, s_layout)
        for kc in range(NK):
            st = c % STAGES
            mbarrier.wait(ready.index(st), (c // STAGES) & 1)
            q_chunk = q_smem.index(st).reshape([BM, KC])
            k_chunk = ring.index(st).reshape([BN, KC])
            s_acc = warpgroup_mma(q_chunk, k_chunk.permute((1, 0)), s_acc, is_async=True)
            s_acc = warpgroup_mma_wait(1, deps=(s_acc, ))
            gl.thread_barrier()
            _issue(c + STAGES - 1, q_desc, k_desc, v_desc, ring, q_smem, ready, b, q0,
                   qh_col, kh_col, vh_col, total, NK, NV, NVB, BN, KC, VK, VKB, DVA, STAGES)
            c += 1
        s_acc = warpgroup_mma_wait(0, deps=(s_acc, ))

        # -- online softmax in the log2 domain; keys past Sk (zero-filled by TMA) and, causal, past
        # the diagonal are -inf (only the tiles that have such keys pay for the mask); a row that has
        # seen no key keeps m = -inf and p = 0. The row max is taken over the raw scores (the scale
        # is positive, so it commutes with the max) and the scale folds into exp2's FMA --
        edge = (t + 1) * BN > seqlen_k
        if CAUSAL:
            edge = edge | ((t + 1) * BN > q0 + 1 + seqlen_k - seqlen_q)
        if edge:
            cols = t * BN + cols0
            ok = gl.expand_dims(cols, 0) < seqlen_k
            if CAUSAL:
                ok = ok & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1) + (seqlen_k - seqlen_q))
            s_acc = gl.where(ok, s_acc, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s_acc, axis=1) * qk_scale)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s_acc * qk_scale - gl.expand_dims(m_safe, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        p_smem.store(p.to(dtype))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of P are in shared memory

        # -- O += P V: NV chunks of V [VK, DVA] into acc, then NVB of V [VKB, DVB] into acc_b --
        for j in range(NV):
            st = c % STAGES
            mbarrier.wait(ready.index(st), (c // STAGES) & 1)
            v_chunk = ring.index(st)._reinterpret(dtype, [VK, DVA], v_layout)
            acc = warpgroup_mma(p_blocks.index(j), v_chunk, acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            gl.thread_barrier()
            _issue(c + STAGES - 1, q_desc, k_desc, v_desc, ring, q_smem, ready,
                   b, q0, qh_col, kh_col, vh_col, total, NK, NV, NVB, BN, KC, VK, VKB, DVA, STAGES)
            c += 1
        if DVB > 0:
            if PARK:
                acc_x = park.load(ob_layout)
            else:
                acc_x = acc_b
            acc_x = acc_x * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, ob_layout)), 1)
            for j in range(NVB):
                st = c % STAGES
                mbarrier.wait(ready.index(st), (c // STAGES) & 1)
                v_chunk = ring.index(st)._reinterpret(dtype, [VKB, DVB], v_layout)
                acc_x = warpgroup_mma(p_blocks_b.index(j), v_chunk, acc_x, is_async=True)
                acc, acc_x = warpgroup_mma_wait(1, deps=(acc, acc_x))
                gl.thread_barrier()
                _issue(c + STAGES - 1, q_desc, k_desc, v_desc, ring, q_smem, ready,
                       b, q0, qh_col, kh_col, vh_col, total, NK, NV, NVB, BN, KC, VK, VKB, DVA, STAGES)
                c += 1
            acc, acc_x = warpgroup_mma_wait(0, deps=(acc, acc_x))
            if PARK:
                park.store(acc_x)  # read back after the barrier below
            else:
                acc_b = acc_x
        else:
            acc = warpgroup_mma_wait(0, deps=(acc, ))
        gl.thread_barrier()  # the next tile rewrites p_smem

    # -- epilogue: normalise; a row that saw no key gives out 0 and lse -inf --
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    _store_o(acc, l_safe, out_base, stride_os, q0, v_col0, seqlen_q, DV, BM, DVA, o_layout)
    if DVB > 0:
        if PARK:
            acc_b = park.load(ob_layout)
        _store_o(acc_b, l_safe, out_base, stride_os, q0, v_col0 + DVA, seqlen_q, DV, BM, DVB, ob_layout)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    lse_ptrs = Lse + b.to(gl.int64) * stride_lse_b + h.to(gl.int64) * stride_lse_h + rows
    gl.store(lse_ptrs, lse, mask=(rows < seqlen_q) & (v_col0 == 0))
