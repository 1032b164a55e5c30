"""Validation: a provider's outputs must match the reference provider's before its speed counts.

Two checks per tensor, both far looser than two correct bf16 kernels need and far tighter than
what a broken kernel (wrong mask, skipped tile, stale buffer) produces:

- worst element: max|diff| <= ATOL * max(1, max|ref|). ATOL = 2e-2 is the usual bf16 bound for
  outputs of magnitude <= 1; gradients reach O(10), and their error scales with the tensor's
  magnitude (each element is a long sum), hence the max(1, .) factor.
- bulk: rms(diff) <= REL_RMS * rms(ref). Non-causal outputs at long S are O(0.01), where a fixed
  2e-2 bound alone would pass a kernel that drops a whole key tile; correct bf16 kernels agree to
  well under 1% rms.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

ATOL = 2e-2
REL_RMS = 5e-2


def all_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when no tensor holds NaN or inf (a reference must be usable)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def tensor_errors(result: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max|diff|, rms(diff) / rms(ref), max|ref|); inf errors when result is not finite."""
    if result.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(result.shape)} vs {tuple(ref.shape)}")
    r = ref.float()
    ref_max = float(r.abs().max()) if r.numel() else 0.0
    if not bool(torch.isfinite(result).all()):
        return math.inf, math.inf, ref_max
    d = result.float() - r
    if d.numel() == 0:
        return 0.0, 0.0, ref_max
    max_abs = float(d.abs().max())
    ref_rms = float(r.square().mean().sqrt())
    rel_rms = float(d.square().mean().sqrt()) / ref_rms if ref_rms > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, rel_rms, ref_max


def compare(
    result: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    atol: float = ATOL,
    rel_rms: float = REL_RMS,
) -> tuple[bool, dict[str, dict[str, float]]]:
    """Check every tensor the reference has; a missing one fails.

    Returns (ok, {name: {"max_abs": ..., "rel_rms": ...}}).
    """
    report: dict[str, dict[str, float]] = {}
    ok = True
    for name, ref in reference.items():
        if name not in result:
            report[name] = {"max_abs": math.inf, "rel_rms": math.inf}
            ok = False
            continue
        max_abs, rel, ref_max = tensor_errors(result[name], ref)
        report[name] = {"max_abs": max_abs, "rel_rms": rel}
        if not (max_abs <= atol * max(1.0, ref_max) and rel <= rel_rms):
            ok = False
    return ok, report
