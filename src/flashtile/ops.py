"""torch.library custom ops for attention, their fake (meta) implementations and autograd.

The ops are opaque to torch.compile (fullgraph works) and carry the chosen backend as a string
argument, so the decision made in dispatch.py is baked into the traced graph. The forward saves
q, k, v, out and lse; the backward recomputes P from lse (no S x S tensor is stored). One op pair
serves dense ([B, S, H, D]) and packed varlen ([total, H, D] + cu_seqlens) inputs.

Eager calls skip the custom-op machinery and go through a plain autograd.Function over the same
implementations: torch.library.custom_op costs tens of microseconds of host time per call
(pytorch/pytorch#176592), which is most of a step at short sequence lengths.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from flashtile.masks import BlockMask, Edges

Tensor = torch.Tensor


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, left: Optional[int], right: Optional[int],
                  softcap: float, alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                  cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[Tensor],
                  dropout_p: float, seed_lo: int, seed_hi: int, backend: str, block_mask=None) -> Tuple[Tensor, Tensor]:
    packed = cu_seqlens_q is not None
    if backend == "triton":
        from flashtile import attention_launch as launch
        if packed:
            return launch.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   softmax_scale, left, right, softcap, alibi_slopes,
                                                   dropout_p=dropout_p, dropout_seed=(seed_lo, seed_hi))
        return launch.attention_forward(q, k, v, softmax_scale, left, right, softcap, alibi_slopes,
                                        block_mask=block_mask, attn_mask=attn_mask, dropout_p=dropout_p,
                                        dropout_seed=(seed_lo, seed_hi))
    if backend == "cpu":
        from flashtile import cpu
        if attn_mask is not None:
            raise ValueError("flashtile::attention_fwd: the cpu backend takes no attn_mask (api.py routes it)")
        kw = dict(window_size=Edges(left, right), softcap=softcap, alibi_slopes=alibi_slopes)
        if packed:
            out, lse = cpu.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, **kw,
                                                    dropout_p=dropout_p, dropout_seed=(seed_lo, seed_hi),
                                                    max_seqlens=(max_seqlen_q, max_seqlen_k))
        else:
            out, lse = cpu.attention_forward(q, k, v, softmax_scale, **kw, block_mask=block_mask, dropout_p=dropout_p,
                                             dropout_seed=(seed_lo, seed_hi))
        return out.contiguous(), lse.contiguous()
    raise ValueError(f"flashtile::attention_fwd: unknown backend {backend!r}")


def _backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   softmax_scale: float, left: Optional[int], right: Optional[int], softcap: float,
                   alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                   max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[Tensor], dropout_p: float,
                   seed_lo: int, seed_hi: int, backend: str, block_mask=None,
                   dbias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    packed = cu_seqlens_q is not None
    if backend == "triton":
        from flashtile import attention_launch as launch
        if packed:
            return launch.attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                    max_seqlen_k, softmax_scale, left, right, softcap, alibi_slopes,
                                                    dropout_p=dropout_p, dropout_seed=(seed_lo, seed_hi))
        return launch.attention_backward(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes,
                                         block_mask=block_mask, attn_mask=attn_mask, dropout_p=dropout_p,
                                         dropout_seed=(seed_lo, seed_hi), dbias=dbias)
    if dbias is not None:
        raise ValueError("flashtile::attention_bwd: only the triton backend computes attn_mask gradients here")
    if backend == "cpu":
        from flashtile import cpu
        kw = dict(window_size=Edges(left, right), softcap=softcap, alibi_slopes=alibi_slopes)
        if packed:
            grads = cpu.attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, **kw,
                                                  dropout_p=dropout_p, dropout_seed=(seed_lo, seed_hi),
                                                  max_seqlens=(max_seqlen_q, max_seqlen_k))
        else:
            grads = cpu.attention_backward(dout, q, k, v, out, lse, softmax_scale, **kw, block_mask=block_mask,
                                           dropout_p=dropout_p, dropout_seed=(seed_lo, seed_hi))
        return tuple(g.contiguous() for g in grads)
    raise ValueError(f"flashtile::attention_bwd: unknown backend {backend!r}")


def _backward_with_bias_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             softmax_scale: float, left: Optional[int], right: Optional[int], softcap: float,
                             alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                             cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                             attn_mask: Optional[Tensor], dropout_p: float, seed_lo: int, seed_hi: int, backend: str,
                             block_mask=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv and the gradient of an additive attn_mask as fp32 [B, Hq, Sq, Sk] (dS of every
    score; the caller sums it over the dims the mask was broadcast along)."""
    B, Sq, Hq, Sk = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
    dbias = torch.zeros(B, Hq, Sq, Sk, dtype=torch.float32, device=q.device)
    dq, dk, dv = _backward_impl(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes,
                                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, dropout_p,
                                seed_lo, seed_hi, backend, block_mask=block_mask, dbias=dbias)
    return dq, dk, dv, dbias


def _block_mask(bm_tensors: List[Tensor], bm_ints: List[int]):
    """The masks.BlockMask that BlockMask.parts flattened for an op's schema (empty lists: none)."""
    return BlockMask.from_parts(bm_tensors, bm_ints) if len(bm_tensors) else None


@torch.library.custom_op("flashtile::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, left: Optional[int], right: Optional[int],
                  softcap: float, alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                  cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[Tensor],
                  dropout_p: float, seed_lo: int, seed_hi: int, backend: str,
                  bm_tensors: List[Tensor], bm_ints: List[int]) -> Tuple[Tensor, Tensor]:
    """out [B, Sq, Hq, Dv] and lse fp32 [B, Hq, Sq]; packed: out [total_q, Hq, Dv], lse [Hq, total_q].
    bm_tensors / bm_ints: a block mask as BlockMask.parts gives it, or two empty lists."""
    return _forward_impl(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, attn_mask, dropout_p, seed_lo, seed_hi, backend,
                         block_mask=_block_mask(bm_tensors, bm_ints))


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, attn_mask, dropout_p, seed_lo, seed_hi, backend,
                        bm_tensors, bm_ints):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("flashtile::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  softmax_scale: float, left: Optional[int], right: Optional[int], softcap: float,
                  alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[Tensor], dropout_p: float,
                  seed_lo: int, seed_hi: int, backend: str, bm_tensors: List[Tensor],
                  bm_ints: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous, shapes and dtypes of q, k, v)."""
    return _backward_impl(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes,
                          cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, dropout_p, seed_lo,
                          seed_hi, backend, block_mask=_block_mask(bm_tensors, bm_ints))


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, dropout_p, seed_lo, seed_hi, backend,
                        bm_tensors, bm_ints):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


@torch.library.custom_op("flashtile::attention_bwd_bias", mutates_args=())
def attention_bwd_bias(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       softmax_scale: float, left: Optional[int], right: Optional[int], softcap: float,
                       alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                       max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[Tensor], dropout_p: float,
                       seed_lo: int, seed_hi: int, backend: str, bm_tensors: List[Tensor],
                       bm_ints: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """attention_bwd plus the attn_mask gradient, fp32 [B, Hq, Sq, Sk] (the attn_mask requires grad)."""
    return _backward_with_bias_impl(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes,
                                    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, dropout_p,
                                    seed_lo, seed_hi, backend, block_mask=_block_mask(bm_tensors, bm_ints))


@attention_bwd_bias.register_fake
def _attention_bwd_bias_fake(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, dropout_p, seed_lo, seed_hi, backend,
                             bm_tensors, bm_ints):
    dq, dk, dv = _attention_bwd_fake(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes,
                                     cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, dropout_p,
                                     seed_lo, seed_hi, backend, bm_tensors, bm_ints)
    dbias = q.new_empty((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dtype=torch.float32)
    return dq, dk, dv, dbias


_N_ARGS = 17  # inputs of attention_fwd before the block-mask parts; backward returns a gradient (or None) for each
_ATTN_MASK = 12  # position of attn_mask among them


def _setup_context(ctx, inputs, output):
    (q, k, v, softmax_scale, left, right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
     max_seqlen_k, attn_mask, dropout_p, seed_lo, seed_hi, backend) = inputs[:_N_ARGS]
    bm_tensors, bm_ints = (list(inputs[_N_ARGS:]) + [[], []])[:2]  # the eager Function has no parts
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, attn_mask, *bm_tensors)
    ctx.args = (softmax_scale, left, right, softcap)
    ctx.lengths = (max_seqlen_q, max_seqlen_k)
    ctx.dropout = (dropout_p, seed_lo, seed_hi)
    ctx.backend = backend
    ctx.bm_ints = bm_ints


def _grads(ctx, dout, backward_fn, **extra):
    """Gradients of every attention_fwd input; backward_fn returns (dq, dk, dv) or, when it is one of
    the bias variants, (dq, dk, dv, dbias fp32 [B, Hq, Sq, Sk])."""
    # lse is returned for inspection; like FlashAttention, gradients flow through out only
    q, k, v, out, lse, alibi_slopes, cu_q, cu_k, attn_mask = ctx.saved_tensors[:9]
    if dout is None:
        dout = torch.zeros_like(out)
    softmax_scale, left, right, softcap = ctx.args
    grads = [None] * _N_ARGS
    result = backward_fn(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes,
                         cu_q, cu_k, *ctx.lengths, attn_mask, *ctx.dropout, ctx.backend, **extra)
    grads[:3] = result[:3]
    if len(result) == 4:  # dS of every (b, h, i, j), summed back over the dims the bias was broadcast along
        grads[_ATTN_MASK] = result[3].sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return tuple(grads)


def _backward(ctx, dout, dlse):
    # the op, so torch.compile traces the backward too; no gradients for the block-mask parts
    bm_tensors = list(ctx.saved_tensors[9:])
    op = attention_bwd_bias if ctx.needs_input_grad[_ATTN_MASK] else attention_bwd
    grads = _grads(ctx, dout, op, bm_tensors=bm_tensors, bm_ints=ctx.bm_ints)
    # torch checks that the gradients have the inputs' structure: a list per tensor list, and one None
    # for a non-empty int list (an empty list stays a list)
    return grads + ([None] * len(bm_tensors), None if ctx.bm_ints else [])


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward/backward as the custom ops, without their per-call dispatch overhead.

    A masks.BlockMask goes first, as the object (the ops take it flattened by BlockMask.parts).
    """

    @staticmethod
    def forward(ctx, block_mask, *inputs):
        out, lse = _forward_impl(*inputs, block_mask=block_mask)
        _setup_context(ctx, inputs, (out, lse))
        ctx.block_mask = block_mask
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        # needs_input_grad counts block_mask first
        fn = _backward_with_bias_impl if ctx.needs_input_grad[1 + _ATTN_MASK] else _backward_impl
        return (None,) + _grads(ctx, dout, fn, block_mask=ctx.block_mask)


def attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, left: Optional[int], right: Optional[int],
              softcap: float, alibi_slopes: Optional[Tensor], backend: str,
              cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
              max_seqlen_q: int = 0, max_seqlen_k: int = 0, block_mask=None,
              attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              dropout_seed: Tuple[int, int] = (0, 0)) -> Tuple[Tensor, Tensor]:
    """Differentiable attention: the custom op under torch.compile, an autograd.Function in eager."""
    args = (q, k, v, softmax_scale, left, right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, attn_mask, float(dropout_p), dropout_seed[0], dropout_seed[1], backend)
    if torch.compiler.is_compiling():
        # the op schema takes tensors and ints: a block mask travels flattened
        return attention_fwd(*args, *(block_mask.parts() if block_mask is not None else ([], [])))
    return _EagerAttention.apply(block_mask, *args)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, softmax_scale: float, left: Optional[int], right: Optional[int],
                     softcap: float, alibi_slopes: Optional[Tensor], backend: str, dropout_p: float = 0.0,
                     dropout_seed: Tuple[int, int] = (0, 0)) -> Tuple[Tensor, Tensor]:
    """Packed sequences: q [total_q, Hq, D] -> out [total_q, Hq, Dv], lse fp32 [Hq, total_q]."""
    return attention(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, backend,
                     cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                     dropout_p=dropout_p, dropout_seed=dropout_seed)
