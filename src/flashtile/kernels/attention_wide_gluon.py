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
  tensors are powers of two, so a DVP that is not one is held as tiles of powers of two, DVA (the
  largest below it, at most 512) + DVB (+ DVC + DVD) (320 = 256 + 64, 576 = 512 + 64, 768 = 512 +
  256, 832 = 512 + 256 + 64: slice_tiles), each fed by its own V chunks;
- past 512 columns (PARK) the further tiles wait in shared memory while S is computed, so S's 64
  registers a thread fit beside acc's 128 (a second tile held in registers, 576 / 640 / 768 spilled
  40 / 264 / 1300 bytes a thread);
- Q chunks [BM, KC] with K chunks [BN, KC], then V chunks [VK, DVA] and [VKB, DVB], stream through
  one ring of TMA stages of 32 KB (Q's travel beside K's), in the order the products consume them
  (keeping Q resident in shared memory at D <= 512 measured no faster, docs/perf_notes.md session 37);
- the loops over chunks are not unrolled, so no per-chunk coordinate or address lives in a register
  across the key loop (unrolled, they spilled: _issue);
- only the key tiles that hold keys past Sk or past the causal diagonal pay for the mask.
O widths above the widest slice (768, or 960 with wide_gluon_launch.PARKED_TILES = 3) run more
programs per query tile, one O slice each (the launcher picks DVP and v_col_base per launch,
wide_gluon_launch.o_slices), each recomputing S. The launcher
(wide_gluon_launch.gluon_forward) takes this kernel only where dispatch.gluon_forward_heads says so;
the features it lacks (softcap, ALiBi, windows, dropout, attn_mask, varlen) stay on attention_wide.py.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

LN2 = gl.constexpr(0.6931471805599453)
BLOCK_M = 64  # query rows a program: one wgmma row tile, shared by both warpgroups
CHUNK = 64  # columns of a TMA box of V (one 128-byte swizzle row of 16-bit data), and of a Q / K chunk
# (KC; wide_gluon_launch.ring_plan may stream 32-column chunks instead)


@gluon.constexpr_function
def slice_tiles(dzp, bn, kc, which, tile=""):
    """DVA, DVB, DVC, DVD (register tiles' widths), VK.. / NV.. (rows and count of their Z chunks) and
    AT.. (their first columns) of an output slice of dzp columns, streamed per walk tile of bn rows
    (`which` names one). Register tensors are powers of two, so the slice is held as DVA (the largest
    power of two <= dzp, at most 512) plus the rest's powers of two from the largest down, each at
    least 64 (320 = 256 + 64, 576 = 512 + 64, 832 = 512 + 256 + 64, 960 = 512 + 256 + 128 + 64; 0: no
    such tile). Tile X's operand streams as NVX chunks [VKX, DVX], each filling one ring stage of
    bn * kc elements (NZ: all tiles' chunks). `tile` (a constexpr) may carry the name's last letter:
    ("DV", "B") is "DVB"."""
    dzp, bn, kc, which, tile = (getattr(x, "value", x) for x in (dzp, bn, kc, which, tile))
    which += tile
    dva = 512 if dzp >= 512 else (256 if dzp >= 256 else (128 if dzp >= 128 else 64))
    widths, rest = dict(A=dva), dzp - dva
    for name in "BCD":
        widths[name] = max(1 << (rest.bit_length() - 1), 64) if rest > 0 else 0
        rest -= widths[name]
    if which == "NZ":  # Z chunks a walk tile, all tiles together
        return sum(bn // (bn * kc // width) for width in widths.values() if width > 0)
    name = which[-1]
    vk = bn * kc // max(widths[name], 64)
    at = sum(widths[x] for x in "ABCD" if x < name)  # the tile's first column in the slice
    return dict(DV=widths[name], VK=vk, NV=bn // vk if widths[name] > 0 else 0, AT=at)[which[:2]]


@gluon.constexpr_function
def split_layout(n):
    """The register layout of a [64, n] wgmma tile split over two warpgroups, n / 2 columns each."""
    n = getattr(n, "value", n)
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, n // 2, 16])


@gluon.constexpr_function
def t_layout(dzp, bn, kc):
    """The shared layout of the [64, bn] tile T (P or dS) that the product reads in VKA-column blocks
    (VKA = 32 at bn = 256, kc = 64 and DVA = 512): a swizzle of at most VKA columns (64 bytes; 32 at
    VKA = 16) stores them as whole blocks one after another."""
    vka = slice_tiles(dzp, bn, kc, "VKA")
    return gl.NVMMASharedLayout(swizzle_byte_width=min(64, 2 * vka), element_bitwidth=16, rank=2)


@gluon.jit
def _issue(c, descs, coords, ring, x_ring, ready, NK1: gl.constexpr, NK2: gl.constexpr, DZP: gl.constexpr,
           BN: gl.constexpr, KC: gl.constexpr, STAGES: gl.constexpr, DY1: gl.constexpr, DY2: gl.constexpr,
           DZ: gl.constexpr):
    """Start the TMA load of chunk c of a program's stream into ring stage c % STAGES (predicated off
    past `total`). descs = (x1, y1, x2, y2, z); coords = (b, x0, x1_col, x2_col, y1_col, y2_col, z_col,
    t_lo, n_t, total). Per walk step w = g * n_t + (t - t_lo) (walk tile t of head g of a GQA group
    walk, whose Y / Z columns are g * DY1 / DY2 / DZ further on): NK1 chunks of X1 [BM, KC] with Y1
    [BN, KC], NK2 of X2 with Y2, then Z's NV chunks [VK, DVA] and NVB [VKB, DVB] (slice_tiles). The
    forward is X1 = Q, Y1 = K, Z = V; the backward, kernels/attention_wide_gluon_bwd.py. c's place is
    computed at run time: with it a compile-time constant (unrolled loops), the compiler hoisted a
    register per chunk's coordinates and smem address out of the walk and spilled them (Dqk = 640 /
    1024 ran 139 / 153 TFLOP/s, docs/perf_notes.md session 37). Without a group walk (DY1 = 0: the
    forward, dQ) there is no division by n_t."""
    x1_desc, y1_desc, x2_desc, y2_desc, z_desc = descs
    b, x0, x1_col, x2_col, y1_col, y2_col, z_col, t_lo, n_t, total = coords
    VKA: gl.constexpr = slice_tiles(DZP, BN, KC, "VKA")
    NVA: gl.constexpr = slice_tiles(DZP, BN, KC, "NVA")
    PER: gl.constexpr = NK1 + NK2 + slice_tiles(DZP, BN, KC, "NZ")
    s = c % STAGES
    w = c // PER
    i = c - w * PER
    g = 0
    y0 = (t_lo + w) * BN
    if DY1 > 0:  # a GQA group walk (the column steps are 0 otherwise)
        g = w // gl.maximum(n_t, 1)
        y0 = (t_lo + w - g * n_t) * BN
    bar = ready.index(s)
    do = c < total
    # a Z chunk is 8 TMA boxes [VBOX, 64] (a stage of BN * KC elements), placed as the [rows, width]
    # tile the MMA reads: 64-column blocks one after another, each its rows top to bottom
    VBOX: gl.constexpr = BN * KC // 512  # rows of a Z box: the launchers' Z descriptor
    zbuf = ring.index(s)._reinterpret(z_desc.dtype, [8, 1, VBOX, 64], z_desc.layout)
    if i < NK1:  # X1's chunk travels with Y1's
        mbarrier.expect(bar, y1_desc.block_type.nbytes + x1_desc.block_type.nbytes, pred=do)
        tma.async_copy_global_to_shared(x1_desc, [b, x0, x1_col + i * KC], bar, x_ring.index(s), pred=do)
        tma.async_copy_global_to_shared(y1_desc, [b, y0, y1_col + g * DY1 + i * KC], bar, ring.index(s), pred=do)
    elif i < NK1 + NK2:
        mbarrier.expect(bar, y2_desc.block_type.nbytes + x2_desc.block_type.nbytes, pred=do)
        tma.async_copy_global_to_shared(x2_desc, [b, x0, x2_col + (i - NK1) * KC], bar, x_ring.index(s), pred=do)
        tma.async_copy_global_to_shared(y2_desc, [b, y0, y2_col + g * DY2 + (i - NK1) * KC], bar, ring.index(s),
                                        pred=do)
    elif i < NK1 + NK2 + NVA:  # Z [VKA, DVA]: the slice's first register tile
        _issue_z(z_desc, zbuf, bar, b, y0 + (i - NK1 - NK2) * VKA, z_col + g * DZ, do, VKA, VBOX)
    else:  # the further tiles' columns
        _issue_further(i - NK1 - NK2 - NVA, z_desc, zbuf, bar, b, y0, z_col + g * DZ, do, DZP, BN, KC, VBOX)


@gluon.jit
def _issue_further(j, z_desc, zbuf, bar, b, y0, col0, do, DZP: gl.constexpr, BN: gl.constexpr, KC: gl.constexpr,
                   VBOX: gl.constexpr):
    """The TMA load of Z chunk j past the first tile's (slice_tiles): NVB chunks [VKB, DVB], then NVC
    chunks [VKC, DVC] and NVD [VKD, DVD] of the tiles after it, each at its tile's columns."""
    NVB: gl.constexpr = slice_tiles(DZP, BN, KC, "NVB")
    NVC: gl.constexpr = slice_tiles(DZP, BN, KC, "NVC")
    NVD: gl.constexpr = slice_tiles(DZP, BN, KC, "NVD")
    if NVC == 0:
        _issue_tile(j, "B", z_desc, zbuf, bar, b, y0, col0, do, DZP, BN, KC, VBOX)
    elif j < NVB:
        _issue_tile(j, "B", z_desc, zbuf, bar, b, y0, col0, do, DZP, BN, KC, VBOX)
    elif NVD == 0:
        _issue_tile(j - NVB, "C", z_desc, zbuf, bar, b, y0, col0, do, DZP, BN, KC, VBOX)
    elif j < NVB + NVC:
        _issue_tile(j - NVB, "C", z_desc, zbuf, bar, b, y0, col0, do, DZP, BN, KC, VBOX)
    else:
        _issue_tile(j - NVB - NVC, "D", z_desc, zbuf, bar, b, y0, col0, do, DZP, BN, KC, VBOX)


@gluon.jit
def _issue_tile(j, TILE: gl.constexpr, z_desc, zbuf, bar, b, y0, col0, do, DZP: gl.constexpr, BN: gl.constexpr,
                KC: gl.constexpr, VBOX: gl.constexpr):
    """The TMA load of chunk j [VKX, DVX] of tile X = TILE's Z (rows y0 + j * VKX, its columns past col0)."""
    VKX: gl.constexpr = slice_tiles(DZP, BN, KC, "VK", TILE)
    _issue_z(z_desc, zbuf, bar, b, y0 + j * VKX, col0 + slice_tiles(DZP, BN, KC, "AT", TILE), do, VKX, VBOX)


@gluon.jit
def _issue_z(z_desc, zbuf, bar, b, row0, col0, do, ROWS: gl.constexpr, VBOX: gl.constexpr):
    """The TMA load of Z [row0 : row0 + ROWS, col0 : col0 + 8 * VBOX * 64 / ROWS] as 8 boxes [VBOX, 64]
    into zbuf, box jj at column block jj // (ROWS / VBOX), row block jj % (ROWS / VBOX)."""
    mbarrier.expect(bar, 8 * z_desc.block_type.nbytes, pred=do)
    for jj in gl.static_range(8):
        row = row0 + (jj % (ROWS // VBOX)) * VBOX
        col = col0 + (jj // (ROWS // VBOX)) * 64
        tma.async_copy_global_to_shared(z_desc, [b, row, col], bar, zbuf.index(jj), pred=do)


@gluon.jit
def reduce_chunks(acc, c, NCH, descs, coords, ring, x_ring, ready, NK1: gl.constexpr, NK2: gl.constexpr,
                  DZP: gl.constexpr, BN: gl.constexpr, KC: gl.constexpr, STAGES: gl.constexpr, DY1: gl.constexpr,
                  DY2: gl.constexpr, DZ: gl.constexpr, BM: gl.constexpr):
    """acc [BM, BN] += the stream's next NCH chunk pairs (X chunk times Y chunk transposed); after each
    wgmma is issued the previous one is done in this warpgroup, and the thread barrier makes its stage
    free in both before it is refilled. Returns (acc, c)."""
    for kc in range(NCH):
        st = c % STAGES
        mbarrier.wait(ready.index(st), (c // STAGES) & 1)
        x_chunk = x_ring.index(st).reshape([BM, KC])
        y_chunk = ring.index(st).reshape([BN, KC])
        acc = warpgroup_mma(x_chunk, y_chunk.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        gl.thread_barrier()
        _issue(c + STAGES - 1, descs, coords, ring, x_ring, ready, NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZ)
        c += 1
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    return acc, c


@gluon.jit
def produce_chunks(acc, acc_b, parks, alpha, t_smem, c, descs, coords, ring, x_ring, ready, RESCALE: gl.constexpr,
                   PARK: gl.constexpr, NK1: gl.constexpr, NK2: gl.constexpr, DZP: gl.constexpr, BN: gl.constexpr,
                   KC: gl.constexpr, STAGES: gl.constexpr, DY1: gl.constexpr, DY2: gl.constexpr, DZ: gl.constexpr,
                   BM: gl.constexpr):
    """acc [BM, DVA] += T Z[:, :DVA], then each further register tile of the slice += T Z[its columns]
    (slice_tiles), T [BM, BN] in t_smem and Z from the stream. The second tile is acc_b; with PARK each
    further tile is instead the fp32 tile of `parks` (B, C, D), loaded here and stored back (the
    caller's tile-end barrier orders the store before the next load). RESCALE multiplies the further
    tiles by alpha first (the forward's online softmax; acc the caller rescales). Returns (acc, acc_b, c)."""
    DVA: gl.constexpr = slice_tiles(DZP, BN, KC, "DVA")
    DVB: gl.constexpr = slice_tiles(DZP, BN, KC, "DVB")
    DVC: gl.constexpr = slice_tiles(DZP, BN, KC, "DVC")
    DVD: gl.constexpr = slice_tiles(DZP, BN, KC, "DVD")
    VKA: gl.constexpr = slice_tiles(DZP, BN, KC, "VKA")
    NVA: gl.constexpr = slice_tiles(DZP, BN, KC, "NVA")
    dtype: gl.constexpr = t_smem.dtype
    z_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # the same bytes as NVA column blocks [BM, VKA] (the caller's swizzle of at most VKA columns)
    blocks = t_smem._reinterpret(dtype, [NVA, BM, VKA], t_smem.layout)
    for j in range(NVA):
        st = c % STAGES
        mbarrier.wait(ready.index(st), (c // STAGES) & 1)
        z_chunk = ring.index(st)._reinterpret(dtype, [VKA, DVA], z_layout)
        acc = warpgroup_mma(blocks.index(j), z_chunk, acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        gl.thread_barrier()
        _issue(c + STAGES - 1, descs, coords, ring, x_ring, ready, NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZ)
        c += 1
    if DVB == 0:
        acc = warpgroup_mma_wait(0, deps=(acc, ))
    elif PARK:
        acc, c = _produce_parked(acc, parks[0], "B", alpha, t_smem, c, descs, coords, ring, x_ring, ready, RESCALE,
                                 NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZ, BM)
        if DVC > 0:
            acc, c = _produce_parked(acc, parks[1], "C", alpha, t_smem, c, descs, coords, ring, x_ring, ready,
                                     RESCALE, NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZ, BM)
        if DVD > 0:
            acc, c = _produce_parked(acc, parks[2], "D", alpha, t_smem, c, descs, coords, ring, x_ring, ready,
                                     RESCALE, NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZ, BM)
    else:
        acc, acc_b, c = _produce_tile(acc, acc_b, "B", alpha, t_smem, c, descs, coords, ring, x_ring, ready, RESCALE,
                                      NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZ, BM)
    return acc, acc_b, c


@gluon.jit
def _produce_parked(acc, park, TILE: gl.constexpr, alpha, t_smem, c, descs, coords, ring, x_ring, ready,
                    RESCALE: gl.constexpr, NK1: gl.constexpr, NK2: gl.constexpr, DZP: gl.constexpr, BN: gl.constexpr,
                    KC: gl.constexpr, STAGES: gl.constexpr, DY1: gl.constexpr, DY2: gl.constexpr, DZ: gl.constexpr,
                    BM: gl.constexpr):
    """_produce_tile on the tile parked in `park`: loaded, produced into, stored back. Returns (acc, c)."""
    acc_x = park.load(split_layout(slice_tiles(DZP, BN, KC, "DV", TILE)))
    acc, acc_x, c = _produce_tile(acc, acc_x, TILE, alpha, t_smem, c, descs, coords, ring, x_ring, ready, RESCALE,
                                  NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZ, BM)
    park.store(acc_x)
    return acc, c


@gluon.jit
def _produce_tile(acc, acc_x, TILE: gl.constexpr, alpha, t_smem, c, descs, coords, ring, x_ring, ready,
                  RESCALE: gl.constexpr, NK1: gl.constexpr, NK2: gl.constexpr, DZP: gl.constexpr, BN: gl.constexpr,
                  KC: gl.constexpr, STAGES: gl.constexpr, DY1: gl.constexpr, DY2: gl.constexpr, DZ: gl.constexpr,
                  BM: gl.constexpr):
    """acc_x [BM, DVX] (X = TILE: "B", "C" or "D") += T Z[:, its columns] over its NVX chunks [VKX, DVX],
    rescaled by alpha first with RESCALE; acc's last product may still be in flight on entry, none is
    on return. Returns (acc, acc_x, c)."""
    DVX: gl.constexpr = slice_tiles(DZP, BN, KC, "DV", TILE)
    VKX: gl.constexpr = slice_tiles(DZP, BN, KC, "VK", TILE)
    NVX: gl.constexpr = slice_tiles(DZP, BN, KC, "NV", TILE)
    dtype: gl.constexpr = t_smem.dtype
    z_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    blocks = t_smem._reinterpret(dtype, [NVX, BM, VKX], t_smem.layout)
    if RESCALE:
        acc_x = acc_x * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, split_layout(DVX))), 1)
    for j in range(NVX):
        st = c % STAGES
        mbarrier.wait(ready.index(st), (c // STAGES) & 1)
        z_chunk = ring.index(st)._reinterpret(dtype, [VKX, DVX], z_layout)
        acc_x = warpgroup_mma(blocks.index(j), z_chunk, acc_x, is_async=True)
        acc, acc_x = warpgroup_mma_wait(1, deps=(acc, acc_x))
        gl.thread_barrier()
        _issue(c + STAGES - 1, descs, coords, ring, x_ring, ready, NK1, NK2, DZP, BN, KC, STAGES, DY1, DY2, DZ)
        c += 1
    acc, acc_x = warpgroup_mma_wait(0, deps=(acc, acc_x))
    return acc, acc_x, c


@gluon.jit
def store_tile(x, base, stride_s, r0, col0, n_rows, WIDTH: gl.constexpr, BM: gl.constexpr, W: gl.constexpr,
               layout: gl.constexpr):
    """base[r0 : r0 + BM, col0 : col0 + W] = x (rows below n_rows, columns below WIDTH; base points at
    one (batch, head) of a [.., S, H, WIDTH] tensor with row stride stride_s)."""
    rows = r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, W, layout=gl.SliceLayout(0, layout))
    ptrs = base + gl.expand_dims(rows.to(gl.int64) * stride_s, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, x.to(base.dtype.element_ty), mask=(gl.expand_dims(rows, 1) < n_rows) & (gl.expand_dims(cols, 0) < WIDTH))


@gluon.jit
def store_slice(acc, acc_b, parks, row_scale, base, stride_s, r0, col0, n_rows, WIDTH: gl.constexpr,
                PARK: gl.constexpr, DZP: gl.constexpr, BN: gl.constexpr, KC: gl.constexpr, BM: gl.constexpr):
    """base[r0 : r0 + BM, col0 : col0 + DZP] = the slice (acc, then acc_b or the parked tiles) times
    row_scale [BM] (a row's factor, in the rows' slice of the S layout); store_tile's bounds."""
    DVB: gl.constexpr = slice_tiles(DZP, BN, KC, "DVB")
    DVC: gl.constexpr = slice_tiles(DZP, BN, KC, "DVC")
    DVD: gl.constexpr = slice_tiles(DZP, BN, KC, "DVD")
    _store_scaled(acc, "A", row_scale, base, stride_s, r0, col0, n_rows, WIDTH, DZP, BN, KC, BM)
    if DVB > 0:
        if PARK:
            acc_b = parks[0].load(split_layout(DVB))
        _store_scaled(acc_b, "B", row_scale, base, stride_s, r0, col0, n_rows, WIDTH, DZP, BN, KC, BM)
    if DVC > 0:
        _store_scaled(parks[1].load(split_layout(DVC)), "C", row_scale, base, stride_s, r0, col0, n_rows, WIDTH, DZP,
                      BN, KC, BM)
    if DVD > 0:
        _store_scaled(parks[2].load(split_layout(DVD)), "D", row_scale, base, stride_s, r0, col0, n_rows, WIDTH, DZP,
                      BN, KC, BM)


@gluon.jit
def _store_scaled(x, TILE: gl.constexpr, row_scale, base, stride_s, r0, col0, n_rows, WIDTH: gl.constexpr,
                  DZP: gl.constexpr, BN: gl.constexpr, KC: gl.constexpr, BM: gl.constexpr):
    """store_tile of the slice's register tile TILE (its columns past col0), times row_scale per row."""
    W: gl.constexpr = slice_tiles(DZP, BN, KC, "DV", TILE)
    layout: gl.constexpr = split_layout(W)
    scale = gl.expand_dims(gl.convert_layout(row_scale, gl.SliceLayout(1, layout)), 1)
    store_tile(x * scale, base, stride_s, r0, col0 + slice_tiles(DZP, BN, KC, "AT", TILE), n_rows, WIDTH, BM, W,
               layout)


@gluon.jit
def stream_buffers(x_desc, y_desc, PARK: gl.constexpr, DZP: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                   KC: gl.constexpr, STAGES: gl.constexpr):
    """Shared memory of a program: the ring (STAGES stages of a Y / Z chunk [BN, KC]), the X chunks
    beside it, the [BM, BN] tile T of the product's A operand (P or dS), with PARK the fp32 tiles
    (zeroed) the slice's further register tiles B, C, D (slice_tiles) wait in between walk tiles (T
    stands in for those absent), and the stages' mbarriers. Returns (ring, x_ring, t_smem, parks, ready)."""
    dtype: gl.constexpr = x_desc.dtype
    ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BN, KC], y_desc.layout)
    x_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BM, KC], x_desc.layout)
    t_smem = gl.allocate_shared_memory(dtype, [BM, BN], t_layout(DZP, BN, KC))
    parks = (_park_buffer(t_smem, PARK, slice_tiles(DZP, BN, KC, "DVB"), BM),
             _park_buffer(t_smem, PARK, slice_tiles(DZP, BN, KC, "DVC"), BM),
             _park_buffer(t_smem, PARK, slice_tiles(DZP, BN, KC, "DVD"), BM))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    return ring, x_ring, t_smem, parks, ready


@gluon.jit
def _park_buffer(stand_in, PARK: gl.constexpr, W: gl.constexpr, BM: gl.constexpr):
    """A zeroed fp32 [BM, W] tile in shared memory where PARK and W > 0, else stand_in."""
    park = stand_in
    if PARK and W > 0:
        park_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        park = gl.allocate_shared_memory(gl.float32, [BM, W], park_layout)
        park.store(gl.zeros([BM, W], gl.float32, split_layout(W)))
    return park


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
    O's further register tiles (DVP - DVA columns) in shared memory between key tiles."""
    dtype: gl.constexpr = q_desc.dtype
    NK: gl.constexpr = DQK // KC
    s_layout: gl.constexpr = split_layout(BN)
    # O [64, DVP] as register tiles of powers of two (slice_tiles), fed by NZ V chunks [VKA, DVA], [VKB, DVB], ..
    DVA: gl.constexpr = slice_tiles(DVP, BN, KC, "DVA")
    DVB: gl.constexpr = slice_tiles(DVP, BN, KC, "DVB")
    NZ: gl.constexpr = slice_tiles(DVP, BN, KC, "NZ")
    o_layout: gl.constexpr = split_layout(DVA)

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

    # PARK: the further tiles wait in shared memory while S is computed (registers for S beside acc)
    ring, q_smem, p_smem, parks, ready = stream_buffers(q_desc, k_desc, PARK, DVP, BM, BN, KC, STAGES)

    # keys [0, hi): a causal row sees keys up to its own index + Sk - Sq
    hi = seqlen_k
    if CAUSAL:
        hi = gl.maximum(gl.minimum(seqlen_k, q0 + BM + seqlen_k - seqlen_q), 0)
    n_tiles = gl.cdiv(hi, BN)
    # the stream per key tile: NK chunks of Q [BM, KC] with K [BN, KC], then V (no second product, no
    # GQA walk: the column steps are 0)
    descs = (q_desc, k_desc, q_desc, k_desc, v_desc)
    coords = (b, q0, h * DQK, h * DQK, h_kv * DQK, h_kv * DQK, h_kv * DV + v_col0, 0, n_tiles,
              n_tiles * (NK + NZ))
    for c in gl.static_range(STAGES - 1):  # prologue: STAGES - 1 chunks in flight
        _issue(c, descs, coords, ring, q_smem, ready, NK, 0, DVP, BN, KC, STAGES, 0, 0, 0)

    m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BM, DVA], gl.float32, o_layout)
    if DVB > 0:
        if not PARK:
            acc_b = gl.zeros([BM, DVB], gl.float32, split_layout(DVB))
    rows = q0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    cols0 = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    c = 0
    for t in range(n_tiles):
        # -- S = Q K^T, NK chunks --
        s_acc, c = reduce_chunks(gl.zeros([BM, BN], gl.float32, s_layout), c, NK, descs, coords, ring, q_smem, ready,
                                 NK, 0, DVP, BN, KC, STAGES, 0, 0, 0, BM)

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

        # -- O += P V: NVA chunks of V [VKA, DVA] into acc, then those of the further tiles --
        if DVB > 0 and not PARK:
            acc, acc_b, c = produce_chunks(acc, acc_b, parks, alpha, p_smem, c, descs, coords, ring, q_smem, ready,
                                           True, PARK, NK, 0, DVP, BN, KC, STAGES, 0, 0, 0, BM)
        else:  # no second tile in registers (acc stands in for it)
            acc, _, c = produce_chunks(acc, acc, parks, alpha, p_smem, c, descs, coords, ring, q_smem, ready, True,
                                       PARK, NK, 0, DVP, BN, KC, STAGES, 0, 0, 0, BM)
        gl.thread_barrier()  # the next tile rewrites p_smem (and reloads the parked tiles)

    # -- epilogue: normalise; a row that saw no key gives out 0 and lse -inf --
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    if DVB > 0 and not PARK:
        store_slice(acc, acc_b, parks, 1.0 / l_safe, out_base, stride_os, q0, v_col0, seqlen_q, DV, PARK, DVP, BN, KC,
                    BM)
    else:
        store_slice(acc, acc, parks, 1.0 / l_safe, out_base, stride_os, q0, v_col0, seqlen_q, DV, PARK, DVP, BN, KC, BM)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    lse_ptrs = Lse + b.to(gl.int64) * stride_lse_b + h.to(gl.int64) * stride_lse_h + rows
    gl.store(lse_ptrs, lse, mask=(rows < seqlen_q) & (v_col0 == 0))
