"""Tiled online-softmax attention in plain PyTorch (the 'cpu' backend).

FlashAttention 2's algorithm with torch matmuls as the tile products: the forward walks key blocks
for each query block keeping a running max / sum / accumulator, the backward recomputes the
probabilities of each tile from the saved lse. Nothing of size Sq x Sk is ever allocated, so memory
grows linearly with the sequence length. Works on any device; no autograd inside (ops.py wraps it).

Layout and semantics are the reference's (see reference.attention_ref): q ``[B, Sq, Hq, D]``,
k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]``, out ``[B, Sq, Hq, Dv]``, lse float32 ``[B, Hq, Sq]``.

Internally tensors are ``[B, Hkv, G * rows, D]`` per tile: the G query heads that share one key/value
head are stacked along the rows, so GQA needs no repeated k/v and dk/dv sum over the group for free.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .masks import Window, block_fully_visible, effective_window, key_block_range, visibility_mask
from .masks import BlockMask
from . import dropout

# Tile sizes: up to 256 query rows x 512 keys, with the fp32 score tile (batch chunk x heads x rows x
# keys) capped near _TILE_ELEMS so the few tile-sized temporaries stay in cache while the matmuls stay
# big enough to be efficient. Measured on a 2-core x86 machine (S 1k-32k, D 64/128, 1-16 heads):
# 256 x 512 is ~20% faster than 128 x 512 on one head; with many heads the cap shrinks the rows
# (16 heads -> 128), and an 8 MiB cap lost up to 2x there.
BLOCK_M = 256
BLOCK_N = 512
_TILE_ELEMS = 1 << 20  # 4 MiB of fp32 per score tile
_MIN_BLOCK_M = 16

_NEG_INF = float("-inf")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("cpu attention: q, k, v must be 4-D [batch, seqlen, heads, head_dim]")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"cpu attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if (q.shape[2] % k.shape[2] if k.shape[2] else q.shape[2]) != 0:  # no heads at all: empty results
        raise ValueError(f"cpu attention: Hq ({q.shape[2]}) must be a multiple of Hkv ({k.shape[2]})")


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` (any strides, any dtype) -> float32 ``[B, H, S, D]`` contiguous (one copy at most)."""
    return t.transpose(1, 2).to(torch.float32).contiguous()


def _tiles(batch: int, rows_per_query: int, seqlen_q: int, seqlen_k: int) -> Tuple[int, int, int]:
    """(batch chunk, block_m, block_n) so that chunk * rows_per_query * block_m * block_n ~ _TILE_ELEMS."""
    block_n = max(1, min(BLOCK_N, seqlen_k))
    per_row = rows_per_query * block_n  # score elements per query row per batch element
    block_m = max(1, min(BLOCK_M, seqlen_q, max(_MIN_BLOCK_M, _TILE_ELEMS // max(per_row, 1))))
    chunk = max(1, min(batch, _TILE_ELEMS // max(per_row * block_m, 1)))
    return chunk, block_m, block_n


def _alibi_tile(
    slopes: Optional[torch.Tensor],
    b0: int,
    b1: int,
    heads_kv: int,
    group: int,
    q_lo: int,
    q_hi: int,
    k_lo: int,
    k_hi: int,
    offset: int,
) -> Optional[torch.Tensor]:
    """ALiBi bias for one tile, ``[b or 1, Hkv, G, rows, keys]`` float32 (None without ALiBi)."""
    if slopes is None:
        return None
    s = slopes[b0:b1] if slopes.shape[0] > 1 else slopes
    qi = torch.arange(q_lo, q_hi, device=s.device).unsqueeze(1)
    kj = torch.arange(k_lo, k_hi, device=s.device).unsqueeze(0)
    dist = (qi + offset - kj).abs().to(torch.float32)
    return -s.view(s.shape[0], heads_kv, group, 1, 1) * dist


def _prepare_slopes(
    alibi_slopes: Optional[torch.Tensor], batch: int, heads_q: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Slopes as float32 ``[B or 1, Hq]`` on ``device``."""
    if alibi_slopes is None:
        return None
    s = alibi_slopes.to(device=device, dtype=torch.float32)
    if s.dim() == 1:
        s = s.unsqueeze(0)
    if s.dim() != 2 or s.shape[1] != heads_q or s.shape[0] not in (1, batch):
        raise ValueError(f"alibi_slopes: expected shape [Hq] or [B, Hq], got {tuple(alibi_slopes.shape)}")
    return s


def _key_blocks(
    q_lo: int, q_hi: int, seqlen_q: int, seqlen_k: int, window: Window, block_n: int
) -> Iterator[Tuple[int, int, bool]]:
    """Key blocks ``(k_lo, k_hi, needs_mask)`` that some query of ``[q_lo, q_hi)`` can see."""
    lo, hi = key_block_range(q_lo, q_hi, seqlen_q, seqlen_k, False, window)
    for k_lo in range(lo, hi, block_n):
        k_hi = min(k_lo + block_n, hi)
        full = block_fully_visible(q_lo, q_hi, k_lo, k_hi, seqlen_q, seqlen_k, False, window)
        yield k_lo, k_hi, not full


def _scores(
    qt: torch.Tensor,
    kt: torch.Tensor,
    softcap: float,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    group: int,
    rows: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scores of one tile, ``[b, Hkv, G * rows, keys]``, and tanh(s / softcap) when softcapping.

    ``qt`` is already multiplied by the softmax scale. Masked entries are -inf.
    """
    s = torch.matmul(qt, kt.transpose(-1, -2))
    t = None
    if softcap > 0:
        t = torch.tanh(s.div_(softcap))
        s = t * softcap
    if bias is not None or mask is not None:
        s5 = s.view(s.shape[0], s.shape[1], group, rows, s.shape[-1])
        if bias is not None:
            s5.add_(bias)
        if mask is not None:
            s5.masked_fill_(~mask, _NEG_INF)
    return s, t


class _BlockSparse:
    """A ``BlockMask`` as the tiled loops use it: which key tiles to visit, and each tile's element mask.

    Tiles are made of whole mask blocks: block_m becomes a multiple of the mask's bq (query tiles start
    on mask-block boundaries) and block_n a multiple of bk. A key tile is a run of consecutive mask
    blocks that are non-empty for some (b, h) of the batch chunk, clipped to the keys the causal /
    window rule leaves; blocks empty for the whole chunk are never visited. The element mask is
    applied only when some block of the tile is not full for some (b, h); it is ANDed with the
    causal / window mask, and ALiBi / softcap are untouched.
    """

    def __init__(self, block_mask: BlockMask, batch: int, heads_q: int, heads_kv: int,
                 seqlen_q: int, seqlen_k: int, device: torch.device) -> None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a flashtile.masks.BlockMask or None, got {type(block_mask).__name__}")
        block_mask.check_compatible(batch, heads_q, seqlen_q, seqlen_k, device=device)
        self.bq, self.bk = block_mask.block_size
        self.kind = block_mask.kind
        self.elements = block_mask.element_mask
        self.heads_kv, self.group = heads_kv, heads_q // heads_kv
        self.seqlen_q, self.seqlen_k = seqlen_q, seqlen_k

    def tiles(self, block_m: int, block_n: int) -> Tuple[int, int]:
        """Tile sizes rounded to whole mask blocks (down, but at least one block)."""
        return max(self.bq, block_m // self.bq * self.bq), max(self.bk, block_n // self.bk * self.bk)

    def _kinds(self, b0: int, b1: int, q_lo: int, q_hi: int, kb0: int, kb1: int) -> torch.Tensor:
        kind = self.kind[b0:b1] if self.kind.shape[0] > 1 else self.kind
        return kind[:, :, q_lo // self.bq : -(-q_hi // self.bq), kb0:kb1]

    def key_blocks(self, b0: int, b1: int, q_lo: int, q_hi: int, window: Window,
                   block_n: int) -> Iterator[Tuple[int, int, bool]]:
        """Like ``_key_blocks`` (``(k_lo, k_hi, needs_visibility_mask)``), minus blocks empty for the chunk."""
        lo, hi = key_block_range(q_lo, q_hi, self.seqlen_q, self.seqlen_k, False, window)
        if hi <= lo:
            return
        bk = self.bk
        kb0 = lo // bk
        kinds = self._kinds(b0, b1, q_lo, q_hi, kb0, -(-hi // bk))
        live = (kinds != BlockMask.EMPTY).flatten(0, 2).any(dim=0).tolist()
        per_tile = max(1, block_n // bk)
        i = 0
        while i < len(live):
            if not live[i]:
                i += 1
                continue
            j = i + 1
            while j < len(live) and live[j] and j - i < per_tile:
                j += 1
            k_lo, k_hi = max((kb0 + i) * bk, lo), min((kb0 + j) * bk, hi)
            full = block_fully_visible(q_lo, q_hi, k_lo, k_hi, self.seqlen_q, self.seqlen_k, False, window)
            yield k_lo, k_hi, not full
            i = j

    def and_mask(self, mask: Optional[torch.Tensor], b0: int, b1: int, q_lo: int, q_hi: int,
                 k_lo: int, k_hi: int) -> Optional[torch.Tensor]:
        """``mask`` (``[rows, keys]`` or None) AND the block mask of the tile, broadcastable to the
        scores ``[b, Hkv, G, rows, keys]``; unchanged when the tile is full for every (b, h)."""
        bq, bk = self.bq, self.bk
        qb0, kb0 = q_lo // bq, k_lo // bk
        kinds = self._kinds(b0, b1, q_lo, q_hi, kb0, -(-k_hi // bk))
        full = kinds == BlockMask.FULL
        if bool(full.all()):
            return mask
        if self.elements is not None:
            em = self.elements[b0:b1] if self.elements.shape[0] > 1 else self.elements
            em = em[:, :, q_lo:q_hi, k_lo:k_hi]
        else:  # no partial blocks: a block is all visible (full) or all hidden (empty)
            em = full.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)
            em = em[:, :, q_lo - qb0 * bq : q_hi - qb0 * bq, k_lo - kb0 * bk : k_hi - kb0 * bk]
        em = em.unflatten(1, (self.heads_kv, self.group)) if em.shape[1] > 1 else em.unsqueeze(2)
        return em if mask is None else em & mask


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    window_size: Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    *,
    block_mask: Optional[BlockMask] = None,
    dropout_p: float = 0.0,
    dropout_seed: Tuple[int, int] = (0, 0),
    dropout_rows: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention forward.

    q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]`` (fp16 / bf16 / fp32, any strides).
    Returns out ``[B, Sq, Hq, Dv]`` in q's dtype and lse float32 ``[B, Hq, Sq]``. Computes in float32.
    Fully masked rows: out 0, lse -inf. NaN inputs propagate.
    ``block_mask`` (masks.BlockMask, ``[B|1, Hq|1, Sq, Sk]``): ANDed with the causal / window rule;
    key blocks empty for a whole batch chunk are skipped.
    ``dropout_rows`` (first batch index, Sq) of the dropout row grid, when these tensors are one
    sequence of a packed batch (varlen: the padded [B, Hq, max Sq] grid of row numbers).
    """
    _check_inputs(q, k, v)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads_q // max(heads_kv, 1)
    device = q.device
    # Every row of out and lse is written below (fully masked rows too), so no initialisation.
    out = torch.empty(batch, seqlen_q, heads_q, head_dim_v, dtype=q.dtype, device=device)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=device)
    sparse = None
    if block_mask is not None:
        sparse = _BlockSparse(block_mask, batch, heads_q, heads_kv, seqlen_q, seqlen_k, device)
    if lse.numel() == 0:  # no query rows: nothing to compute
        return out, lse
    window = effective_window(causal, window_size)
    offset = seqlen_k - seqlen_q
    slopes = _prepare_slopes(alibi_slopes, batch, heads_q, device)
    qf, kf, vf = _heads_first(q), _heads_first(k), _heads_first(v)
    chunk, block_m, block_n = _tiles(batch, heads_q, seqlen_q, seqlen_k)
    if sparse is not None:
        block_m, block_n = sparse.tiles(block_m, block_n)

    for b0 in range(0, batch, chunk):
        b1 = min(b0 + chunk, batch)
        nb = b1 - b0
        for q_lo in range(0, seqlen_q, block_m):
            q_hi = min(q_lo + block_m, seqlen_q)
            rows = q_hi - q_lo
            qt = (qf[b0:b1, :, q_lo:q_hi] * softmax_scale).view(nb, heads_kv, group * rows, head_dim)
            m = torch.full((nb, heads_kv, group * rows, 1), _NEG_INF, dtype=torch.float32, device=device)
            l = torch.zeros_like(m)
            acc = torch.zeros(nb, heads_kv, group * rows, head_dim_v, dtype=torch.float32, device=device)
            blocks = (_key_blocks(q_lo, q_hi, seqlen_q, seqlen_k, window, block_n) if sparse is None
                      else sparse.key_blocks(b0, b1, q_lo, q_hi, window, block_n))
            for k_lo, k_hi, needs_mask in blocks:
                mask = None
                if needs_mask:
                    mask = visibility_mask(
                        seqlen_q, seqlen_k, causal, window_size,
                        q_start=q_lo, q_len=rows, k_start=k_lo, k_len=k_hi - k_lo, device=device,
                    )
                if sparse is not None:
                    mask = sparse.and_mask(mask, b0, b1, q_lo, q_hi, k_lo, k_hi)
                bias = _alibi_tile(slopes, b0, b1, heads_kv, group, q_lo, q_hi, k_lo, k_hi, offset)
                s, _ = _scores(qt, kf[b0:b1, :, k_lo:k_hi], softcap, bias, mask, group, rows)
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                # A row with nothing visible yet keeps max -inf; shift by 0 so exp gives 0, not NaN.
                m_safe = torch.where(m_new == _NEG_INF, torch.zeros_like(m_new), m_new)
                p = s.sub_(m_safe).exp_()
                alpha = torch.exp(m - m_safe)
                l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
                if dropout_p > 0:  # the normaliser l keeps the undropped sum; P @ V sees the mask
                    cb, cq = dropout_rows or (0, seqlen_q)
                    p = p * dropout.keep_tile(cb + b0, cb + b1, heads_q, heads_kv, q_lo, q_hi, k_lo, k_hi, cq,
                                              dropout_seed, dropout_p, device)
                acc.mul_(alpha).add_(torch.matmul(p, vf[b0:b1, :, k_lo:k_hi]))
                m = m_new
            empty = l == 0  # NaN rows compare False and keep their NaN
            o = torch.where(empty, torch.zeros_like(acc), acc / l)
            if dropout_p > 0:
                o = o / (1.0 - dropout_p)
            row_lse = torch.where(empty, torch.full_like(l, _NEG_INF), m + torch.log(l))
            out[b0:b1, q_lo:q_hi] = o.view(nb, heads_q, rows, head_dim_v).transpose(1, 2)
            lse[b0:b1, :, q_lo:q_hi] = row_lse.view(nb, heads_q, rows)
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    window_size: Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    *,
    block_mask: Optional[BlockMask] = None,
    dropout_p: float = 0.0,
    dropout_seed: Tuple[int, int] = (0, 0),
    dropout_rows: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled attention backward from the forward's out and lse.

    dout / out ``[B, Sq, Hq, Dv]``, lse float32 ``[B, Hq, Sq]``, q/k/v as in ``attention_forward``.
    Returns dq ``[B, Sq, Hq, D]``, dk ``[B, Sk, Hkv, D]``, dv ``[B, Sk, Hkv, Dv]`` in the dtypes of
    q, k, v. dk/dv are summed over the query heads of each GQA group; ALiBi slopes get no gradient.
    Deterministic: tiles are visited in a fixed order and summed sequentially.
    ``block_mask``, ``dropout_rows``: the forward's (see ``attention_forward``).
    """
    _check_inputs(q, k, v)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads_q // max(heads_kv, 1)
    device = q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=device)  # every row is written below
    sparse = None
    if block_mask is not None:
        sparse = _BlockSparse(block_mask, batch, heads_q, heads_kv, seqlen_q, seqlen_k, device)
    window = effective_window(causal, window_size)
    offset = seqlen_k - seqlen_q
    slopes = _prepare_slopes(alibi_slopes, batch, heads_q, device)
    qf, kf, vf = _heads_first(q), _heads_first(k), _heads_first(v)
    dof = _heads_first(dout)
    # delta_i = sum_d dout_id * out_id = sum_j P_ij dP_ij: the softmax Jacobian's row term.
    delta = (dof * _heads_first(out)).sum(dim=-1)  # [B, Hq, Sq]
    lse_f = lse.to(torch.float32)
    # Fully masked rows (lse -inf) have only -inf scores; shifting by 0 makes their P exactly 0.
    lse_safe = torch.where(lse_f == _NEG_INF, torch.zeros_like(lse_f), lse_f)
    dk_acc = torch.zeros(batch, heads_kv, seqlen_k, head_dim, dtype=torch.float32, device=device)
    dv_acc = torch.zeros(batch, heads_kv, seqlen_k, head_dim_v, dtype=torch.float32, device=device)
    chunk, block_m, block_n = _tiles(batch, heads_q, seqlen_q, seqlen_k)
    if sparse is not None:
        block_m, block_n = sparse.tiles(block_m, block_n)

    for b0 in range(0, batch, chunk):
        b1 = min(b0 + chunk, batch)
        nb = b1 - b0
        for q_lo in range(0, seqlen_q, block_m):
            q_hi = min(q_lo + block_m, seqlen_q)
            rows = q_hi - q_lo
            gr = group * rows
            qt = (qf[b0:b1, :, q_lo:q_hi] * softmax_scale).view(nb, heads_kv, gr, head_dim)
            dot = dof[b0:b1, :, q_lo:q_hi].reshape(nb, heads_kv, gr, head_dim_v)
            lse_t = lse_safe[b0:b1, :, q_lo:q_hi].reshape(nb, heads_kv, gr, 1)
            delta_t = delta[b0:b1, :, q_lo:q_hi].reshape(nb, heads_kv, gr, 1)
            dq_t = torch.zeros(nb, heads_kv, gr, head_dim, dtype=torch.float32, device=device)
            blocks = (_key_blocks(q_lo, q_hi, seqlen_q, seqlen_k, window, block_n) if sparse is None
                      else sparse.key_blocks(b0, b1, q_lo, q_hi, window, block_n))
            for k_lo, k_hi, needs_mask in blocks:
                mask = None
                if needs_mask:
                    mask = visibility_mask(
                        seqlen_q, seqlen_k, causal, window_size,
                        q_start=q_lo, q_len=rows, k_start=k_lo, k_len=k_hi - k_lo, device=device,
                    )
                if sparse is not None:
                    mask = sparse.and_mask(mask, b0, b1, q_lo, q_hi, k_lo, k_hi)
                bias = _alibi_tile(slopes, b0, b1, heads_kv, group, q_lo, q_hi, k_lo, k_hi, offset)
                kt = kf[b0:b1, :, k_lo:k_hi]
                vt = vf[b0:b1, :, k_lo:k_hi]
                s, t = _scores(qt, kt, softcap, bias, mask, group, rows)
                p = s.sub_(lse_t).exp_()
                if dropout_p > 0:  # the forward's mask, regenerated; z = keep / (1 - p)
                    cb, cq = dropout_rows or (0, seqlen_q)
                    z = dropout.keep_tile(cb + b0, cb + b1, heads_q, heads_kv, q_lo, q_hi, k_lo, k_hi, cq,
                                          dropout_seed, dropout_p, device) / (1.0 - dropout_p)
                    dv_acc[b0:b1, :, k_lo:k_hi] += torch.matmul((p * z).transpose(-1, -2), dot)
                    dp = torch.matmul(dot, vt.transpose(-1, -2)).mul_(z)
                else:
                    dv_acc[b0:b1, :, k_lo:k_hi] += torch.matmul(p.transpose(-1, -2), dot)
                    dp = torch.matmul(dot, vt.transpose(-1, -2))
                ds = dp.sub_(delta_t).mul_(p)
                if t is not None:
                    # d/dx [c * tanh(x / c)] = 1 - tanh(x / c)^2
                    ds.mul_(1.0 - t * t)
                dq_t += torch.matmul(ds, kt)
                # qt carries the scale already, so this is scale * ds^T q, summed over the group.
                dk_acc[b0:b1, :, k_lo:k_hi] += torch.matmul(ds.transpose(-1, -2), qt)
            dq_t.mul_(softmax_scale)
            dq[b0:b1, q_lo:q_hi] = dq_t.view(nb, heads_q, rows, head_dim).transpose(1, 2)
    dk = dk_acc.transpose(1, 2).to(k.dtype).contiguous()
    dv = dv_acc.transpose(1, 2).to(v.dtype).contiguous()
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Variable-length (packed) sequences: FlashAttention-2's varlen layout.
#
# q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, v ``[total_k, Hkv, Dv]``; sequence b owns rows
# ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k / v.
# Each sequence is attended on its own (bottom-right alignment per sequence), through the dense
# functions above on ``[1, len, H, D]`` views (no copies of the packed tensors).
# ---------------------------------------------------------------------------------------------------


def _varlen_bounds(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """[(q_lo, q_hi, k_lo, k_hi)] per sequence, read on the host (the caller validated the offsets)."""
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError(f"cpu varlen attention: cu_seqlens_q has {len(cq)} entries, cu_seqlens_k {len(ck)}")
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _varlen_slopes(alibi_slopes: Optional[torch.Tensor], b: int) -> Optional[torch.Tensor]:
    """Slopes of sequence b: ``[Hq]`` as given, or row b of ``[B, Hq]``."""
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b]


def attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float,
    window_size: Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    dropout_seed: Tuple[int, int] = (0, 0),
    max_seqlens: Tuple[int, int] = (0, 0),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention forward over packed sequences.

    q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, v ``[total_k, Hkv, Dv]``; cu_seqlens_* int
    ``[B + 1]`` offsets. ``window_size`` is FlashAttention's pair (causal folded in by the caller as
    right = 0) or a ``masks.Edges``; it is relative to each sequence's own bottom-right diagonal.
    ``alibi_slopes`` is ``[Hq]`` or ``[B, Hq]``. Returns out ``[total_q, Hq, Dv]`` in q's dtype and
    lse float32 ``[Hq, total_q]``. Query rows with no visible key (empty k sequence): out 0, lse -inf.
    Dropout numbers sequence b's query rows in the padded ``[B, Hq, max_seqlen_q]`` grid (the kernels').
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("cpu varlen attention: q, k, v must be 3-D [total_tokens, heads, head_dim]")
    total_q, heads_q, _ = q.shape
    out = torch.zeros(total_q, heads_q, v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.full((heads_q, total_q), _NEG_INF, dtype=torch.float32, device=q.device)
    for b, (q_lo, q_hi, k_lo, k_hi) in enumerate(_varlen_bounds(cu_seqlens_q, cu_seqlens_k)):
        if q_hi == q_lo:
            continue
        o, l = attention_forward(
            q[q_lo:q_hi].unsqueeze(0), k[k_lo:k_hi].unsqueeze(0), v[k_lo:k_hi].unsqueeze(0),
            softmax_scale, causal=False, window_size=window_size, softcap=softcap,
            alibi_slopes=_varlen_slopes(alibi_slopes, b), dropout_p=dropout_p, dropout_seed=dropout_seed,
            dropout_rows=(b, max_seqlens[0]),
        )
        out[q_lo:q_hi] = o[0]
        lse[:, q_lo:q_hi] = l[0]
    return out, lse


def attention_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float,
    window_size: Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    dropout_seed: Tuple[int, int] = (0, 0),
    max_seqlens: Tuple[int, int] = (0, 0),
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled attention backward over packed sequences, from the forward's out and lse ``[Hq, total_q]``.

    Shapes as in ``attention_varlen_forward``. Returns dq ``[total_q, Hq, D]``, dk ``[total_k, Hkv, D]``,
    dv ``[total_k, Hkv, Dv]`` in the dtypes of q, k, v (zero for rows of empty sequences).
    Deterministic: sequences and tiles are visited in a fixed order.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("cpu varlen attention: q, k, v must be 3-D [total_tokens, heads, head_dim]")
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    for b, (q_lo, q_hi, k_lo, k_hi) in enumerate(_varlen_bounds(cu_seqlens_q, cu_seqlens_k)):
        if q_hi == q_lo or k_hi == k_lo:  # no query row or no key: every gradient of it is 0
            continue
        g_q, g_k, g_v = attention_backward(
            dout[q_lo:q_hi].unsqueeze(0), q[q_lo:q_hi].unsqueeze(0), k[k_lo:k_hi].unsqueeze(0),
            v[k_lo:k_hi].unsqueeze(0), out[q_lo:q_hi].unsqueeze(0), lse[:, q_lo:q_hi].unsqueeze(0),
            softmax_scale, causal=False, window_size=window_size, softcap=softcap,
            alibi_slopes=_varlen_slopes(alibi_slopes, b), dropout_p=dropout_p, dropout_seed=dropout_seed,
            dropout_rows=(b, max_seqlens[0]),
        )
        dq[q_lo:q_hi] = g_q[0]
        dk[k_lo:k_hi] = g_k[0]
        dv[k_lo:k_hi] = g_v[0]
    return dq, dk, dv
