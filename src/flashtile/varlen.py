"""flash_attn_varlen_func: attention over packed variable-length sequences (FlashAttention-2's varlen).

Shape contracts (packed layout; B sequences, offsets in cu_seqlens):
  q   [total_q, heads_q, head_dim]          sequence b = rows cu_seqlens_q[b] : cu_seqlens_q[b + 1]
  k   [total_k, heads_kv, head_dim]         sequence b = rows cu_seqlens_k[b] : cu_seqlens_k[b + 1]
  v   [total_k, heads_kv, head_dim_v]
  cu_seqlens_q, cu_seqlens_k   int32 [B + 1], 0 = first, non-decreasing, last = total
  out [total_q, heads_q, head_dim_v]        lse float32 [heads_q, total_q]
Each sequence is attended on its own, with flash_attn_func's semantics (bottom-right causal per
sequence, window, softcap, ALiBi); the result equals running every sequence alone.
"""

from __future__ import annotations

import numbers
import weakref
from typing import Dict, List, Optional, Tuple, Union

import torch

from flashtile import dispatch, dropout, ops, reference
from flashtile.api import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    UnsupportedError,
    _check_scale,
    _check_softcap,
    _check_window,
    _check_alibi,
    _check_dropout,
    _last_dim_contiguous,
)
from flashtile.masks import Edges
from flashtile.spec import default_softmax_scale, mask_edges

Tensor = torch.Tensor


def _check_tensor3(name: str, t: object) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have 3 dims [total_tokens, heads, head_dim] (packed sequences), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    return t


def _check_qkv_varlen(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor3(name, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"k and v must have the same total_k (dim 0), got k {k.shape[0]}, v {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {k.shape[1]}, v {v.shape[1]}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"head_dim of q ({q.shape[2]}) and k ({k.shape[2]}) must match")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"heads of q ({hq}) must be a positive multiple of heads of k/v ({hkv}) (GQA/MQA)")
    for name, d in (("q/k head_dim", q.shape[2]), ("v head_dim", v.shape[2])):
        if d < 1:
            raise ValueError(f"{name} must be >= 1, got {d}")
        if d > MAX_HEAD_DIM:
            raise UnsupportedError(f"{name} = {d} > {MAX_HEAD_DIM} is not supported")


# Offsets already read to the host, per live cu_seqlens tensor: reading them costs a device -> host
# sync, and a model calls attention with the same cu_seqlens in every layer. An entry is used only
# while the tensor object is alive and its version counter (bumped by every in-place write) is
# unchanged, so a hit always describes the tensor's current contents.
_OFFSETS: Dict[int, Tuple["weakref.ref[Tensor]", int, List[int]]] = {}  # id(cu) -> (ref, version, offsets)


def _host_offsets(cu: Tensor) -> List[int]:
    try:
        version = cu._version
    except RuntimeError:  # inference-mode tensors keep no version counter: read every time
        return [int(x) for x in cu.tolist()]
    key = id(cu)
    hit = _OFFSETS.get(key)
    if hit is not None and hit[0]() is cu and hit[1] == version:
        return hit[2]
    offsets = [int(x) for x in cu.tolist()]
    # the entry leaves with the tensor (ids are reused only after an object dies)
    _OFFSETS[key] = (weakref.ref(cu, lambda _ref, key=key: _OFFSETS.pop(key, None)), version, offsets)
    return offsets


def _check_cu_seqlens(name: str, cu: object, total: int, total_name: str, device: torch.device) -> List[int]:
    """Offsets as host ints: int32 1-D on q's device, cu[0] == 0, non-decreasing, cu[-1] == total."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be a 1-D tensor [batch + 1] of offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    offsets = _host_offsets(cu)
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
    for b in range(len(offsets) - 1):
        if offsets[b + 1] < offsets[b]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{b + 1}] = {offsets[b + 1]} "
                             f"< {name}[{b}] = {offsets[b]}")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {offsets[-1]}")
    return offsets


def _check_max_seqlen(name: str, max_seqlen: object, offsets: List[int], cu_name: str) -> int:
    if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool):
        raise TypeError(f"{name} must be an int, got {type(max_seqlen).__name__}")
    longest = max((offsets[b + 1] - offsets[b] for b in range(len(offsets) - 1)), default=0)
    if max_seqlen < longest:
        raise ValueError(f"{name} = {int(max_seqlen)} is smaller than the longest sequence in {cu_name} ({longest})")
    return int(max_seqlen)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """Exact attention over packed variable-length sequences (FlashAttention-2's flash_attn_varlen_func).

    q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv] with Hq % Hkv == 0; sequence b is
    rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v.
    cu_seqlens_q / cu_seqlens_k: int32 [B + 1] on q's device, starting at 0, non-decreasing, ending at
    total_q / total_k. max_seqlen_q / max_seqlen_k: ints >= the longest query / key sequence.
    Returns out [total_q, Hq, Dv] in q's dtype, or with return_attn_probs=True the tuple
    (out, lse, keep) with lse float32 [Hq, total_q] (natural log) and, with dropout, keep the bool
    pattern [B, Hq, max_seqlen_q, max_seqlen_k] (sequence b uses keep[b, :, :Sq_b, :Sk_b]; None
    without dropout). dropout_p as in flash_attn_func (seed from torch's generator, regenerated in
    the backward).
    Per sequence the semantics are flash_attn_func's: causal and window_size are aligned to that
    sequence's bottom-right corner (query i sees key j iff j <= i + Sk_b - Sq_b when causal);
    softcap; alibi_slopes float32 [Hq] or [B, Hq]. Queries of a sequence with no keys give out 0 and
    lse -inf. The backward is always deterministic (``deterministic`` is accepted and ignored).
    """
    _check_qkv_varlen(q, k, v)
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "total_q (q.shape[0])", q.device)
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "total_k (k.shape[0])", q.device)
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {len(cu_q)} and {len(cu_k)}")
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_q, "cu_seqlens_q")
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_k, "cu_seqlens_k")
    _check_scale(softmax_scale)
    window = _check_window(window_size)
    dropout_p = _check_dropout(dropout_p, (len(cu_q) - 1) * q.shape[1] * max_seqlen_q)
    softcap = _check_softcap(softcap)
    alibi_slopes = _check_alibi(alibi_slopes, q.device, len(cu_q) - 1, q.shape[1],
                                " (B = len(cu_seqlens_q) - 1)")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    scale = default_softmax_scale(q.shape[2], softmax_scale)
    # FlashAttention's edges are relative to each sequence's bottom-right diagonal, so one
    # (left, right) pair serves every sequence (the sequence lengths do not enter).
    left, right = mask_edges(max_seqlen_q, max_seqlen_k, bool(causal), window)

    backend = dispatch.resolve_backend(q.device)
    seed = dropout.new_seed() if dropout_p > 0 else (0, 0)
    keep = None  # the padded keep pattern [B, Hq, max_seqlen_q, max_seqlen_k]
    if dropout_p > 0 and (return_attn_probs or backend == "reference"):
        keep = dropout.pattern(len(cu_q) - 1, q.shape[1], max_seqlen_q, max_seqlen_k, seed, dropout_p, q.device)
    if backend == "reference":  # the oracle per sequence, differentiable through torch autograd
        out, lse = reference.attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=scale,
                                                  window_size=Edges(left, right), softcap=softcap,
                                                  alibi_slopes=alibi_slopes, upcast=True, dropout_p=dropout_p,
                                                  dropout_mask=keep)
        out, lse = out.to(q.dtype), lse.float()
    else:
        out, lse = ops.attention_varlen(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                                        max_seqlen_q, max_seqlen_k, scale, left, right, softcap, alibi_slopes,
                                        backend, dropout_p=dropout_p, dropout_seed=seed)
    if return_attn_probs:
        return out, lse, keep
    return out
