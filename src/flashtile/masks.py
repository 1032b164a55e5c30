"""Which keys a query may attend to.

The element rule is FlashAttention 2's, aligned bottom-right: with ``off = seqlen_k - seqlen_q`` query
``i`` lines up with key ``i + off``, and a window ``(left, right)`` (``-1`` = unbounded on that side)
keeps key ``j`` iff ``i + off - left <= j <= i + off + right``. ``causal`` is the window with
``right = 0`` (any given ``left`` is kept, any given ``right`` is replaced).

Every implementation (reference, tiled CPU path, Triton kernels) must agree with
``visibility_mask``; ``key_block_range`` and ``block_fully_visible`` let tiled code skip whole
blocks and drop the element mask on blocks that need none.

``BlockMask`` (end of this file) is an arbitrary extra mask, ANDed with the rule above, stored as
per-block kinds (empty / partial / full) plus the element mask of the partial blocks, with the
kernel-friendly lists of non-empty key blocks per query block (FlexAttention's BlockMask, Metal
FlashAttention's block-sparse masks).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

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


# ---------------------------------------------------------------------------------------------------
# Block-sparse masks
# ---------------------------------------------------------------------------------------------------

BlockSize = Union[int, Tuple[int, int]]

# Cap (elements) on the padded bool temporaries of BlockMask.from_dense's block classification.
_CLASSIFY_ELEMS = 1 << 26


def _check_block_size(block_size: BlockSize) -> Tuple[int, int]:
    """``block_size`` as a pair ``(block_q, block_k)`` of positive ints (an int means square blocks)."""

    def is_int(x: object) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    pair: tuple = (block_size, block_size) if is_int(block_size) else ()
    if not pair and not isinstance(block_size, (str, bytes, torch.Tensor)):
        try:
            pair = tuple(block_size)  # type: ignore[arg-type]
        except TypeError:
            pair = ()
    if len(pair) != 2 or not all(is_int(x) and x >= 1 for x in pair):
        raise ValueError(
            f"block_size must be a positive int or a pair (block_q, block_k) of positive ints, got {block_size!r}"
        )
    return int(pair[0]), int(pair[1])


def _check_seqlen(name: str, value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _as_4d(t: object, name: str, trailing: str) -> torch.Tensor:
    """A bool tensor of 2, 3 or 4 dims as 4-D ``[B|1, H|1, ...]`` (missing leading dims become size 1).

    Leading dims that are broadcast views (size > 1, stride 0, as from ``expand``) collapse to size 1,
    so an expanded mask is never materialised.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = visible), got dtype {t.dtype}")
    if t.dim() not in (2, 3, 4):
        raise ValueError(
            f"{name} must have 2, 3 or 4 dims, broadcastable to [batch, heads, {trailing}], got shape {tuple(t.shape)}"
        )
    while t.dim() < 4:
        t = t.unsqueeze(0)
    for d in (0, 1):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def _classify(mask: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Kinds int8 ``[B, H, nq, nk]`` of a 4-D bool mask ``[B, H, Sq, Sk]``: 0 empty, 1 partial, 2 full.

    Edge blocks (sequence lengths not multiples of the block size) count only their in-range elements.
    Works on query-block slabs so that the padded temporaries stay near ``_CLASSIFY_ELEMS``.
    """
    nb, nh, seqlen_q, seqlen_k = mask.shape
    nq, nk = _cdiv(seqlen_q, block_q), _cdiv(seqlen_k, block_k)
    kind = torch.empty(nb, nh, nq, nk, dtype=torch.int8, device=mask.device)
    if kind.numel() == 0:
        return kind
    step = max(1, _CLASSIFY_ELEMS // max(nb * nh * block_q * nk * block_k, 1))
    for qb0 in range(0, nq, step):
        qb1 = min(qb0 + step, nq)
        r0, r1 = qb0 * block_q, min(qb1 * block_q, seqlen_q)
        rows = mask[:, :, r0:r1]
        pad = torch.zeros(nb, nh, (qb1 - qb0) * block_q, nk * block_k, dtype=torch.bool, device=mask.device)
        blocks = pad.view(nb, nh, qb1 - qb0, block_q, nk, block_k)
        inside = pad[:, :, : r1 - r0, :seqlen_k]
        inside.copy_(rows)  # out of range = False: does not make a block non-empty
        some_visible = blocks.any(dim=5).any(dim=3)
        pad.zero_()
        inside.copy_(rows).logical_not_()  # out of range = not hidden: does not make a block partial
        some_hidden = blocks.any(dim=5).any(dim=3)
        part = torch.where(some_hidden, 1, 2).to(torch.int8)
        kind[:, :, qb0:qb1] = torch.where(some_visible, part, torch.zeros_like(part))
    return kind


def _index_lists(selected: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``selected`` bool ``[..., n]`` -> (num int32 ``[...]``, idx int32 ``[..., n]``).

    ``idx`` lists the positions of the True entries first, ascending, then the others, ascending, so
    every entry is a valid index in ``[0, n)``; only the first ``num`` are the selected ones.
    """
    num = selected.sum(dim=-1, dtype=torch.int32)
    if selected.shape[-1] == 0:
        return num, torch.zeros(selected.shape, dtype=torch.int32, device=selected.device)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
    return num, order.to(torch.int32).contiguous()


def _partial_tiles(em: Optional[torch.Tensor], partial: torch.Tensor, block_q: int,
                   block_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The element mask of the partial blocks only, one dense tile each, for the kernels.

    Returns (tiles uint8 ``[P, bq, bk]``, tile_id int32 ``[B, H, nq, nk]``): tile_id numbers the P partial
    blocks in row-major order (0 elsewhere). Elements past the sequence ends are 0. A tile is one
    contiguous, aligned bq x bk array with a compile-time row stride, so the kernels load it with wide
    vector loads (rows of the full [Sq, Sk] mask have the run-time stride Sk and an unknown alignment).
    """
    nb, nh, nq, nk = partial.shape
    tile_id = (torch.cumsum(partial.flatten().to(torch.int32), 0, dtype=torch.int32) - 1).clamp_(min=0)
    tile_id = tile_id.view(nb, nh, nq, nk)
    if em is None:
        return torch.zeros(1, block_q, block_k, dtype=torch.uint8, device=partial.device), tile_id
    seqlen_q, seqlen_k = em.shape[2:]
    padded = em.new_zeros(nb, nh, nq * block_q, nk * block_k)
    padded[:, :, :seqlen_q, :seqlen_k] = em
    blocks = padded.view(nb, nh, nq, block_q, nk, block_k).permute(0, 1, 2, 4, 3, 5)
    return blocks[partial].view(torch.uint8).contiguous(), tile_id


def _row_intervals(tiles: torch.Tensor, partial: torch.Tensor, tile_id: torch.Tensor,
                   block_k: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The partial tiles as one key interval per query row, or (None, None) if some row is not one.

    ``tiles`` uint8 ``[P, bq, bk]`` and ``tile_id`` (each block's tile) from ``_partial_tiles``,
    ``partial`` the partial blocks. Returns (intervals int64 ``[2P, bq]``, col_id int32
    ``[B, H, nk, nq]``): ``lo + (hi << 32)`` per row, the row's visible keys being the absolute key
    indices ``lo <= j < hi`` (``lo == hi``: none); entries ``[0, P)`` in row-major block order (as
    the tiles), ``[P, 2P)`` the same in key-major order, col_id giving each block's entry there (so a
    key-block column's entries are consecutive). Document, causal, sliding-window and prefix masks
    have such rows; the kernels then compare key indices with two numbers per row instead of loading
    a byte per element (BLOCK_SPARSE 3 in kernels/attention_fwd.py).
    """
    if tiles.shape[0] != int(partial.sum()):  # no partial block: the placeholder tile
        return None, None
    seen = tiles.bool()
    count = seen.sum(-1)
    first = seen.to(torch.uint8).argmax(-1)  # the first visible key (0 for an empty row)
    keys = torch.arange(tiles.shape[-1], device=tiles.device)
    as_interval = (keys >= first[..., None]) & (keys < (first + count)[..., None])
    if not torch.equal(as_interval, seen):
        return None, None
    key0 = (partial.nonzero()[:, 3] * block_k)[:, None]  # each tile's first key
    lo = (key0 + first).to(torch.int64)
    by_row = lo + ((lo + count) << 32)
    by_key = partial.transpose(2, 3)
    col_id = torch.zeros(by_key.shape, dtype=torch.int32, device=partial.device)
    col_id[by_key] = torch.arange(tiles.shape[0], 2 * tiles.shape[0], dtype=torch.int32, device=partial.device)
    key_major = by_row[tile_id.transpose(2, 3)[by_key].long()]  # each key-block column's in turn
    return torch.cat([by_row, key_major]), col_id


def _expand_blocks(blocks: torch.Tensor, block_q: int, block_k: int, rows: int, cols: int) -> torch.Tensor:
    """Block-level bool ``[B, H, nq, nk]`` -> element-level ``[B, H, rows, cols]`` (cropped)."""
    return blocks.repeat_interleave(block_q, dim=2).repeat_interleave(block_k, dim=3)[:, :, :rows, :cols]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BlockMask:
    """A mask on the attention scores, stored per block: FlexAttention's BlockMask.

    Stands for the bool element mask ``dense()`` of shape ``[B|1, H|1, seqlen_q, seqlen_k]``
    (True = key visible to the query; a size-1 batch or head dim broadcasts; heads are *query* heads).
    Attention with a block mask equals attention with ``dense()`` ANDed into the causal / window rule;
    a query row that sees nothing gives out 0 and lse -inf.

    The score matrix is cut into ``block_size = (bq, bk)`` blocks, ``nq = ceil(seqlen_q / bq)`` by
    ``nk = ceil(seqlen_k / bk)`` (edge blocks are cropped to the sequence lengths). Stored, all on one
    device:

    - ``kind`` int8 ``[B|1, H|1, nq, nk]``: ``EMPTY`` (0, nothing visible: skip the block),
      ``PARTIAL`` (1, apply ``element_mask``), ``FULL`` (2, every in-range element visible: no mask).
    - ``element_mask`` bool ``[B|1, H|1, seqlen_q, seqlen_k]`` (contiguous), or None when no block is
      partial. It agrees with ``kind`` (all False in empty blocks, all True in full ones).
    - derived index lists (int32, contiguous), for each (b, h, query block) the ascending key-block
      indices of its full blocks and of its partial blocks:
      ``full_kv_num`` ``[B|1, H|1, nq]`` and ``full_kv_idx`` ``[B|1, H|1, nq, nk]``, where only the
      first ``full_kv_num`` entries of each row are full blocks (the rest of the row lists the other
      blocks, ascending, so every entry is a valid block index); ``partial_kv_num`` /
      ``partial_kv_idx`` likewise. For backward passes that walk query blocks per key block, the
      transposed lists ``full_q_num`` / ``partial_q_num`` ``[B|1, H|1, nk]`` and ``full_q_idx`` /
      ``partial_q_idx`` ``[B|1, H|1, nk, nq]`` hold the query-block indices per (b, h, key block).
    - ``partial_tiles`` uint8 ``[P, bq, bk]``: the element mask of the P partial blocks, one tile each
      (what the kernels read); ``partial_kv_tile`` / ``partial_q_tile`` int32, aligned with
      ``partial_kv_idx`` / ``partial_q_idx``, give the tile of each listed partial block. Tiles are
      numbered in row-major block order, so one query-block row's listed tiles are consecutive
      (``partial_kv_tile[..., j] == partial_kv_tile[..., 0] + j`` for j < ``partial_kv_num``): the
      forward and dQ kernels rely on that (kernels/common.py: row_tile_ptrs).
    - ``partial_intervals`` int64 ``[2P, bq]`` or None: when every row of every partial tile sees one
      interval of keys (document, causal, window masks), tile p's row r sees the keys
      ``lo <= j < hi`` with ``partial_intervals[p, r] = lo + (hi << 32)``; the kernels then use these
      instead of the tiles. Entries ``[P, 2P)`` repeat them in key-major block order, and
      ``partial_q_interval`` (aligned with ``partial_q_idx``) points there, so that a key-block
      column's listed entries are consecutive too (the dK/dV kernel's walk).

    Build with ``from_dense``, ``from_blocks`` or the builders ``causal``, ``sliding_window``,
    ``document``. The constructor ``BlockMask(block_size, seqlen_q, seqlen_k, kind, element_mask)``
    checks that ``element_mask`` agrees with ``kind`` (O(seqlen_q * seqlen_k); ``check=False`` skips
    that scan). ``kind`` may call a block partial that is in fact full or empty (it costs speed, not
    correctness). Immutable: derive a new mask instead of assigning fields.
    """

    block_size: Tuple[int, int]
    seqlen_q: int
    seqlen_k: int
    kind: torch.Tensor
    element_mask: Optional[torch.Tensor] = None
    check: dataclasses.InitVar[bool] = True
    full_kv_num: torch.Tensor = dataclasses.field(init=False)
    full_kv_idx: torch.Tensor = dataclasses.field(init=False)
    partial_kv_num: torch.Tensor = dataclasses.field(init=False)
    partial_kv_idx: torch.Tensor = dataclasses.field(init=False)
    full_q_num: torch.Tensor = dataclasses.field(init=False)
    full_q_idx: torch.Tensor = dataclasses.field(init=False)
    partial_q_num: torch.Tensor = dataclasses.field(init=False)
    partial_q_idx: torch.Tensor = dataclasses.field(init=False)
    partial_tiles: torch.Tensor = dataclasses.field(init=False)
    partial_kv_tile: torch.Tensor = dataclasses.field(init=False)
    partial_q_tile: torch.Tensor = dataclasses.field(init=False)
    partial_intervals: Optional[torch.Tensor] = dataclasses.field(init=False)
    partial_q_interval: Optional[torch.Tensor] = dataclasses.field(init=False)

    EMPTY = 0
    PARTIAL = 1
    FULL = 2

    def __post_init__(self, check: bool) -> None:
        set_ = object.__setattr__
        bq, bk = _check_block_size(self.block_size)
        set_(self, "block_size", (bq, bk))
        set_(self, "seqlen_q", _check_seqlen("seqlen_q", self.seqlen_q))
        set_(self, "seqlen_k", _check_seqlen("seqlen_k", self.seqlen_k))
        nq, nk = _cdiv(self.seqlen_q, bq), _cdiv(self.seqlen_k, bk)
        kind = self.kind
        if not isinstance(kind, torch.Tensor) or kind.dtype != torch.int8 or kind.dim() != 4:
            got = f"{kind.dtype} {tuple(kind.shape)}" if isinstance(kind, torch.Tensor) else type(kind).__name__
            raise TypeError(f"BlockMask: kind must be an int8 tensor [B|1, H|1, nq, nk], got {got}")
        if tuple(kind.shape[2:]) != (nq, nk):
            raise ValueError(
                f"BlockMask: kind has {tuple(kind.shape[2:])} blocks, but seqlen ({self.seqlen_q}, {self.seqlen_k}) "
                f"with block_size ({bq}, {bk}) needs ({nq}, {nk})"
            )
        if kind.numel() and bool(((kind < 0) | (kind > 2)).any()):
            raise ValueError("BlockMask: kind values must be 0 (empty), 1 (partial) or 2 (full)")
        kind = kind.contiguous()
        set_(self, "kind", kind)
        partial = kind == self.PARTIAL
        em = self.element_mask
        if em is not None:
            if not isinstance(em, torch.Tensor) or em.dtype != torch.bool:
                raise TypeError("BlockMask: element_mask must be a bool tensor or None")
            want = (*kind.shape[:2], self.seqlen_q, self.seqlen_k)
            if tuple(em.shape) != want:
                raise ValueError(f"BlockMask: element_mask must have shape {list(want)}, got {list(em.shape)}")
            if em.device != kind.device:
                raise ValueError(f"BlockMask: element_mask is on {em.device} but kind on {kind.device}")
            if check and em.numel():
                derived = _classify(em, bq, bk)
                bad = ((kind == self.EMPTY) & (derived != self.EMPTY)) | ((kind == self.FULL) & (derived != self.FULL))
                if bool(bad.any()):
                    raise ValueError("BlockMask: element_mask disagrees with kind (visible elements in an empty "
                                     "block, or hidden ones in a full block)")
            em = em.contiguous() if bool(partial.any()) else None
        elif bool(partial.any()):
            raise ValueError("BlockMask: kind has partial blocks, so element_mask is required")
        set_(self, "element_mask", em)
        full = kind == self.FULL
        for name, sel in (("full", full), ("partial", partial)):
            num, idx = _index_lists(sel)
            set_(self, f"{name}_kv_num", num)
            set_(self, f"{name}_kv_idx", idx)
            num, idx = _index_lists(sel.transpose(2, 3))
            set_(self, f"{name}_q_num", num)
            set_(self, f"{name}_q_idx", idx)
        tiles, tile_id = _partial_tiles(em, partial, bq, bk)
        set_(self, "partial_tiles", tiles)
        intervals, col_id = _row_intervals(tiles, partial, tile_id, bk) if em is not None else (None, None)
        set_(self, "partial_intervals", intervals)
        set_(self, "partial_q_interval", None if col_id is None else col_id.gather(-1, self.partial_q_idx.long()).contiguous())
        set_(self, "partial_kv_tile", tile_id.gather(-1, self.partial_kv_idx.long()).contiguous())
        set_(self, "partial_q_tile", tile_id.transpose(2, 3).gather(-1, self.partial_q_idx.long()).contiguous())

    # -- constructors -----------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_size: BlockSize = (128, 128)) -> "BlockMask":
        """From a bool element mask broadcastable to ``[B, H, Sq, Sk]`` (True = visible).

        ``mask`` is ``[Sq, Sk]``, ``[H|1, Sq, Sk]`` or ``[B|1, H|1, Sq, Sk]``; dims of size 1 stay size 1
        (and expanded, stride-0 batch/head dims collapse to 1), nothing is expanded. Every block is
        classified empty / partial / full; the mask is kept (contiguous) only if some block is partial.
        """
        bq, bk = _check_block_size(block_size)
        m = _as_4d(mask, "mask", "seqlen_q, seqlen_k")
        kind = _classify(m, bq, bk)
        return cls((bq, bk), m.shape[2], m.shape[3], kind, m, check=False)

    @classmethod
    def from_blocks(
        cls,
        blocks: torch.Tensor,
        block_size: BlockSize = (128, 128),
        seqlen_q: Optional[int] = None,
        seqlen_k: Optional[int] = None,
    ) -> "BlockMask":
        """From block-level bool ``[B|1, H|1, nq, nk]`` (or ``[nq, nk]``, ``[H|1, nq, nk]``).

        True = full block (every element visible, no element mask), False = empty block.

        ``seqlen_q`` / ``seqlen_k`` default to ``nq * bq`` / ``nk * bk``; when given they must need exactly
        ``nq`` / ``nk`` blocks (the last block is cropped to the sequence end).
        """
        bq, bk = _check_block_size(block_size)
        b = _as_4d(blocks, "blocks", "num_q_blocks, num_k_blocks")
        nq, nk = b.shape[2], b.shape[3]
        sq = nq * bq if seqlen_q is None else _check_seqlen("seqlen_q", seqlen_q)
        sk = nk * bk if seqlen_k is None else _check_seqlen("seqlen_k", seqlen_k)
        for name, s, n, bs in (("seqlen_q", sq, nq, bq), ("seqlen_k", sk, nk, bk)):
            if _cdiv(s, bs) != n:
                raise ValueError(f"from_blocks: {name}={s} with block size {bs} needs {_cdiv(s, bs)} blocks, "
                                 f"but blocks has {n}")
        kind = torch.where(b, cls.FULL, cls.EMPTY).to(torch.int8)
        return cls((bq, bk), sq, sk, kind, None, check=False)

    @classmethod
    def causal(
        cls,
        seqlen_q: int,
        seqlen_k: int,
        block_size: BlockSize = (128, 128),
        device: Optional[Union[str, torch.device]] = None,
    ) -> "BlockMask":
        """Causal, bottom-right aligned like flash_attn_func: query i sees key j iff j <= i + Sk - Sq."""
        sq, sk = _check_seqlen("seqlen_q", seqlen_q), _check_seqlen("seqlen_k", seqlen_k)
        return cls.from_dense(visibility_mask(sq, sk, True, device=device), block_size)

    @classmethod
    def sliding_window(
        cls,
        seqlen_q: int,
        seqlen_k: int,
        window_size: Tuple[int, int],
        block_size: BlockSize = (128, 128),
        device: Optional[Union[str, torch.device]] = None,
    ) -> "BlockMask":
        """flash_attn_func's window (left, right), -1 = unbounded: i + Sk - Sq - left <= j <= i + Sk - Sq + right."""
        sq, sk = _check_seqlen("seqlen_q", seqlen_q), _check_seqlen("seqlen_k", seqlen_k)
        try:
            left, right = window_size
        except (TypeError, ValueError):
            raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
        for side, w in (("left", left), ("right", right)):
            if not isinstance(w, numbers.Integral) or isinstance(w, bool) or w < -1:
                raise ValueError(f"window_size {side} must be an int >= -1 (-1 = unbounded), got {w!r}")
        mask = visibility_mask(sq, sk, False, (int(left), int(right)), device=device)
        return cls.from_dense(mask, block_size)

    @classmethod
    def document(
        cls,
        doc_ids_q: torch.Tensor,
        doc_ids_k: Optional[torch.Tensor] = None,
        block_size: BlockSize = (128, 128),
        causal: bool = False,
    ) -> "BlockMask":
        """Packed sequences: query i sees key j iff ``doc_ids_q[i] == doc_ids_k[j]``.

        Document ids are integer tensors ``[S]`` or ``[B, S]`` (``doc_ids_k`` defaults to ``doc_ids_q``,
        self attention; a batch of 1 broadcasts against the other's batch). With ``causal`` key j must
        also satisfy j <= i + Sk - Sq (bottom-right, so j <= i for self attention). The mask is
        ``[B|1, 1, Sq, Sk]`` on the ids' device.
        """
        ids_q = cls._check_doc_ids("doc_ids_q", doc_ids_q)
        ids_k = ids_q if doc_ids_k is None else cls._check_doc_ids("doc_ids_k", doc_ids_k)
        if ids_k.device != ids_q.device:
            raise ValueError(f"doc_ids_k is on {ids_k.device} but doc_ids_q on {ids_q.device}")
        bq_, bk_ = ids_q.shape[0], ids_k.shape[0]
        if bq_ != bk_ and 1 not in (bq_, bk_):
            raise ValueError(f"doc_ids_q has batch {bq_} and doc_ids_k batch {bk_}: they must match or one be 1")
        mask = (ids_q.unsqueeze(2) == ids_k.unsqueeze(1)).unsqueeze(1)  # [B|1, 1, Sq, Sk]
        if causal:
            mask &= visibility_mask(ids_q.shape[1], ids_k.shape[1], True, device=ids_q.device)
        return cls.from_dense(mask, block_size)

    @staticmethod
    def _check_doc_ids(name: str, ids: object) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{name} must hold integer (or bool) document ids, got dtype {ids.dtype}")
        if ids.dim() not in (1, 2):
            raise ValueError(f"{name} must be [seqlen] or [batch, seqlen], got shape {tuple(ids.shape)}")
        return ids if ids.dim() == 2 else ids.unsqueeze(0)

    # -- views ------------------------------------------------------------------------------------

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B|1, H|1, seqlen_q, seqlen_k)``: the shape of ``dense()``."""
        return (self.kind.shape[0], self.kind.shape[1], self.seqlen_q, self.seqlen_k)

    @property
    def num_blocks(self) -> Tuple[int, int]:
        """``(nq, nk)``: query and key blocks."""
        return (self.kind.shape[2], self.kind.shape[3])

    @property
    def device(self) -> torch.device:
        return self.kind.device

    def dense(self) -> torch.Tensor:
        """The bool element mask ``[B|1, H|1, seqlen_q, seqlen_k]`` this block mask stands for.

        The attention result must equal attention with this mask. Returns the stored ``element_mask``
        when there is one (do not modify it), else expands the full blocks.
        """
        if self.element_mask is not None:
            return self.element_mask
        bq, bk = self.block_size
        return _expand_blocks(self.kind == self.FULL, bq, bk, self.seqlen_q, self.seqlen_k)

    def density(self) -> float:
        """Fraction of blocks that are not empty (0.0 for a mask without blocks)."""
        if self.kind.numel() == 0:
            return 0.0
        return float((self.kind != self.EMPTY).sum()) / self.kind.numel()

    def to(self, device: Union[str, torch.device]) -> "BlockMask":
        """The same mask with every tensor on ``device`` (self when already there)."""
        device = torch.device(device)
        if device == self.kind.device:
            return self
        em = None if self.element_mask is None else self.element_mask.to(device)
        return BlockMask(self.block_size, self.seqlen_q, self.seqlen_k, self.kind.to(device), em, check=False)

    def under_rule(self, left: Optional[int], right: Optional[int]) -> "BlockMask":
        """This mask as the kernels need it when they also apply a causal / window rule themselves.

        ``left`` / ``right`` are the rule's edges (None: unbounded; causal is right = 0). A partial
        block whose element mask hides nothing that the rule shows becomes FULL, one that shows
        nothing the rule shows becomes EMPTY: the kernels AND the rule into every block that crosses
        it, so attention is unchanged while those blocks skip the element-mask loads (a document mask
        built with ``causal=True`` has all its diagonal blocks partial; under the causal rule only the
        blocks on document boundaries stay partial). Only ``kind`` changes (``dense()`` of the result
        may show elements the rule hides). Cached per rule on this (immutable) mask.
        """
        if self.element_mask is None or (left is None and right is None) or self.__dict__.get("_no_refine"):
            return self
        cache = self.__dict__.setdefault("_under_rule", {})
        key = (left, right)
        if key not in cache:
            cache[key] = self._refined(left, right)
        return cache[key]

    def _refined(self, left: Optional[int], right: Optional[int]) -> "BlockMask":
        bq, bk = self.block_size
        partial = self.kind == self.PARTIAL
        where = partial.nonzero()  # [P, 4]: b, h, query block, key block (row-major: the tiles' order)
        rows = where[:, 2, None, None] * bq + torch.arange(bq, device=where.device)[None, :, None]
        cols = where[:, 3, None, None] * bk + torch.arange(bk, device=where.device)[None, None, :]
        rel = cols - (rows + (self.seqlen_k - self.seqlen_q))
        shown = (rows < self.seqlen_q) & (cols < self.seqlen_k)  # [P, bq, bk]: what the rule shows
        if left is not None:
            shown &= rel >= -left
        if right is not None:
            shown &= rel <= right
        tiles = self.partial_tiles.bool()
        full = ~(shown & ~tiles).flatten(1).any(1)  # hides nothing the rule shows
        empty = ~(shown & tiles).flatten(1).any(1)  # shows nothing the rule shows
        if not bool((full | empty).any()):
            return self
        kind = self.kind.clone()
        new = torch.where(empty, self.EMPTY, torch.where(full, self.FULL, self.PARTIAL)).to(torch.int8)
        kind[partial] = new
        return BlockMask(self.block_size, self.seqlen_q, self.seqlen_k, kind, self.element_mask, check=False)

    # -- flattening, for torch.library ops (their schema takes tensors and ints, not this object) --

    _PART_NAMES = ("kind", "element_mask", "full_kv_num", "full_kv_idx", "partial_kv_num", "partial_kv_idx",
                   "full_q_num", "full_q_idx", "partial_q_num", "partial_q_idx", "partial_tiles", "partial_kv_tile",
                   "partial_q_tile", "partial_intervals", "partial_q_interval")
    _OPTIONAL_PARTS = ("element_mask", "partial_intervals", "partial_q_interval")

    def parts(self) -> Tuple[List[torch.Tensor], List[int]]:
        """(tensors, ints) that ``from_parts`` turns back into this mask without recomputing anything.
        A missing element mask or interval list travels as ``kind`` (the ints say it is absent)."""
        tensors = [self.kind if getattr(self, n) is None else getattr(self, n) for n in self._PART_NAMES]
        present = [int(getattr(self, n) is not None) for n in self._OPTIONAL_PARTS]
        return tensors, [self.block_size[0], self.block_size[1], self.seqlen_q, self.seqlen_k, *present]

    @classmethod
    def from_parts(cls, tensors: Sequence[torch.Tensor], ints: Sequence[int]) -> "BlockMask":
        """The mask ``parts`` flattened. It skips ``under_rule``'s refinement: that costs device syncs,
        which a mask rebuilt on every call (inside a compiled graph) would pay each time."""
        obj = object.__new__(cls)
        for name, t in zip(cls._PART_NAMES, tensors):
            object.__setattr__(obj, name, t)
        bq, bk, sq, sk, *present = (int(x) for x in ints)
        object.__setattr__(obj, "block_size", (bq, bk))
        object.__setattr__(obj, "seqlen_q", sq)
        object.__setattr__(obj, "seqlen_k", sk)
        for name, there in zip(cls._OPTIONAL_PARTS, present):
            if not there:
                object.__setattr__(obj, name, None)
        obj.__dict__["_no_refine"] = True
        return obj

    # A partial block costs about twice a full one: its element-mask tile is loaded and ANDed in
    PARTIAL_COST = 2

    def program_order(self, by: str, batch: int, heads: int, heads_per_program: int, tile: int,
                      num_tiles: int) -> torch.Tensor:
        """Launch order of the kernels' programs, heaviest first: int32 ``[batch * programs * num_tiles]``.

        ``by="query"``: programs own ``tile`` query rows (forward, dQ) and walk this mask's key-block
        lists; ``by="key"``: they own ``tile`` keys (dK/dV) and walk the query-block lists, summed over
        ``heads_per_program`` consecutive query heads (``heads // heads_per_program`` programs per
        batch index). Entry i is the program id, ``(b * programs + p) * num_tiles + t``, that the
        i-th launched program runs. Work per program = full blocks + PARTIAL_COST x partial blocks
        of its block; ties keep the natural order, so programs sharing K/V stay together.

        A greedy GPU scheduler starts programs in launch order; when list lengths vary (document
        masks: long documents have long lists) the natural order can leave one long program running
        alone at the end. Heaviest first bounds that tail by the lightest programs. Cached per
        argument tuple on this (immutable) mask; device ops only, no host sync.
        """
        cache = self.__dict__.setdefault("_program_order", {})
        key = (by, batch, heads, heads_per_program, tile, num_tiles)
        if key not in cache:
            if by == "query":
                full, part, block = self.full_kv_num, self.partial_kv_num, self.block_size[0]
            elif by == "key":
                full, part, block = self.full_q_num, self.partial_q_num, self.block_size[1]
            else:
                raise ValueError(f"program_order: by must be 'query' or 'key', got {by!r}")
            work = (full + self.PARTIAL_COST * part).expand(batch, heads, -1)
            if heads_per_program > 1:
                work = work.unflatten(1, (heads // heads_per_program, heads_per_program)).sum(2)
            if tile < block:  # several program tiles per block; tiles never span blocks (tile | block)
                work = work.repeat_interleave(block // tile, dim=2)
            work = work[:, :, :num_tiles].flatten()
            cache[key] = torch.argsort(work, descending=True, stable=True).to(torch.int32)
        return cache[key]

    def check_compatible(
        self,
        batch: int,
        heads: int,
        seqlen_q: int,
        seqlen_k: int,
        device: Optional[torch.device] = None,
        name: str = "block_mask",
    ) -> None:
        """Raise ValueError unless this mask fits attention with these sizes (``heads`` = query heads)."""
        nb, nh = self.kind.shape[:2]
        if (self.seqlen_q, self.seqlen_k) != (seqlen_q, seqlen_k):
            raise ValueError(f"{name} is for seqlen (q, k) = ({self.seqlen_q}, {self.seqlen_k}), "
                             f"but the attention has ({seqlen_q}, {seqlen_k})")
        if nb not in (1, batch):
            raise ValueError(f"{name} has batch {nb}; it must be 1 or the attention's batch {batch}")
        if nh not in (1, heads):
            raise ValueError(f"{name} has {nh} heads; it must be 1 or the number of query heads {heads}")
        if device is not None and torch.device(device) != self.kind.device:
            raise ValueError(f"{name} is on {self.kind.device} but the inputs are on {device} (use .to(device))")

    def __repr__(self) -> str:
        counts = torch.bincount(self.kind.flatten().long(), minlength=3).tolist() if self.kind.numel() else [0, 0, 0]
        return (
            f"BlockMask(shape={list(self.shape)}, block_size={self.block_size}, "
            f"blocks={list(self.kind.shape)}, density={self.density():.3f}, full={counts[2]}, "
            f"partial={counts[1]}, empty={counts[0]}, device={self.kind.device})"
        )
