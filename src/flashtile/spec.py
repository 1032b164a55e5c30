"""AttentionSpec: the single normalised description of one attention call.

api.py builds one spec per call after validation; dispatch.py, the custom ops and the launchers read
it. Everything in it is a plain Python value (hashable), so it can travel through torch.library ops
as scalar arguments and key the tuning tables.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

from flashtile.masks import Edges, effective_window


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Shapes and feature flags of one attention call, in flash layout.

    Tensors are q ``[batch, seqlen_q, heads_q, head_dim]``, k ``[batch, seqlen_k, heads_kv, head_dim]``,
    v ``[batch, seqlen_k, heads_kv, head_dim_v]``; out ``[batch, seqlen_q, heads_q, head_dim_v]``;
    lse float32 ``[batch, heads_q, seqlen_q]`` (natural log).
    """

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    dtype_name: str  # "float16" | "bfloat16" | "float32"
    softmax_scale: float
    causal: bool = False
    # Visibility edges relative to the bottom-right diagonal (key j visible to query i iff
    # i + off - left <= j <= i + off + right, off = seqlen_k - seqlen_q); None = unbounded.
    # causal is right = 0; torch SDPA's top-left causal is right = seqlen_q - seqlen_k.
    left: Optional[int] = None
    right: Optional[int] = None
    softcap: float = 0.0  # > 0: scores become softcap * tanh(scores / softcap)
    has_alibi: bool = False  # the slopes tensor travels beside the spec

    @classmethod
    def from_tensors(cls, q, k, v, softmax_scale: Optional[float], causal: bool, edges: Edges,
                     softcap: float = 0.0, has_alibi: bool = False) -> "AttentionSpec":
        """The spec of validated flash-layout q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]."""
        B, Sq, Hq, D = q.shape
        return cls(batch=B, seqlen_q=Sq, seqlen_k=k.shape[1], heads_q=Hq, heads_kv=k.shape[2], head_dim=D,
                   head_dim_v=v.shape[3], dtype_name=str(q.dtype).split(".")[-1],
                   softmax_scale=default_softmax_scale(D, softmax_scale), causal=bool(causal),
                   left=edges.left, right=edges.right, softcap=softcap, has_alibi=has_alibi)


def mask_edges(seqlen_q: int, seqlen_k: int, causal: bool, window_size: Tuple[int, int],
               top_left: bool = False) -> Edges:
    """Edges from FlashAttention's (causal, window_size), or torch SDPA's top-left is_causal."""
    edges = effective_window(causal and not top_left, window_size)
    if causal and top_left:
        edges = Edges(edges.left, seqlen_q - seqlen_k)
    return edges


def default_softmax_scale(head_dim: int, softmax_scale: Optional[float]) -> float:
    """FlashAttention's default: 1 / sqrt(head_dim)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return float(softmax_scale)
