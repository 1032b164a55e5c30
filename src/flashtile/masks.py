"""Which keys a query may attend to.

The element rule is FlashAttention 2's, aligned bottom-right: with ``off = seqlen_k - seqlen_q`` query
``i`` lines up with key ``i + off``, and a window ``(left, right)`` (``-1`` = unbounded on that side)
keeps key ``j`` iff ``i + off - left <= j <= i + off + right``. ``causal`` is the window with
``right = 0`` (any given ``left`` is kept, any given ``right`` is replaced).

Every implementation (reference, tiled CPU path, Triton kernels) must agree with
``visibility_mask``; ``key_block_range`` and ``block_fully_visible`` let tiled code skip whole
blocks and drop the element mask on blocks that need none.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch


class Edges(NamedTuple):
    """Normalised visibility edges around the bottom-right diagonal; None = unbounded.

    Unlike FlashAttention's window_size, any int is a real edge (torch SDPA's top-left causal with
    Sk > Sq is right = Sq - Sk < 0). Passed as ``window_size`` it is taken as is (causal already folded).
    """

    left: Optional[int]
    right: Optional[int]


Window = Union[Tuple[int, int], Edges]


def effective_window(causal: bool, window_size: Window = (-1, -1)) -> Edges:
    """Edges from FlashAttention's (causal, window_size): negative sides are unbounded, causal is right = 0."""
    if isinstance(window_size, Edges):
        return window_size
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return Edges(left if left >= 0 else None, right if right >= 0 else None)


def visibility_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window_size: Window = (-1, -1),
    *,
    q_start: int = 0,
    q_len: Optional[int] = None,
    k_start: int = 0,
    k_len: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Element visibility for queries ``[q_start, q_start + q_len)`` x keys ``[k_start, k_start + k_len)``.

    Returns a bool tensor ``[q_len, k_len]`` (True = key visible to that query). ``q_len`` defaults to
    the rest of the queries (``seqlen_q - q_start``), ``k_len`` to the rest of the keys. The tile may
    reach past the sequence ends; the rule is applied to the indices as given.
    """
    if q_len is None:
        q_len = max(seqlen_q - q_start, 0)
    if k_len is None:
        k_len = max(seqlen_k - k_start, 0)
    left, right = effective_window(causal, window_size)
    off = seqlen_k - seqlen_q
    if left is None and right is None:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    qi = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1)
    kj = torch.arange(k_start, k_start + k_len, device=device).unsqueeze(0)
    # rel = how far key j sits right of the diagonal key of query i.
    rel = kj - (qi + off)
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if left is not None:
        mask &= rel >= -left
    if right is not None:
        mask &= rel <= right
    return mask


def key_block_range(
    q_lo: int,
    q_hi: int,
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window_size: Window = (-1, -1),
) -> Tuple[int, int]:
    """Keys ``[k_lo, k_hi)`` that at least one query in ``[q_lo, q_hi)`` can see.

    Clamped to ``[0, seqlen_k]``; ``k_hi == k_lo`` means no key is visible (every row of the block is
    fully masked). Keys outside the range are invisible to every query of the block, so tiled code
    may skip them; keys inside may still be masked element-wise.
    """
    if q_hi <= q_lo or seqlen_k <= 0:
        return (0, 0)
    left, right = effective_window(causal, window_size)
    off = seqlen_k - seqlen_q
    # The lower bound grows with i, so the first query sees furthest left; the upper bound also
    # grows with i, so the last query sees furthest right.
    k_lo = q_lo + off - left if left is not None else 0
    k_hi = (q_hi - 1) + off + right + 1 if right is not None else seqlen_k
    k_lo = min(max(k_lo, 0), seqlen_k)
    k_hi = min(max(k_hi, 0), seqlen_k)
    if k_hi <= k_lo:
        return (k_lo, k_lo)
    return (k_lo, k_hi)


def block_fully_visible(
    q_lo: int,
    q_hi: int,
    k_lo: int,
    k_hi: int,
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window_size: Window = (-1, -1),
) -> bool:
    """True when every query in ``[q_lo, q_hi)`` sees every key in ``[k_lo, k_hi)`` (no element mask needed).

    Empty blocks count as fully visible (there is nothing to mask).
    """
    if q_hi <= q_lo or k_hi <= k_lo:
        return True
    left, right = effective_window(causal, window_size)
    off = seqlen_k - seqlen_q
    # The tightest left bound comes from the last query, the tightest right bound from the first.
    if left is not None and k_lo < (q_hi - 1) + off - left:
        return False
    if right is not None and k_hi - 1 > q_lo + off + right:
        return False
    return True
