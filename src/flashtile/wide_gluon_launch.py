"""Launchers of the Gluon wide forward and backward (kernels/attention_wide_gluon.py, attention_wide_gluon_bwd.py),
called by wide_launch.wide_forward / wide_backward.

`gluon_forward` runs the kernel and returns True where it applies: dispatch.gluon_forward_heads (head
dims, dtype, sm_90), features the kernel has (plain or causal, GQA; no softcap, ALiBi, window,
dropout, attn_mask or packed sequences) and tensors that TMA can read in place: each of q, k, v
viewed as [B, S, H * D] with unit stride along the head dim, heads adjacent, 16-byte aligned base and
strides. Otherwise it returns False and wide_forward runs the split-D Triton kernel, which has every
feature and the same results within the tolerance rule. `gluon_backward_applies` asks the same of a
backward call (with dispatch.gluon_backward_heads, and dout too); `gluon_backward` then launches dV,
dK and dQ on the slices of `o_slices`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from flashtile.dispatch import gluon_backward_heads, gluon_forward_heads
from flashtile.row_align import SPLIT_D_COLUMNS, padded_width

STAGES = 4  # ring stages of 32 KB (Q's 8 KB chunks beside): 197 KB of shared memory with P
KEYS_PER_TILE = 256  # keys of one S tile, 128 per warpgroup (at 128, 64 a warpgroup, 316 against 502 TFLOP/s at D=512)
REGISTER_SLICE = 512  # wider slices park their further register tiles in shared memory between key tiles
# How many further register tiles a slice past 512 columns may park. 1 (measured, sessions 38-39):
# slices of 576, 640 and 768 columns, at most 768 (512 + 256; 1024 does not fit). 3: every multiple of
# 64 up to 960 (512 + 256 + 128 + 64 with 2 ring stages), so 769..960 runs one slice instead of two
# (each recomputing S, and dK / dQ dP): compiled (kernels/attention_wide_gluon.slice_tiles), its speed
# not measured yet (docs/perf_notes.md, session 40).
PARKED_TILES = 1
# Whether a slice whose ring holds only 2 stages of 64-column chunks streams 32-column ones (ring_plan):
# compiled, not measured yet.
NARROW_CHUNKS = False
SHARED_MEMORY = 232448  # bytes a program may use on sm_90
O_SLICE = 512  # the O slice of wider heads (128 registers a thread over two warpgroups)
CHUNK_COLUMNS = 64  # the narrowest O slice, one TMA box of V; a ring chunk's columns (kernels' CHUNK)
LOG2E = 1.4426950408889634


def _tma_view(t: torch.Tensor) -> Optional[tuple]:
    """(shape, strides) of t [B, S, H, D] as [B, S, H * D] for a TMA descriptor, or None when TMA cannot
    read it in place (heads not adjacent, unaligned)."""
    B, S, H, D = t.shape
    sb, ss, sh, sd = t.stride()
    if sd != 1 or (sh != D and H > 1) or t.data_ptr() % 16 or (sb * t.element_size()) % 16 or (ss * t.element_size()) % 16:
        return None
    return [B, S, H * D], [sb, ss, 1]


def _descriptor(t: torch.Tensor, view: tuple, rows: int, cols: int):
    """A TMA descriptor over view of t (16-bit) with boxes [1, rows, cols], swizzled by their row's bytes
    (at most 128)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout(swizzle_byte_width=min(128, 2 * cols), element_bitwidth=16, rank=3)
    return TensorDescriptor(t, view[0], view[1], [1, rows, cols], layout)


def gluon_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: Optional[int], right: Optional[int],
                   softcap: float, alibi_slopes, attn_mask, dropout_p: float, varlen: bool,
                   rule=gluon_forward_heads) -> bool:
    """True when the call's features (plain or causal, GQA), dtypes, device and head dims (padded to
    64 columns; `rule`: the forward's or the backward's) are ones the Gluon kernels have; whether TMA
    can read the tensors is gluon_forward's."""
    if varlen or softcap > 0 or alibi_slopes is not None or attn_mask is not None or dropout_p > 0:
        return False
    if left is not None or right not in (None, 0):  # windows stay split-D; causal is right == 0
        return False
    if q.dtype != k.dtype or q.dtype != v.dtype:
        return False
    return rule(padded_width(q.shape[-1], SPLIT_D_COLUMNS), padded_width(v.shape[-1], SPLIT_D_COLUMNS), q.dtype, q.device)


def gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  softmax_scale: float, left: Optional[int], right: Optional[int], softcap: float, alibi_slopes,
                  attn_mask, dropout_p: float, varlen: bool) -> bool:
    """out [B, Sq, Hq, Dv] and lse [B, Hq, Sq] of one forward on the Gluon kernel, if it applies (module doc).

    q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv], head dims padded to 64 columns."""
    if not gluon_features(q, k, v, left, right, softcap, alibi_slopes, attn_mask, dropout_p, varlen):
        return False
    views = [_tma_view(t) for t in (q, k, v)]
    if any(view is None for view in views) or min(q.shape[1], k.shape[1]) == 0:
        return False
    from flashtile.kernels.attention_wide_gluon import BLOCK_M, CHUNK, wide_fwd_gluon_kernel

    B, Sq, Hq, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    n_m = triton.cdiv(Sq, BLOCK_M)
    with torch.cuda.device(q.device):
        for col0, dvp, n_pass in o_slices(Dv):
            park, stages, kc = ring_plan(dvp)
            descs = (_descriptor(q, views[0], BLOCK_M, kc), _descriptor(k, views[1], KEYS_PER_TILE, kc),
                     _descriptor(v, views[2], KEYS_PER_TILE * kc // 512, CHUNK))  # 8 boxes of V fill a stage
            wide_fwd_gluon_kernel[(n_pass * n_m * B * Hq,)](
                *descs, out, lse, *out.stride()[:3], *lse.stride()[:2], Sq, Sk, Hq, Hq // Hkv, softmax_scale * LOG2E,
                n_pass, col0, D, Dv, dvp, BLOCK_M, KEYS_PER_TILE, kc, stages, right == 0, park,
                num_warps=8)
    return True


def gluon_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                   delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, softmax_scale: float,
                   causal: bool) -> None:
    """dq, dk, dv [B, S, H, D] of one backward on the Gluon kernel (kernels/attention_wide_gluon_bwd.py):
    one launch per gradient and slice width, dV first (it needs no delta). The caller checked
    gluon_backward_applies; delta = rowsum(dO * O) is ready, with lse's strides."""
    from flashtile.kernels.attention_wide_gluon import BLOCK_M, CHUNK
    from flashtile.kernels.attention_wide_gluon_bwd import DK_MODE, DQ_MODE, DV_MODE, wide_bwd_gluon_kernel

    B, Sq, Hq, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    tensors = dict(q=q, k=k, v=v, do=dout)

    def own(name, kc):  # a tensor read as the owner's rows: boxes [1, 64, kc]
        return _descriptor(tensors[name], _tma_view(tensors[name]), BLOCK_M, kc)

    def walk(name, kc):  # read as the walked tile's rows: boxes [1, 256, kc]
        return _descriptor(tensors[name], _tma_view(tensors[name]), KEYS_PER_TILE, kc)

    def z(name, kc):  # read as the produced gradient's operand: 8 boxes [1, 256 * kc / 512, 64] fill a stage
        return _descriptor(tensors[name], _tma_view(tensors[name]), KEYS_PER_TILE * kc // 512, CHUNK)

    if lse.stride() != delta.stride():  # the kernel reads both with lse's strides
        lse = lse.contiguous()
    # (mode, (X1, Y1, X2, Y2, Z), gradient, its rows, its heads, its width, its scale)
    launches = ((DV_MODE, ("k", "q", "k", "q", "do"), dv, Sk, Hkv, Dv, 1.0),
                (DK_MODE, ("k", "q", "v", "do", "q"), dk, Sk, Hkv, D, softmax_scale),
                (DQ_MODE, ("q", "k", "do", "v", "k"), dq, Sq, Hq, D, softmax_scale))
    with torch.cuda.device(q.device):
        for mode, (x1, y1, x2, y2, zz), grad, n_rows, heads, width, scale in launches:
            for col0, dzp, n_pass in o_slices(width):
                park, stages, kc = ring_plan(dzp)
                descs = (own(x1, kc), walk(y1, kc), own(x2, kc), walk(y2, kc), z(zz, kc))
                wide_bwd_gluon_kernel[(n_pass * triton.cdiv(n_rows, BLOCK_M) * B * heads,)](
                    *descs, grad, lse, delta, *grad.stride()[:3], *lse.stride()[:2], Sq, Sk, Hq, Hq // Hkv,
                    softmax_scale * LOG2E, scale, n_pass, col0, mode, D, Dv, dzp, BLOCK_M, KEYS_PER_TILE, kc,
                    stages, causal, park, num_warps=8)


def gluon_backward_applies(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           left: Optional[int], right: Optional[int], softcap: float, alibi_slopes, attn_mask,
                           dropout_p: float, varlen: bool) -> bool:
    """True when gluon_backward can run this call: the features, dtypes and head dims of gluon_features
    under dispatch.gluon_backward_heads, and tensors TMA reads in place (rows padded to 64 columns)."""
    if not gluon_features(q, k, v, left, right, softcap, alibi_slopes, attn_mask, dropout_p, varlen,
                          rule=gluon_backward_heads) or dout.dtype != q.dtype:
        return False
    return all(_tma_view(t) is not None for t in (dout, q, k, v)) and min(q.shape[1], k.shape[1]) > 0


def ring_plan(dvp: int) -> Tuple[bool, int, int]:
    """(PARK, ring stages, chunk columns KC) of a program holding an O slice of dvp columns. Past 512
    columns it parks its further register tiles (held in registers, a second tile spilled: 576: 40
    bytes a thread, 640: 264, 768: 1.3 KB; parked, 64 x (dvp - 512) fp32 in shared memory, nothing
    spills); the ring keeps as many of its STAGES 64-column stages as fit beside them, at least 2.
    With NARROW_CHUNKS a slice left with 2 streams 32-column chunks instead (half a stage's bytes),
    as many stages as fit up to 2 * STAGES: more chunks in flight in the same memory."""
    park = dvp > REGISTER_SLICE
    stages = _stages(dvp, CHUNK_COLUMNS, STAGES)
    if NARROW_CHUNKS and stages == 2:
        return park, _stages(dvp, CHUNK_COLUMNS // 2, 2 * STAGES), CHUNK_COLUMNS // 2
    return park, stages, CHUNK_COLUMNS


def _stages(dvp: int, kc: int, most: int) -> int:
    """The most ring stages of kc-column chunks (at most `most`, at least 2) that fit beside the rest."""
    stages = most
    while stages > 2 and _shared_bytes(dvp, stages, kc) > SHARED_MEMORY:
        stages -= 1
    assert _shared_bytes(dvp, stages, kc) <= SHARED_MEMORY, f"an O slice of {dvp} columns does not fit"
    return stages


def _shared_bytes(dvp: int, stages: int, kc: int = CHUNK_COLUMNS) -> int:
    """Shared memory of a program holding an O slice of dvp columns: the ring's stages (a K or V chunk
    of kc columns, Q's chunk beside it), P, the parked fp32 tiles past 512 columns, and room for the
    barriers."""
    from flashtile.kernels.attention_wide_gluon import BLOCK_M

    parked = max(dvp - REGISTER_SLICE, 0)
    return stages * (KEYS_PER_TILE + BLOCK_M) * kc * 2 + BLOCK_M * KEYS_PER_TILE * 2 + BLOCK_M * parked * 4 + 1024


def slice_width(dv: int) -> int:
    """The narrowest O slice the kernel has that holds dv columns: up to 512, a power of two >= 64 (one
    register tile) or a power of two plus a smaller one of at least 64 (two tiles in registers: 320 =
    256 + 64); past 512, a multiple of 64 (512 in registers, the rest parked as powers of two: 832 =
    512 + 256 + 64, kernels/attention_wide_gluon.slice_tiles)."""
    if dv > REGISTER_SLICE:  # the narrowest multiple of 64 with at most PARKED_TILES further tiles
        width = triton.cdiv(dv, CHUNK_COLUMNS) * CHUNK_COLUMNS
        while _parked_tiles(width) > PARKED_TILES:
            width += CHUNK_COLUMNS
        return width
    a = max(CHUNK_COLUMNS, 1 << (dv - 1).bit_length())  # one tile
    half = a // 2  # past 64 columns, dv > half: a tile of half and one for the rest
    if half < CHUNK_COLUMNS:
        return a
    b = max(CHUNK_COLUMNS, 1 << (dv - half - 1).bit_length())
    return half + b if b < half else a


def o_slices(dv: int) -> List[Tuple[int, int, int]]:
    """Launches covering Dv columns of O: (first column, slice width DVP, slices). One slice up to
    widest_slice() columns; wider heads run whole 512-column slices, then the rest in one slice (the
    narrowest that holds it, slice_width): a wasted column of P V costs less than another program
    recomputing S."""
    if dv <= widest_slice():
        return [(0, slice_width(dv), 1)]
    full, rest = divmod(dv, O_SLICE)
    width = slice_width(rest) if rest else 0
    if width == O_SLICE:
        return [(0, O_SLICE, full + 1)]
    return [(0, O_SLICE, full)] + [(full * O_SLICE, width, 1)] * (rest > 0)


def _parked_tiles(width: int) -> int:
    """The register tiles past the first of a slice of width columns (kernels/attention_wide_gluon.slice_tiles)."""
    from flashtile.kernels.attention_wide_gluon import slice_tiles

    return sum(slice_tiles(width, KEYS_PER_TILE, CHUNK_COLUMNS, "DV" + tile) > 0 for tile in "BCD")


def widest_slice() -> int:
    """The widest O slice one program holds: at most PARKED_TILES further tiles, whose fp32 tiles fit
    shared memory beside 2 ring stages (768 with 1, 960 with 3)."""
    return max(w for w in range(REGISTER_SLICE + CHUNK_COLUMNS, 2 * REGISTER_SLICE + 1, CHUNK_COLUMNS)
               if _parked_tiles(w) <= PARKED_TILES and _shared_bytes(w, 2) <= SHARED_MEMORY)
