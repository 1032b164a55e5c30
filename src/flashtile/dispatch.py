"""The one place that decides which implementation runs an attention call.

Backends:
  triton     the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  cpu        the tiled online-softmax PyTorch path (memory linear in S), any device
  reference  the plain PyTorch oracle (materialises S x S; for checking, not for speed)
  auto       CUDA tensors -> triton, CPU tensors -> cpu

Chosen by FLASHTILE_BACKEND or, with priority, by the context manager ``use_backend``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")

_local = threading.local()


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def backend_setting() -> str:
    """The backend asked for: use_backend's innermost value, else FLASHTILE_BACKEND, else 'auto'."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _env_backend(os.environ.get("FLASHTILE_BACKEND", "auto") or "auto")


@functools.lru_cache(maxsize=16)
def _env_backend(raw: str) -> str:
    """FLASHTILE_BACKEND's value checked once per distinct string (every call reads the variable)."""
    return _check_name(raw, "FLASHTILE_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed flashtile calls on backend ``name`` (auto | triton | cpu | reference)."""
    name = _check_name(name, "use_backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


DENSE_MAX_HEAD_DIM = 256  # the dense Triton kernels' limit; wider heads run the split-D kernels


# ... except the forward of fp16 / bf16 heads whose register tiles (tuning.tile_width: head dims 257..384,
# as 256 + 64 or 256 + 128 columns) are at most this wide, on Hopper and in the interpreter
DENSE_FORWARD_MAX_TILE = 384


def wide_heads(head_dim: int, head_dim_v: int) -> bool:
    """True when the Triton backend runs the wide-head (split-D) kernels instead of the dense ones."""
    return max(head_dim, head_dim_v) > DENSE_MAX_HEAD_DIM


def wide_forward_heads(head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device,
                       block_mask: object = None) -> bool:
    """wide_heads for the forward launch, which takes the dense kernel a little further.

    The dense forward keeps the whole [128, D] Q tile in shared memory; the split-D one re-reads Q's
    chunks from L2 for every key tile and restarts its pipelined chunk loop there. Where the dense
    kernel's tiles fit (16-bit Q / K / V tiles of at most DENSE_FORWARD_MAX_TILE columns, the [128,
    Dv] fp32 accumulator in registers), it is the faster one. H200, bf16, B=1, H=48, S=8192, forward
    TFLOP/s, wide -> dense: D=320 284 -> 461 (causal 285 -> 445), D=384 280 -> 358 (causal 284 -> 375).
    fp32 tiles do not fit; Ampere (less shared memory) is unmeasured; a block_mask keeps the wide
    launcher, which raises for it in both directions. The backward stays wide: the dense dK / dV and
    dQ kernels measured no faster at D=320 / 384 (159-170 against 164-176 TFLOP/s).
    """
    if not wide_heads(head_dim, head_dim_v):
        return False
    from flashtile.tuning import _arch, tile_width  # tuning imports this module

    if block_mask is not None or dtype not in (torch.float16, torch.bfloat16):
        return True
    if max(tile_width(head_dim), tile_width(head_dim_v)) > DENSE_FORWARD_MAX_TILE:
        return True
    arch = _arch(device)
    return arch is not None and arch[0] < 9


# The Gluon wide forward (kernels/attention_wide_gluon.py): the wider (padded) head dim in this range
GLUON_FORWARD_MIN_HEAD_DIM = 321
GLUON_FORWARD_MAX_HEAD_DIM = 1024


def gluon_forward_heads(head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device) -> bool:
    """True when a wide forward of these (64-column padded) head dims runs the Gluon kernel.

    The wider head dim in [GLUON_FORWARD_MIN_HEAD_DIM, GLUON_FORWARD_MAX_HEAD_DIM], 16-bit, on sm_90
    (the kernel is written for Hopper's wgmma and TMA). There one S [64, 256] is shared by two
    warpgroups that each own half of an O slice of up to 768 columns (512 past 768), so S is computed
    once for Dv <= 768, where the split-D kernel computes it once per 256 columns of V. H200, bf16,
    B=1, H=48, S=8192, non-causal forward TFLOP/s, split-D (session 37 A/B) -> Gluon (wide suite,
    session 38): D=448 277 -> 461, D=512 292 -> 499, D=576 244 -> 502, D=768 240 -> 445, D=1024 200
    -> 371; MLA's Dqk=576 / Dv=512 296 -> 516. Against the dense Triton forward (wide_forward_heads false, which attention_forward
    runs where this kernel does not apply): D=384 390 -> 464 (causal 405 -> 419), but D=320 454 ->
    431 (causal 446 -> 389), so 257..320 stay dense. The launcher also needs the call's features to
    be ones the kernel has (wide_gluon_launch.gluon_features).
    """
    from flashtile.tuning import _arch  # tuning imports this module

    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if not GLUON_FORWARD_MIN_HEAD_DIM <= max(head_dim, head_dim_v) <= GLUON_FORWARD_MAX_HEAD_DIM:
        return False
    return _arch(device) == (9, 0)


# The Gluon wide backward (kernels/attention_wide_gluon_bwd.py): the wider (padded) head dim in this range
GLUON_BACKWARD_MIN_HEAD_DIM = 257
GLUON_BACKWARD_MAX_HEAD_DIM = 1024


def gluon_backward_heads(head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device) -> bool:
    """True when a wide backward of these (64-column padded) head dims runs the Gluon kernel: the wider
    in [GLUON_BACKWARD_MIN_HEAD_DIM, GLUON_BACKWARD_MAX_HEAD_DIM], 16-bit, on sm_90. The launcher also
    needs the call's features to be ones the kernel has (wide_gluon_launch.gluon_backward_applies).
    H200, bf16, B=1, H=48, S=8192, forward+backward TFLOP/s, split-D (dense dQ at 320 / 384) -> Gluon
    (same run, session 39): D=320 215 -> 281, causal 236 -> 272; 384 204 -> 305; 512 193 -> 326; 576
    147 -> 307; 768 144 -> 297; 1024 139 -> 225. It wins from the lowest wide head dim, so it starts
    there (257)."""
    from flashtile.tuning import _arch  # tuning imports this module

    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if not GLUON_BACKWARD_MIN_HEAD_DIM <= max(head_dim, head_dim_v) <= GLUON_BACKWARD_MAX_HEAD_DIM:
        return False
    return _arch(device) == (9, 0)


def dense_dq_heads(head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device,
                   masked: bool = False) -> bool:
    """True when the split-D backward of a wide head runs its dQ on the dense dQ kernel instead.

    The same heads as the dense forward (wide_forward_heads false without a block_mask): the dense
    dQ kernel keeps the [128, D] dQ accumulator in registers and walks the key tiles once, where the
    split-D one re-reads Q / dO chunks per key tile. It also writes delta, so the delta launch goes.
    dK and dV stay split-D (the dense dK/dV kernel measured slower at D = 320 / 384). H200, bf16,
    B=1, H=48, S=8192, whole backward ms, split-D dQ -> dense dQ: D=320 62.7 -> 59.3, causal 29.1 ->
    26.3, window (1024, 0) 9.55 -> 7.47, softcap 79.9 -> 64.6, dropout 71.1 -> 66.0, causal GQA (8 kv
    heads) 29.8 -> 27.4; D=384 81.8 -> 76.7, dropout 92.6 -> 88.0, softcap 87.9 -> 83.8. But at
    384-wide tiles a causal or windowed call (masked) lost: causal 38.7 -> 39.3, causal ALiBi 41.6 ->
    42.3, causal GQA 39.3 -> 41.8, window 10.4 -> 10.7; those keep the split-D dQ.
    """
    from flashtile.tuning import tile_width  # tuning imports this module

    if masked and max(tile_width(head_dim), tile_width(head_dim_v)) > 320:
        return False
    return wide_heads(head_dim, head_dim_v) and not wide_forward_heads(head_dim, head_dim_v, dtype, device)


def triton_interpreting() -> bool:
    """True when Triton's interpreter runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device, setting: Optional[str] = None) -> str:
    """The concrete backend ('triton' | 'cpu' | 'reference') for tensors on ``device``."""
    setting = backend_setting() if setting is None else _check_name(setting, "backend")
    if setting == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if setting == "triton" and device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on the CPU "
            "through Triton's interpreter; use backend 'cpu' for CPU tensors"
        )
    return setting
