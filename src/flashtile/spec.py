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

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for MHA, heads_q for MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def diagonal_offset(self) -> int:
        """Bottom-right alignment: query i lines up with key i + (seqlen_k - seqlen_q)."""
        return self.seqlen_k - self.seqlen_q

    @property
    def is_empty(self) -> bool:
        return self.batch == 0 or self.seqlen_q == 0 or self.heads_q == 0

    @property
    def is_masked(self) -> bool:
        return self.left is not None or self.right is not None


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
