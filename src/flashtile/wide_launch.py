"""Launchers for the wide-head kernels (kernels/attention_wide.py): head dims > 256 (dispatch.wide_heads).

Same contract as attention_launch.attention_forward / attention_backward (which route here), so the
ops, varlen and autograd layers do not know which tiling runs. Head dims that are not multiples of
64 are first copied into zero-padded rows (row_align.SPLIT_D_COLUMNS): unaligned rows (D = 257,
300, 333, 350) had run the split-D forward at 12-15 TFLOP/s on the H200, against 280-290 at D = 320 /
384, and rows aligned to 16 but not 64 columns ran the backward 1.4-1.8x slower than padded ones.
The one feature the wide kernels do not have yet (block_mask) raises UnsupportedError. On sm_90 the
forward of some 16-bit head dims runs the Gluon kernel instead (wide_gluon_launch.gluon_forward), and
so does their backward (wide_gluon_launch.gluon_backward, after the delta launch here).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from flashtile.attention_launch import (ALIBI_DISTANCE, _Layout, _alibi_args, _attn_mask_args, _dense_layout, _device_ctx,
                                        _dot_precision, _dropout_args, _mask_flags, backward_buffers, dense_dq,
                                        forward_buffers)
from flashtile.dispatch import dense_dq_heads
from flashtile.errors import UnsupportedError
from flashtile.kernels.attention_wide import wide_delta_kernel, wide_dkdv_kernel, wide_dq_kernel, wide_fwd_kernel
from flashtile.key_layout import keys_in_range
from flashtile.launch_fit import launch_fitting
from flashtile.row_align import SPLIT_D_COLUMNS, aligned_rows, narrowed
from flashtile.tuning import WideBackwardConfig, WideConfig, wide_backward_config, wide_forward_config, wide_parts
from flashtile.wide_gluon_launch import gluon_backward, gluon_backward_applies, gluon_features, gluon_forward

DELTA_BLOCK = (64, 64)  # rows x columns per step of wide_delta_kernel


def _check_features(block_mask) -> None:
    if block_mask is not None:
        raise UnsupportedError("block_mask with head dims > 256 is not supported yet (the wide-head kernels have "
                               "causal, sliding window, GQA, softcap, ALiBi, attn_mask, dropout and varlen)")


def _run(kernel, grid, cfg: WideConfig, args, meta) -> None:
    """Launch; a GPU without the shared memory for cfg's pipeline depth retries with fewer stages."""
    launch_fitting(lambda stages: kernel[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                               num_warps=cfg.num_warps, num_stages=stages, **meta),
                   cfg.num_stages, lambda stages: stages - 1 if stages > 1 else None)


def _flags(layout: _Layout, left, right, softcap: float, alibi_slopes, dtype: torch.dtype):
    has_left, has_right, left, right = _mask_flags(left, right)
    meta = dict(HAS_LEFT=has_left, HAS_RIGHT=has_right, SOFTCAP=softcap > 0,
                HAS_ALIBI=0 if alibi_slopes is None else ALIBI_DISTANCE,
                VARLEN=layout.varlen, DOT_PRECISION=_dot_precision(dtype))
    return meta, left, right


def _forward_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[_Layout]):
    """q, k, v with rows padded to 64 columns (row_align.py) and k, v narrowed to the keys in range
    (key_layout.py), and the layout: what both forward kernels read."""
    q, k, v = (aligned_rows(t, SPLIT_D_COLUMNS) for t in (q, k, v))
    layout = layout or _dense_layout(q, k)
    k, v = (keys_in_range(t, layout.seqlen_k, layout.varlen) for t in (k, v))
    return q, k, v, layout


def wide_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                 left: Optional[int] = None, right: Optional[int] = None, softcap: float = 0.0,
                 alibi_slopes: Optional[torch.Tensor] = None, config: Optional[WideConfig] = None,
                 layout: Optional[_Layout] = None, block_mask=None, attn_mask: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, dropout_seed: Tuple[int, int] = (0, 0)) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [.., Hq, Dv] (q's dtype) and lse fp32, as attention_launch.attention_forward."""
    _check_features(block_mask)
    if config is None:
        done = gluon_wide_forward(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, layout, attn_mask,
                                  dropout_p)
        if done is not None:
            return done
    dv_asked = v.shape[-1]
    q, k, v, layout = _forward_inputs(q, k, v, layout)
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv, Dv = k.shape[-2], v.shape[-1]
    B, Sq, Sk = layout.batch, layout.seqlen_q, layout.seqlen_k
    out, lse, done = forward_buffers(q, v, layout)
    if done:
        return narrowed(out, dv_asked), lse
    cfg = config or wide_forward_config(q.device, D, Dv, q.dtype, right is not None)
    part_a, part_b, n_split = wide_parts(Dv, cfg.max_part)
    meta, left, right = _flags(layout, left, right, softcap, alibi_slopes, q.dtype)
    slopes, stride_alibi_b = _alibi_args(alibi_slopes, q)
    am_kind, am, am_strides = _attn_mask_args(attn_mask, (B, Hq, Sq, Sk), lse)
    cu_q, cu_k = layout.cu(lse)
    args = (q, k, v, out, lse, slopes, cu_q, cu_k, am, *layout.bsh(q), *layout.bsh(k), *layout.bsh(v),
            *layout.bsh(out), *layout.lse_bh(lse), stride_alibi_b, Sq, Sk, Hq, Hq // Hkv, D, Dv, softmax_scale, softcap,
            left, right, n_split, *am_strides, *_dropout_args(dropout_p, dropout_seed))
    grid = (n_split * triton.cdiv(Sq, cfg.block_m) * B * Hq,)
    with _device_ctx(q):
        _run(wide_fwd_kernel, grid, cfg, args, dict(meta, PART_A=part_a, PART_B=part_b, EVEN_K=D % cfg.block_k == 0,
                                                    ATTN_MASK=am_kind, DROPOUT=dropout_p > 0))
    return narrowed(out, dv_asked), lse


def gluon_wide_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                       left: Optional[int] = None, right: Optional[int] = None, softcap: float = 0.0,
                       alibi_slopes: Optional[torch.Tensor] = None, layout: Optional[_Layout] = None,
                       attn_mask: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.0) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """out and lse as wide_forward, from the Gluon kernel (wide_gluon_launch.py), or None where it does
    not apply. attention_forward asks it first for the head dims it would otherwise run dense."""
    varlen = layout is not None and layout.varlen
    if not gluon_features(q, k, v, left, right, softcap, alibi_slopes, attn_mask, dropout_p, varlen):
        return None  # before any padding copy
    dv_asked = v.shape[-1]
    q, k, v, layout = _forward_inputs(q, k, v, layout)
    out, lse, done = forward_buffers(q, v, layout)
    if done or gluon_forward(q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes, attn_mask,
                             dropout_p, layout.varlen):
        return narrowed(out, dv_asked), lse
    return None


def _delta(out: torch.Tensor, dout: torch.Tensor, delta: torch.Tensor, cu_q, layout: _Layout) -> None:
    """delta = rowsum(dO * O) [B, Hq, Sq] fp32 (wide_delta_kernel), what dS = P * (dP - delta) needs."""
    bm, bk = DELTA_BLOCK
    Sq, Hq = layout.seqlen_q, out.shape[-2]
    wide_delta_kernel[(triton.cdiv(Sq, bm) * layout.batch * Hq,)](
        out, dout, delta, cu_q, *layout.bsh(out), *layout.bsh(dout), *layout.lse_bh(delta), Sq, Hq, out.shape[-1],
        BLOCK_M=bm, BLOCK_K=bk, VARLEN=layout.varlen)


def wide_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, softmax_scale: float, left: Optional[int] = None, right: Optional[int] = None,
                  softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                  config: Optional[WideBackwardConfig] = None, expand_gqa: Optional[bool] = None,
                  layout: Optional[_Layout] = None, block_mask=None, attn_mask: Optional[torch.Tensor] = None,
                  dropout_p: float = 0.0, dropout_seed: Tuple[int, int] = (0, 0),
                  dbias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, dtypes of q, k, v); the GQA group is always summed in registers.
    dbias: as attention_launch.attention_backward (the dQ launch writes the attn_mask's gradient).
    dQ runs on the dense dQ kernel where dispatch.dense_dq_heads says so, unless a config is given
    (a WideBackwardConfig configures all three split-D kernels, as tuning sweeps need)."""
    _check_features(block_mask)
    d_asked, dv_asked = q.shape[-1], v.shape[-1]
    dout, q, k, v, out = (aligned_rows(t, SPLIT_D_COLUMNS) for t in (dout, q, k, v, out))  # see row_align.py
    layout = layout or _dense_layout(q, k)
    k, v = (keys_in_range(t, layout.seqlen_k, layout.varlen) for t in (k, v))  # see key_layout.py
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv, Dv = k.shape[-2], v.shape[-1]
    B, Sq, Sk = layout.batch, layout.seqlen_q, layout.seqlen_k
    dq, dk, dv, delta = backward_buffers(q, k, v, lse)
    if Sq == 0 or Sk == 0 or B == 0 or Hq == 0 or q.numel() == 0:
        return narrowed(dq.zero_(), d_asked), narrowed(dk.zero_(), d_asked), narrowed(dv.zero_(), dv_asked)
    cfg = config or wide_backward_config(q.device, D, Dv, q.dtype, right is not None)
    left_asked, right_asked = left, right
    meta, left, right = _flags(layout, left, right, softcap, alibi_slopes, q.dtype)
    slopes, stride_alibi_b = _alibi_args(alibi_slopes, q)
    am_kind, am, am_strides = _attn_mask_args(attn_mask, (B, Hq, Sq, Sk), lse)
    cu_q, cu_k = layout.cu(lse)
    scalars = (*layout.lse_bh(lse), stride_alibi_b, Sq, Sk, Hq, Hq // Hkv, D, Dv, softmax_scale, softcap, left, right)
    inputs = (*layout.bsh(q), *layout.bsh(k), *layout.bsh(v), *layout.bsh(dout))
    launches = [(wide_dkdv_kernel, dk, cfg.dk, Sk, Hkv, D, dict(DKDV=1)),
                (wide_dkdv_kernel, dv, cfg.dv, Sk, Hkv, Dv, dict(DKDV=0))]
    if config is None and gluon_backward_applies(dout, q, k, v, left_asked, right_asked, softcap, alibi_slopes, attn_mask,
                                                 dropout_p, layout.varlen):
        with _device_ctx(q):
            _delta(out, dout, delta, cu_q, layout)
            gluon_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale, right_asked == 0)
        return narrowed(dq, d_asked), narrowed(dk, d_asked), narrowed(dv, dv_asked)
    dense = config is None and dense_dq_heads(D, Dv, q.dtype, q.device, meta["HAS_LEFT"] or meta["HAS_RIGHT"])
    with _device_ctx(q):
        if dense:  # dq and delta from the dense dQ kernel (dispatch.dense_dq_heads)
            dense_dq(dout, q, k, v, out, lse, delta, dq, softmax_scale, layout, left_asked, right_asked, softcap,
                     alibi_slopes, attn_mask, dropout_p, dropout_seed, dbias)
        else:
            _delta(out, dout, delta, cu_q, layout)
            launches.insert(0, (wide_dq_kernel, dq, cfg.dq, Sq, Hq, D, dict(BIAS_GRAD=dbias is not None)))
        for kernel, dx, c, rows, heads, width, extra in launches:
            part_a, part_b, n_split = wide_parts(width, c.max_part)
            tile = c.block_m if kernel is wide_dq_kernel else c.block_n
            bias_grad = (dbias if dbias is not None else lse,) if kernel is wide_dq_kernel else ()
            args = (q, k, v, dout, lse, delta, dx, slopes, cu_q, cu_k, am, *bias_grad, *inputs, *layout.bsh(dx),
                    *scalars, n_split, *am_strides, *_dropout_args(dropout_p, dropout_seed))
            _run(kernel, (n_split * triton.cdiv(rows, tile) * B * heads,), c, args,
                 dict(meta, **extra, PART_A=part_a, PART_B=part_b, EVEN_K=D % c.block_k == 0,
                      EVEN_KV=Dv % c.block_k == 0, ATTN_MASK=am_kind, DROPOUT=dropout_p > 0))
    return narrowed(dq, d_asked), narrowed(dk, d_asked), narrowed(dv, dv_asked)

