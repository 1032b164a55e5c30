"""Plain PyTorch attention: the oracle every implementation is checked against.

It materialises the full ``[B, H, Sq, Sk]`` score matrix, so it is for checking, not for speed. It is
differentiable through torch autograd; tests get reference gradients by calling ``backward`` through it.

Also home of the tolerance rule (FlashAttention's): an implementation passes when its error against
the high-precision oracle is at most ``factor`` times the error that the same math in the input dtype
makes, plus ``atol``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .masks import Window, visibility_mask
from .masks import BlockMask


def _work_dtype(t: torch.Tensor, upcast: bool) -> torch.dtype:
    """When upcasting: float64 on CPU and for float32 inputs, float32 for half inputs on a GPU (where it
    is 2^13x more precise than the inputs and much faster); else the input dtype. A float32 oracle for
    float32 inputs would make the tolerance rule's low-precision baseline equal to the oracle, leaving
    only its atol (tests/test_fuzz.py found sums of 535 rows and lse near 60 off by a few float32 ulps)."""
    if not upcast:
        return t.dtype
    return torch.float64 if t.device.type == "cpu" or t.dtype == torch.float32 else torch.float32


def alibi_bias(
    alibi_slopes: torch.Tensor,
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """ALiBi bias ``-slope * |i + Sk - Sq - j|`` shaped ``[B or 1, Hq, Sq, Sk]``.

    ``alibi_slopes`` is ``[Hq]`` or ``[B, Hq]`` (float32 in the public API).
    """
    slopes = alibi_slopes.to(device=device, dtype=dtype)
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0)
    if slopes.dim() != 2 or slopes.shape[0] not in (1, batch):
        raise ValueError(f"alibi_slopes: expected shape [Hq] or [B, Hq], got {tuple(alibi_slopes.shape)}")
    qi = torch.arange(seqlen_q, device=device).unsqueeze(1)
    kj = torch.arange(seqlen_k, device=device).unsqueeze(0)
    dist = (qi + (seqlen_k - seqlen_q) - kj).abs().to(dtype)
    return -slopes[:, :, None, None] * dist


def _and_block_mask(
    visible: torch.Tensor,
    block_mask: BlockMask,
    batch: int,
    heads_q: int,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device,
) -> torch.Tensor:
    """``visible`` ``[Sq, Sk]`` AND the block mask's element mask: bool ``[B|1, Hq|1, Sq, Sk]``."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a flashtile.masks.BlockMask or None, got {type(block_mask).__name__}")
    block_mask.check_compatible(batch, heads_q, seqlen_q, seqlen_k, device=device)
    return visible & block_mask.dense()


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    upcast: bool = True,
    block_mask: Optional[BlockMask] = None,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact attention by the book.

    Shapes: q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]`` with ``Hq % Hkv == 0``
    (query head ``h`` uses key/value head ``h // (Hq // Hkv)``).
    Returns out ``[B, Sq, Hq, Dv]`` and lse ``[B, Hq, Sq]`` (natural log of the softmax denominator,
    including the scale, softcap and bias).

    Order of operations (FlashAttention's): ``s = scale * q k^T``; ``s = softcap * tanh(s / softcap)``
    if softcap > 0; ``s += -slope * |i + Sk - Sq - j|`` with ALiBi; masked keys get ``-inf``;
    softmax over keys; ``@ v``.

    ``upcast=True`` computes in float64 (float32 for half inputs on a GPU) and returns out in that dtype and lse in
    it too. ``upcast=False`` does the same math in the input dtype (the "low-precision torch" baseline
    of the tolerance rule) and returns out in the input dtype, lse in float32.
    A fully masked row gives out 0 and lse -inf, with zero (finite) gradients.
    ``dropout_mask`` (bool keep pattern ``[B, Hq, Sq, Sk]``, e.g. the one flash_attn_func returns):
    probabilities are multiplied by it and by ``1 / (1 - dropout_p)`` before ``@ v``.
    ``attn_mask`` (torch SDPA's, broadcastable to ``[B, Hq, Sq, Sk]``): bool ANDs into the visibility,
    float is added to the scores after softcap and ALiBi.
    ``block_mask`` (masks.BlockMask for ``[B|1, Hq|1, Sq, Sk]``): its ``dense()`` mask is ANDed into
    the causal / window visibility.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention_ref: q, k, v must be 4-D [batch, seqlen, heads, head_dim]")
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"attention_ref: Hq ({heads_q}) must be a multiple of Hkv ({heads_kv})")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    group = heads_q // heads_kv

    dtype = _work_dtype(q, upcast)
    # [B, S, H, D] -> [B, H, S, D]; GQA by repeating each key/value head for its query heads.
    qw = q.to(dtype).transpose(1, 2)
    kw = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vw = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)

    # Scale q before the product (as FlashAttention's reference does) so low precision overflows later.
    scores = torch.matmul(qw * softmax_scale, kw.transpose(-1, -2))
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        scores = scores + alibi_bias(
            alibi_slopes, batch, seqlen_q, seqlen_k, dtype=dtype, device=q.device
        )
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.to(dtype)  # torch SDPA's additive bias, broadcast to [B, Hq, Sq, Sk]
    visible = visibility_mask(seqlen_q, seqlen_k, causal, window_size, device=q.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask  # torch SDPA's bool mask: True = may attend
    if block_mask is not None:
        visible = _and_block_mask(visible, block_mask, batch, heads_q, seqlen_q, seqlen_k, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))

    # Softmax by hand so that all -inf rows give zeros, not NaN, in value and gradient. The row max
    # is detached: softmax and lse are invariant to it, so no gradient is lost.
    row_max = scores.amax(dim=-1, keepdim=True).detach() if seqlen_k > 0 else scores.new_full(
        (*scores.shape[:-1], 1), float("-inf")
    )
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    empty = denom == 0  # NaN rows compare False and keep propagating NaN
    safe_denom = torch.where(empty, torch.ones_like(denom), denom)
    if not upcast and dtype == torch.float32:
        probs = _probs_from_lse(scores, torch.log(safe_denom) + row_max, empty)
    else:
        probs = probs / safe_denom
    if dropout_mask is not None:  # the keep pattern [B, Hq, Sq, Sk]; lse stays the undropped one
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs, vw).transpose(1, 2)
    lse = torch.where(
        empty, torch.full_like(denom, float("-inf")), torch.log(safe_denom) + row_max
    ).squeeze(-1)

    if not upcast:
        out = out.to(q.dtype)
        lse = lse.float()
    return out, lse


def _probs_from_lse(scores: torch.Tensor, lse: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """float32 softmax the way FlashAttention's backward recomputes it: P = 2^(s log2(e) - lse log2(e)).

    The float32 low-precision baseline uses it (fp16 / bf16 keep torch's softmax): subtracting two
    rounded log2-domain values of size |s| and |lse| errs by about an ulp of that size, so P carries a
    relative error of a few ulps of |lse| that torch's exp(s - max) / sum does not have. Found by
    tests/test_fuzz.py on an H200: 304 queries over 4 keys, D=1, twice the default scale put dV 10%
    past a bound built on torch's softmax (test_found_by_fuzz_sdpa). This is the kernels' algorithm
    in the input precision, FlashAttention's rule ("3 x the error of the same computation in low
    precision"). A row with one visible key is still exact here (lse equals its score), so it does not
    cover a lone key whose score the kernels round differently from their stored lse; the tests'
    oracle gives fp32 dV a floor for that (tests/oracle.py: value_sum_floor).
    """
    log2e = 1.4426950408889634
    probs = torch.exp2(scores * log2e - lse * log2e)
    return torch.where(empty, torch.zeros_like(probs), probs)


def _abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in float64, treating equal values (incl. equal infinities) as exact.

    Positions where ref is NaN are ignored; a NaN in ``a`` where ref is not NaN counts as inf.
    """
    if a.numel() == 0:
        return 0.0
    a = a.detach().to(torch.float64)
    ref = ref.detach().to(device=a.device, dtype=torch.float64)
    diff = (a - ref).abs()
    diff = torch.where(a == ref, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(ref), torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    return float(diff.max())


def check_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    lowprec: torch.Tensor,
    factor: float = 2.0,
    atol: float = 1e-5,
) -> Tuple[bool, float, float]:
    """FlashAttention's tolerance rule: ``max|out - ref| <= factor * max|lowprec - ref| + atol``.

    ``ref`` is the high-precision oracle (``attention_ref(upcast=True)``), ``lowprec`` the same math in
    the input dtype (``upcast=False``). Compared in float64. Any NaN in ``out`` where ``ref`` is not
    NaN, or any infinite error, fails. Use factor 2 for outputs, 3 for gradients.
    Returns ``(ok, err, bound)``.
    """
    if out.shape != ref.shape or lowprec.shape != ref.shape:
        raise ValueError(
            f"check_close: shapes differ: out {tuple(out.shape)}, ref {tuple(ref.shape)}, "
            f"lowprec {tuple(lowprec.shape)}"
        )
    err = _abs_err(out, ref)
    bound = factor * _abs_err(lowprec, ref) + atol
    ok = math.isfinite(err) and err <= bound
    return ok, err, bound


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    **kw,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The oracle for packed sequences: ``attention_ref`` on each sequence alone.

    q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, v ``[total_k, Hkv, Dv]``; sequence b owns rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k / v.
    Keyword arguments are ``attention_ref``'s (softmax_scale, causal, window_size, softcap,
    alibi_slopes, upcast, dropout_p, dropout_mask); ``alibi_slopes`` may be ``[Hq]`` or ``[B, Hq]``
    (row b for sequence b) and ``dropout_mask`` is the padded ``[B, Hq, max Sq, max Sk]`` keep pattern.
    Returns out ``[total_q, Hq, Dv]`` and lse ``[Hq, total_q]`` (FlashAttention-2's varlen layout),
    in the dtypes ``attention_ref`` gives for ``upcast``. Differentiable.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("attention_varlen_ref: q, k, v must be 3-D [total_tokens, heads, head_dim]")
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError(f"attention_varlen_ref: cu_seqlens_q has {len(cq)} entries, cu_seqlens_k {len(ck)}")
    slopes = kw.pop("alibi_slopes", None)
    keep = kw.pop("dropout_mask", None)  # padded [B, Hq, >= max Sq, >= max Sk], as flash_attn_varlen_func returns
    upcast = kw.get("upcast", True)
    outs, lses = [], []
    for b in range(len(cq) - 1):
        s = slopes[b] if slopes is not None and slopes.dim() == 2 else slopes
        if keep is not None:
            kw["dropout_mask"] = keep[b:b + 1, :, :cq[b + 1] - cq[b], :ck[b + 1] - ck[b]]
        o, l = attention_ref(q[cq[b]:cq[b + 1]].unsqueeze(0), k[ck[b]:ck[b + 1]].unsqueeze(0),
                             v[ck[b]:ck[b + 1]].unsqueeze(0), alibi_slopes=s, **kw)
        outs.append(o[0])
        lses.append(l[0])
    if not outs:  # no sequence at all
        dtype = _work_dtype(q, upcast)
        return (q.new_zeros((0, q.shape[1], v.shape[2]), dtype=dtype if upcast else q.dtype),
                q.new_zeros((q.shape[1], 0), dtype=dtype if upcast else torch.float32))
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
