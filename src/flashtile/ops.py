"""torch.library custom ops for attention, their fake (meta) implementations and autograd.

The ops are opaque to torch.compile (fullgraph works) and carry the chosen backend as a string
argument, so the decision made in dispatch.py is baked into the traced graph. The forward saves
q, k, v, out and lse; the backward recomputes P from lse (no S x S tensor is stored).

Eager calls skip the custom-op machinery and go through a plain autograd.Function over the same
implementations: torch.library.custom_op costs tens of microseconds of host time per call
(pytorch/pytorch#176592), which is most of a step at short sequence lengths.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from flashtile.masks import Edges

Tensor = torch.Tensor


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, left: Optional[int], right: Optional[int],
                  softcap: float, alibi_slopes: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    if backend == "triton":
        from flashtile.attention_launch import attention_forward
        return attention_forward(q, k, v, softmax_scale, left, right, softcap, alibi_slopes)
    if backend == "cpu":
        from flashtile import cpu
        out, lse = cpu.attention_forward(q, k, v, softmax_scale, window_size=Edges(left, right),
                                         softcap=softcap, alibi_slopes=alibi_slopes)
        return out.contiguous(), lse.contiguous()
    raise ValueError(f"flashtile::attention_fwd: unknown backend {backend!r}")


@torch.library.custom_op("flashtile::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, left: Optional[int], right: Optional[int],
                  softcap: float, alibi_slopes: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """out [B, Sq, Hq, Dv] (contiguous, q's dtype), lse fp32 [B, Hq, Sq]."""
    return _forward_impl(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend):
    B, Sq, Hq, _ = q.shape
    out = q.new_empty((B, Sq, Hq, v.shape[3]))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


def _backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   softmax_scale: float, left: Optional[int], right: Optional[int], softcap: float,
                   alibi_slopes: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if backend == "triton":
        from flashtile.attention_launch import attention_backward
        return attention_backward(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes)
    if backend == "cpu":
        from flashtile import cpu
        dq, dk, dv = cpu.attention_backward(dout, q, k, v, out, lse, softmax_scale,
                                            window_size=Edges(left, right), softcap=softcap,
                                            alibi_slopes=alibi_slopes)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    raise ValueError(f"flashtile::attention_bwd: unknown backend {backend!r}")


@torch.library.custom_op("flashtile::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  softmax_scale: float, left: Optional[int], right: Optional[int], softcap: float,
                  alibi_slopes: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous, dtypes of q, k, v)."""
    return _backward_impl(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes, backend)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes, backend):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.softmax_scale, ctx.left, ctx.right, ctx.softcap, ctx.backend = softmax_scale, left, right, softcap, backend


def _backward(ctx, dout, dlse):
    # lse is returned for inspection; like FlashAttention, gradients flow through out only
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.left, ctx.right, ctx.softcap,
                               alibi_slopes, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward/backward as the custom ops, without their per-call dispatch overhead."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend):
        out, lse = _forward_impl(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend)
        _setup_context(ctx, (q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend), (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = _backward_impl(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.left, ctx.right, ctx.softcap,
                                    alibi_slopes, ctx.backend)
        return dq, dk, dv, None, None, None, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, left: Optional[int], right: Optional[int],
              softcap: float, alibi_slopes: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """Differentiable attention: the custom op under torch.compile, an autograd.Function in eager."""
    if torch.compiler.is_compiling():
        return attention_fwd(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend)
    return _EagerAttention.apply(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend)
