"""Public attention functions: validate, normalise layout by strides (no copies), build one spec,
dispatch.

Shape contracts (flash layout):
  q   [batch, seqlen_q, heads_q, head_dim]
  k   [batch, seqlen_k, heads_kv, head_dim]
  v   [batch, seqlen_k, heads_kv, head_dim_v]
  out [batch, seqlen_q, heads_q, head_dim_v]        lse float32 [batch, heads_q, seqlen_q]
heads_q % heads_kv == 0 (GQA / MQA). scaled_dot_product_attention takes torch's [B, H, S, D].
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from flashtile import dispatch, dropout, ops, reference
from flashtile.errors import UnsupportedError
from flashtile.masks import BlockMask, Edges
from flashtile.spec import AttentionSpec, mask_edges

Tensor = torch.Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 2048  # > 256 runs the wide-head (split-D) kernels


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dims [batch, seqlen, heads, head_dim], got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    return t


def _last_dim_contiguous(t: Tensor) -> Tensor:
    """Kernels index any strides except the last dim; copy only when that one is not 1."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"batch size differs: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"k and v must have the same seqlen, got k {k.shape[1]}, v {v.shape[1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must have the same number of heads, got k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"head_dim of q ({q.shape[3]}) and k ({k.shape[3]}) must match")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 and hq != 0 or hkv != 0 and hq % hkv != 0:
        raise ValueError(f"heads of q ({hq}) must be a multiple of heads of k/v ({hkv}) (GQA/MQA)")
    for name, d in (("q/k head_dim", q.shape[3]), ("v head_dim", v.shape[3])):
        if d < 1:
            raise ValueError(f"{name} must be >= 1, got {d}")
        if d > MAX_HEAD_DIM:
            raise UnsupportedError(f"{name} = {d} > {MAX_HEAD_DIM} is not supported")


def _check_scale(softmax_scale: Optional[float]) -> None:
    if softmax_scale is not None and (not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")


def _check_window(window_size: Tuple[int, int]) -> Tuple[int, int]:
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    for side, w in (("left", left), ("right", right)):
        if not isinstance(w, numbers.Integral) or w < -1:
            raise ValueError(f"window_size {side} must be an int >= -1 (-1 = unbounded), got {w!r}")
    return int(left), int(right)


def _not_yet(name: str, value: object, issue: str) -> None:
    raise UnsupportedError(f"{name}={value!r} is not supported yet ({issue} is planned)")


def _check_dropout(dropout_p: float, query_rows: int) -> float:
    """dropout_p as a float; query_rows: B * Hq * Sq of the dropout pattern (varlen: Sq the maximum)."""
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and query_rows > dropout.MAX_ROWS:
        raise UnsupportedError(f"dropout_p > 0 with {query_rows} query rows (batch x heads x queries): at most "
                               f"{dropout.MAX_ROWS} (the kernels number dropout rows in 32 bits)")
    return float(dropout_p)


def _run(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, alibi_slopes: Optional[Tensor] = None,
         block_mask: Optional[BlockMask] = None, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
         dropout_seed: Tuple[int, int] = (0, 0)) -> Tuple[Tensor, Tensor]:
    """Dispatch one normalised call; returns out [B, Sq, Hq, Dv] and lse [B, Hq, Sq]."""
    backend = dispatch.resolve_backend(q.device)
    # an attn_mask is itself S x S, so on the CPU the plain (S x S) oracle costs no more memory order
    if backend == "reference" or (backend == "cpu" and attn_mask is not None):
        out, lse = reference.attention_ref(q, k, v, softmax_scale=spec.softmax_scale,
                                           window_size=Edges(spec.left, spec.right), softcap=spec.softcap,
                                           alibi_slopes=alibi_slopes, upcast=True, block_mask=block_mask,
                                           attn_mask=attn_mask, dropout_p=dropout_p,
                                           dropout_mask=dropout.pattern(spec.batch, spec.heads_q, spec.seqlen_q,
                                                                        spec.seqlen_k, dropout_seed, dropout_p,
                                                                        q.device) if dropout_p > 0 else None)
        return out.to(q.dtype), lse.float()
    return ops.attention(q, k, v, spec.softmax_scale, spec.left, spec.right, spec.softcap, alibi_slopes,
                         backend, block_mask=block_mask, attn_mask=attn_mask, dropout_p=dropout_p,
                         dropout_seed=dropout_seed)


def _check_attn_mask(attn_mask: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """torch SDPA's attn_mask: bool (True = may attend) or a float bias, broadcastable to [B, Hq, Sq, Sk]."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {q.device}")
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    try:
        if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, full) != torch.Size(full):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                         f"[B, H, Sq, Sk] = {list(full)}") from None
    return attn_mask


def _check_block_mask(block_mask: Optional[BlockMask], q: Tensor, k: Tensor) -> Optional[BlockMask]:
    """A masks.BlockMask whose shape fits [B, Hq, Sq, Sk] (B and H may be 1: broadcast)."""
    if block_mask is None:
        return None
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a flashtile.BlockMask, got {type(block_mask).__name__}")
    block_mask.check_compatible(q.shape[0], q.shape[2], q.shape[1], k.shape[1], device=q.device)
    return block_mask


def _check_softcap(softcap: float) -> float:
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool) or not softcap >= 0:
        raise ValueError(f"softcap must be a float >= 0 (0 = off), got {softcap!r}")
    return float(softcap)


def _check_alibi(alibi_slopes: Optional[Tensor], device: torch.device, batch: int, heads: int,
                 batch_note: str = "") -> Optional[Tensor]:
    """ALiBi slopes: float32 [Hq] or [B, Hq] on the inputs' device (FlashAttention-2's contract)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape [Hq] = [{heads}] or [B, Hq] = [{batch}, {heads}]"
                         f"{batch_note}, got {list(alibi_slopes.shape)}")
    return alibi_slopes.detach().contiguous()


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_mask: Optional[BlockMask] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """Exact attention softmax(q k^T * softmax_scale) v without materialising the scores.

    FlashAttention-2's signature and semantics. q [B, Sq, Hq, D], k [B, Sk, Hkv, D],
    v [B, Sk, Hkv, Dv] with Hq % Hkv == 0; returns out [B, Sq, Hq, Dv] in q's dtype, or with
    return_attn_probs=True the tuple (out, lse, None) with lse float32 [B, Hq, Sq] (natural log).
    causal: key j visible to query i iff j <= i + Sk - Sq (bottom-right aligned).
    window_size=(left, right), -1 unbounded: i + Sk - Sq - left <= j <= i + Sk - Sq + right.
    softcap > 0: scores s = scale * q.k become softcap * tanh(s / softcap) before masking.
    alibi_slopes: float32 [Hq] or [B, Hq]; adds -slope * |i + Sk - Sq - j| to the scores.
    block_mask: a flashtile.BlockMask for [B|1, Hq|1, Sq, Sk]; keys outside it are masked, and empty
    blocks are never loaded. It composes with causal / window (both must allow a key).
    dropout_p: probability of dropping an attention weight (kept ones are scaled by 1 / (1 - p)); the
    random bits come from a seed drawn from torch's default generator (torch.manual_seed reproduces
    them), and the backward regenerates them. With return_attn_probs=True the third element is the
    bool keep pattern [B, Hq, Sq, Sk] (None without dropout), so the exact function can be checked.
    A query row that sees no key gives out 0 and lse -inf. The backward is always deterministic.
    """
    _check_qkv(q, k, v)
    _check_scale(softmax_scale)
    window = _check_window(window_size)
    dropout_p = _check_dropout(dropout_p, math.prod(q.shape[:-1]))
    softcap = _check_softcap(softcap)
    alibi_slopes = _check_alibi(alibi_slopes, q.device, q.shape[0], q.shape[2])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, Sq, Hq, _ = q.shape
    Sk = k.shape[1]
    spec = AttentionSpec.from_tensors(q, k, v, softmax_scale, causal, mask_edges(Sq, Sk, bool(causal), window),
                                      softcap, alibi_slopes is not None)
    block_mask = _check_block_mask(block_mask, q, k)
    seed = dropout.new_seed() if dropout_p > 0 else (0, 0)
    out, lse = _run(q, k, v, spec, alibi_slopes, block_mask, dropout_p=dropout_p, dropout_seed=seed)
    if return_attn_probs:
        pattern = dropout.pattern(B, Hq, Sq, Sk, seed, dropout_p, q.device) if dropout_p > 0 else None
        return out, lse, pattern
    return out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    block_mask: Optional[BlockMask] = None,
) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention on 4-D inputs.

    query [B, Hq, Sq, D], key [B, Hkv, Sk, D], value [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv].
    Hkv != Hq needs enable_gqa=True, as in torch. is_causal follows torch: top-left aligned
    (query i sees key j iff j <= i), which differs from flash_attn_func when Sq != Sk.
    attn_mask: as torch defines it, broadcastable to [B, Hq, Sq, Sk]: bool (True = may attend) or a
    float bias added to the scores; a float bias that requires grad gets its gradient (eager mode
    and torch.compile).
    block_mask: a flashtile.BlockMask (FlexAttention's idea), as in flash_attn_func.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    dropout_p = _check_dropout(dropout_p, math.prod(query.shape[:-1]))
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be set (torch's rule)")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for GQA")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    _check_qkv(q, k, v)
    _check_scale(scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    edges = mask_edges(q.shape[1], k.shape[1], bool(is_causal), (-1, -1), top_left=True)
    spec = AttentionSpec.from_tensors(q, k, v, scale, is_causal, edges)
    block_mask = _check_block_mask(block_mask, q, k)
    attn_mask = _check_attn_mask(attn_mask, q, k)
    seed = dropout.new_seed() if dropout_p > 0 else (0, 0)
    out, _ = _run(q, k, v, spec, block_mask=block_mask, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=seed)
    return out.transpose(1, 2)
