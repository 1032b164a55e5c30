"""The attention variants of the ``variants`` suite, defined once for every provider.

A variants case's shape names the variant and its parameters (see suites.variants_suite); this
module turns them into what each implementation takes, on the device:

- :func:`flashtile_kwargs`: flash_attn_func's keywords (causal, window_size, softcap,
  alibi_slopes, block_mask); varlen adds :func:`varlen_offsets`;
- :func:`mods`: FlexAttention's ``score_mod`` and ``mask_mod``. They are written with plain tensor
  ops, so the same functions also run densely on broadcast index tensors; that is the definition
  the float32 reference (:func:`dense_reference`) evaluates, so flashtile (through its own
  arguments) and Flex (through the mods) are both checked against one written-down rule;
- :func:`sdpa_kwargs`: what torch SDPA needs (ALiBi as an explicit additive bias).

Shapes without a "variant" (the standard and wide suites) get plain causal / non-causal
attention from the same functions. Nothing here touches a device at import.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch

from .suites import variant_block_table, variant_doc_lengths

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

KNOWN = (None, "window", "softcap", "alibi", "dropout", "gqa", "varlen", "block_sparse")


class VariantError(ValueError):
    """A provider was asked for a variant it cannot run (recorded as an error cell)."""


def variant_of(shape: Mapping[str, Any]) -> Optional[str]:
    v = shape.get("variant")
    if v not in KNOWN:
        raise VariantError(f"unknown variant {v!r}")
    return v


def _causal(shape: Mapping[str, Any]) -> bool:
    return bool(shape.get("causal", False))


# ----------------------------------------------------------------------------------------------
# Variant data on the device


def alibi_slopes(heads: int, device: torch.device) -> torch.Tensor:
    """ALiBi slopes 2^(-8 (h + 1) / H), float32 [H] (the ALiBi paper's geometric sequence)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32, device=device)


def doc_ids(shape: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """Document id of every packed token, int32 [S]."""
    lengths = torch.tensor(variant_doc_lengths(shape), device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32), lengths)


def varlen_offsets(shape: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
    """cu_seqlens int32 [n + 1] and the longest sequence of a varlen case."""
    lengths = variant_doc_lengths(shape)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device), max(lengths)


def block_table(shape: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """The random block table of a block-sparse case, bool [nq, nk] (True = block visible)."""
    return torch.tensor(variant_block_table(shape), dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------------------------
# flashtile


def flashtile_kwargs(shape: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """flash_attn_func (and flash_attn_varlen_func) keywords of a case; built outside the timing."""
    from flashtile.masks import BlockMask

    v = variant_of(shape)
    kw: dict[str, Any] = {"causal": _causal(shape)}
    if v == "window":
        kw["window_size"] = (int(shape["window_left"]), 0 if _causal(shape) else int(shape["window_right"]))
    elif v == "softcap":
        kw["softcap"] = float(shape["softcap"])
    elif v == "alibi":
        kw["alibi_slopes"] = alibi_slopes(int(shape["H"]), device)
    elif v == "dropout":
        kw["dropout_p"] = float(shape["dropout_p"])
    elif v == "block_sparse":
        bs = int(shape["block"])
        if shape["mask"] == "document":
            kw["block_mask"] = BlockMask.document(doc_ids(shape, device), block_size=bs, causal=_causal(shape))
        else:
            kw["block_mask"] = BlockMask.from_blocks(block_table(shape, device), block_size=bs,
                                                     seqlen_q=int(shape["Sq"]), seqlen_k=int(shape["Sk"]))
    return kw


# ----------------------------------------------------------------------------------------------
# FlexAttention's mods (also the reference's definition)


def mods(shape: Mapping[str, Any], device: torch.device) -> tuple[Optional[ScoreMod], Optional[MaskMod]]:
    """(score_mod, mask_mod) of a case, None where there is nothing to do.

    Index tensors may be scalars (inside Flex) or broadcast [Sq, 1] / [1, Sk] tensors (the dense
    reference). Every mask_mod here ignores b and h (Flex's create_block_mask gets B=H=None, and
    the reference evaluates it once); masks are bottom-right aligned like flashtile's.
    """
    v = variant_of(shape)
    if v == "dropout":
        # A random function has no fixed reference; flashtile's dropout is checked exactly against
        # its returned keep pattern by tests/test_dropout.py, and FlexAttention has no dropout.
        raise VariantError("dropout has no deterministic reference and no FlexAttention form")
    causal = _causal(shape)
    off = int(shape["Sk"]) - int(shape["Sq"])
    score_mod: Optional[ScoreMod] = None
    mask_mod: Optional[MaskMod] = None

    if v == "softcap":
        cap = float(shape["softcap"])

        def score_mod(score, b, h, q_idx, kv_idx):  # noqa: F811
            return cap * torch.tanh(score / cap)

    elif v == "alibi":
        slopes = alibi_slopes(int(shape["H"]), device)

        def score_mod(score, b, h, q_idx, kv_idx):  # noqa: F811
            return score - slopes[h] * (q_idx + off - kv_idx).abs()

    if v == "window":
        left = int(shape["window_left"])
        right = 0 if causal else int(shape["window_right"])

        if left < 0 or right < 0:
            raise VariantError(f"window ({left}, {right}): the suite's windows are bounded on both sides")

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811
            rel = kv_idx - (q_idx + off)
            return (rel >= -left) & (rel <= right)

    elif v == "varlen" or (v == "block_sparse" and shape.get("mask") == "document"):
        ids = doc_ids(shape, device)

        if causal:

            def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811
                return (ids[q_idx] == ids[kv_idx]) & (q_idx + off >= kv_idx)

        else:

            def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811
                return ids[q_idx] == ids[kv_idx]

    elif v == "block_sparse":
        table = block_table(shape, device)
        bs = int(shape["block"])
        if causal:
            raise VariantError("random block masks are non-causal in this suite")

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811
            return table[q_idx // bs, kv_idx // bs]

    elif causal:

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811
            return q_idx + off >= kv_idx

    return score_mod, mask_mod


def flex_block_size(shape: Mapping[str, Any]) -> int:
    """Flex's BLOCK_SIZE: the block-sparse case's own block, else Flex's default 128."""
    return int(shape.get("block", 128))


# ----------------------------------------------------------------------------------------------
# SDPA


def sdpa_kwargs(shape: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Extra SDPA keywords for a variant; raises VariantError for variants SDPA cannot express."""
    v = variant_of(shape)
    if v in (None, "gqa"):
        return {}
    if v == "alibi":
        return {"attn_mask": alibi_bias(shape, device, dtype)}
    if v == "dropout":
        return {"dropout_p": float(shape["dropout_p"])}
    raise VariantError(f"torch SDPA has no {v} variant")


def alibi_bias(shape: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi as an explicit additive bias [1, H, Sq, Sk] in ``dtype``, -inf where causal hides a key."""
    h, sq, sk = int(shape["H"]), int(shape["Sq"]), int(shape["Sk"])
    slopes = alibi_slopes(h, device)
    qi = torch.arange(sq, device=device).unsqueeze(1)
    kj = torch.arange(sk, device=device).unsqueeze(0)
    rel = kj - (qi + sk - sq)
    bias = torch.empty(1, h, sq, sk, dtype=dtype, device=device)
    dist = rel.abs().float()
    hidden = rel > 0 if _causal(shape) else None
    for i in range(h):  # one head at a time: a float32 [H, S, S] temporary would double the memory
        b = -slopes[i] * dist
        if hidden is not None:
            b = b.masked_fill(hidden, float("-inf"))
        bias[0, i] = b.to(dtype)
    return bias


# ----------------------------------------------------------------------------------------------
# Reference


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: Optional[torch.Tensor],
    *,
    score_mod: Optional[ScoreMod] = None,
    mask_mod: Optional[MaskMod] = None,
    softmax_scale: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """Attention by the book in float32, one (batch, query head) at a time.

    q [B, Sq, H, D], k / v [B, Sk, Hkv, D] (query head h uses key head h // (H / Hkv)), flash
    layout. Scores are (q k^T) * scale, then score_mod, then mask_mod (-inf where False); a query
    row that sees nothing gives 0 (and zero gradients). Returns float32 "out" and, with dout,
    "dq", "dk", "dv" in the inputs' layout. One head at a time keeps memory at a few S x S float32
    tensors (1 GB each at S = 16384), whatever B and H are.
    """
    B, Sq, H, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    dev = q.device
    grad = dout is not None
    qi = torch.arange(Sq, device=dev).unsqueeze(1)
    kj = torch.arange(Sk, device=dev).unsqueeze(0)
    zero = torch.zeros((), dtype=torch.long, device=dev)
    # Every mask_mod of the suite ignores b and h (see mods): evaluate it once.
    visible = mask_mod(zero, zero, qi, kj).expand(Sq, Sk) if mask_mod is not None else None

    out = torch.empty(B, Sq, H, Dv, dtype=torch.float32, device=dev)
    res: dict[str, torch.Tensor] = {"out": out}
    if grad:
        res["dq"] = torch.empty(B, Sq, H, D, dtype=torch.float32, device=dev)
        res["dk"] = torch.zeros(B, Sk, Hkv, D, dtype=torch.float32, device=dev)
        res["dv"] = torch.zeros(B, Sk, Hkv, Dv, dtype=torch.float32, device=dev)
    for b in range(B):
        for h in range(H):
            g = h // group
            with torch.enable_grad():
                qh = q[b, :, h].float().requires_grad_(grad)
                kh = k[b, :, g].float().requires_grad_(grad)
                vh = v[b, :, g].float().requires_grad_(grad)
                s = (qh @ kh.t()) * scale
                if score_mod is not None:
                    s = score_mod(s, zero + b, zero + h, qi, kj)
                if visible is not None:
                    s = s.masked_fill(~visible, float("-inf"))
                m = s.detach().amax(dim=-1, keepdim=True)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                p = torch.exp(s - m)
                denom = p.sum(dim=-1, keepdim=True)
                p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
                o = p @ vh
            out[b, :, h] = o.detach()
            if grad:
                dq, dk, dv = torch.autograd.grad(o, (qh, kh, vh), dout[b, :, h].float())
                res["dq"][b, :, h] = dq
                res["dk"][b, :, g] += dk
                res["dv"][b, :, g] += dv
            del s, p, o
    return res
