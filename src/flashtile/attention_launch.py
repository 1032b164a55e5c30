"""Launchers for the Triton attention kernels: size the grid, pick the config, allocate, launch.

Inputs arrive in flash layout with any strides whose last dim is contiguous (api.py guarantees it):
q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]. Outputs are allocated contiguous.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton

from flashtile.dispatch import triton_interpreting
from flashtile.kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from flashtile.kernels.attention_fwd import attention_fwd_kernel
from flashtile.tuning import BackwardConfig, KernelConfig, backward_config, forward_config, padded_head_dim


def _empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it with NaN to prove full coverage)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are fp32-exact unless torch allows tf32 for matmuls (design.md)."""
    if dtype == torch.float32 and not triton_interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _alibi_args(alibi_slopes: Optional[torch.Tensor], dummy: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Slopes pointer and batch stride ([Hq] broadcasts over batch with stride 0)."""
    if alibi_slopes is None:
        return dummy, 0
    slopes = alibi_slopes.to(torch.float32).contiguous()
    return slopes, (slopes.stride(0) if slopes.dim() == 2 else 0)


def _mask_flags(left: Optional[int], right: Optional[int]) -> Tuple[bool, bool, int, int]:
    """Edges (spec.mask_edges; None = unbounded) -> (HAS_LEFT, HAS_RIGHT, left, right)."""
    return left is not None, right is not None, left or 0, right or 0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib
    return contextlib.nullcontext()


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                      left: Optional[int] = None, right: Optional[int] = None,
                      softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                      config: Optional[KernelConfig] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out [B, Sq, Hq, Dv] (q's dtype) and lse fp32 [B, Hq, Sq].

    left/right: visibility edges around the bottom-right diagonal (spec.mask_edges), None = unbounded.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = _empty((B, Sq, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = _empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if Sk == 0:  # nothing to attend to: every row is fully masked
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    causal = right is not None
    has_left, has_right, left, right = _mask_flags(left, right)
    cfg = config or forward_config(q.device, D, Dv, q.dtype, causal)
    block_d, block_dv = padded_head_dim(D), padded_head_dim(Dv)
    grid = (triton.cdiv(Sq, cfg.block_m) * B * Hq,)
    slopes, stride_alibi_b = _alibi_args(alibi_slopes, q)
    with _device_ctx(q):
        attention_fwd_kernel[grid](
            q, k, v, out, lse, slopes,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2), stride_alibi_b,
            Sq, Sk, Hq, Hq // Hkv, D, Dv,
            softmax_scale, softcap, left, right,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            HAS_LEFT=has_left, HAS_RIGHT=has_right, SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
            EVEN_D=block_d == D, EVEN_DV=block_dv == Dv, DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def _expand_gqa(q: torch.Tensor, k: torch.Tensor, block_n: int) -> bool:
    """Sum the GQA group in registers unless that leaves the GPU too few programs to fill it.

    With few kv heads (MQA) one program per (key tile, kv head) is too little parallelism; then each
    query head writes its own fp32 partial dK/dV and torch sums the group (still deterministic).
    """
    B, Sk, Hkv = k.shape[0], k.shape[1], k.shape[2]
    if q.shape[2] == Hkv:
        return False
    if q.device.type != "cuda" or triton_interpreting():
        return False
    programs = B * Hkv * triton.cdiv(Sk, block_n)
    return programs < 2 * _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
                       left: Optional[int] = None, right: Optional[int] = None,
                       softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                       config: Optional[BackwardConfig] = None, expand_gqa: Optional[bool] = None,
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv (contiguous, dtypes of q, k, v)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    dq = _empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    dk = _empty((B, Sk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = _empty((B, Sk, Hkv, Dv), dtype=v.dtype, device=v.device)
    if Sq == 0 or Sk == 0 or B == 0 or Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    causal = right is not None
    has_left, has_right, left, right = _mask_flags(left, right)
    cfg = config or backward_config(q.device, D, Dv, q.dtype, causal)
    block_d, block_dv = padded_head_dim(D), padded_head_dim(Dv)
    flags = dict(HAS_LEFT=has_left, HAS_RIGHT=has_right, SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
                 EVEN_D=block_d == D, EVEN_DV=block_dv == Dv, DOT_PRECISION=_dot_precision(q.dtype))
    slopes, stride_alibi_b = _alibi_args(alibi_slopes, q)
    delta = _empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    with _device_ctx(q):
        # dQ first: it also writes delta, which the dK/dV launch reads
        c = cfg.dq
        attention_bwd_dq_kernel[(triton.cdiv(Sq, c.block_m) * B * Hq,)](
            q, k, v, out, dout, lse, delta, dq, slopes,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), stride_alibi_b,
            Sq, Sk, Hq, group, D, Dv, softmax_scale, softcap, left, right,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            num_warps=c.num_warps, num_stages=c.num_stages, **flags,
        )
        expand = _expand_gqa(q, k, cfg.dkdv.block_n) if expand_gqa is None else (expand_gqa and group > 1)
        if expand:  # per-query-head fp32 partials, summed over the group below
            dk_buf = _empty((B, Sk, Hq, D), dtype=torch.float32, device=q.device)
            dv_buf = _empty((B, Sk, Hq, Dv), dtype=torch.float32, device=q.device)
            heads_per_program, n_head_programs = 1, Hq
        else:
            dk_buf, dv_buf = dk, dv
            heads_per_program, n_head_programs = group, Hkv
        c = cfg.dkdv
        attention_bwd_dkdv_kernel[(triton.cdiv(Sk, c.block_n) * B * n_head_programs,)](
            q, k, v, dout, lse, delta, dk_buf, dv_buf, slopes,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk_buf.stride(0), dk_buf.stride(1), dk_buf.stride(2),
            dv_buf.stride(0), dv_buf.stride(1), dv_buf.stride(2), stride_alibi_b,
            Sq, Sk, Hq, group, heads_per_program, n_head_programs,
            D, Dv, softmax_scale, softcap, left, right,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            num_warps=c.num_warps, num_stages=c.num_stages, **flags,
        )
        if expand:
            dk.copy_(dk_buf.view(B, Sk, Hkv, group, D).sum(3))
            dv.copy_(dv_buf.view(B, Sk, Hkv, group, Dv).sum(3))
    return dq, dk, dv
