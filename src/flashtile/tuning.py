"""Tile sizes, warps and pipeline depth per (architecture, head dim, dtype, feature flags).

Fixed tables, chosen by sweeps on the hardware (see BENCHMARKS.md): no autotuning at call time, so
the first call is as fast as the hundredth and the interpreter (which cannot autotune) gets one
config too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch

from flashtile.dispatch import triton_interpreting


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    dkdv: KernelConfig
    dq: KernelConfig


def padded_head_dim(d: int) -> int:
    """Register tiles need a power of two; tl.dot needs at least 16."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _arch(device: torch.device) -> Optional[Tuple[int, int]]:
    if device.type != "cuda" or triton_interpreting():
        return None
    return device_capability(device.index if device.index is not None else torch.cuda.current_device())


def forward_config(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                   causal: bool) -> KernelConfig:
    """Config of attention_fwd_kernel."""
    arch = _arch(device)
    d = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v))
    if arch is None:  # interpreter: every op is a numpy call, so fewer larger tiles run faster
        return KernelConfig(32, 32, 4, 1)
    fp32 = dtype == torch.float32
    if arch[0] >= 9:
        # H200 sweep (bf16, S=4096): 128x64, 8 warps, 3 stages leads for D <= 128 (411 / 470 TFLOP/s
        # non-causal D=64 / 128); D=256 needs 2 stages to fit shared memory (479).
        if fp32:
            return KernelConfig(64, 32, 4, 2) if d > 128 else KernelConfig(128, 32, 8, 2)
        if d <= 128:
            return KernelConfig(128, 64, 8, 3)
        return KernelConfig(128, 64, 8, 2)
    # Ampere and older: smaller shared memory
    if d <= 64:
        return KernelConfig(128, 64, 4, 3)
    if d <= 128:
        return KernelConfig(128, 32 if fp32 else 64, 8, 2)
    return KernelConfig(64, 32, 8, 1)


def backward_config(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                    causal: bool) -> BackwardConfig:
    """Configs of attention_bwd_dkdv_kernel and attention_bwd_dq_kernel."""
    arch = _arch(device)
    d = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v))
    if arch is None:
        return BackwardConfig(KernelConfig(32, 32, 4, 1), KernelConfig(32, 32, 4, 1))
    fp32 = dtype == torch.float32
    if fp32:
        if d <= 64:
            return BackwardConfig(KernelConfig(32, 128, 8, 3), KernelConfig(128, 32, 8, 3))
        if d <= 128:
            return BackwardConfig(KernelConfig(32, 64, 8, 2), KernelConfig(64, 32, 8, 2))
        return BackwardConfig(KernelConfig(16, 64, 8, 1), KernelConfig(64, 32, 8, 1))
    # H200 sweep (bf16, S=4096, non-causal), each kernel timed with the other fixed
    if d <= 64:
        return BackwardConfig(KernelConfig(32, 128, 4, 3), KernelConfig(128, 64, 4, 3))
    if d <= 128:
        return BackwardConfig(KernelConfig(64, 64, 4, 2), KernelConfig(128, 64, 8, 3))
    return BackwardConfig(KernelConfig(64, 64, 8, 2), KernelConfig(128, 32, 8, 3))
