"""Timing: warm-up, then Triton's do_bench median (CUDA events, L2 flushed between repetitions)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def warm_up(fn: Callable[[], Any], calls: int = 2) -> None:
    """Run ``fn`` a few times and wait for it.

    The first call compiles (Triton JIT, autotuning, torch.compile); do_bench estimates its
    repetition count from its first five calls, so a compile there would shrink the sample.
    """
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()


def median_ms(
    fn: Callable[[], Any],
    *,
    warmup_ms: float,
    rep_ms: float,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> float:
    """Median time of one call of ``fn`` in milliseconds."""
    from triton.testing import do_bench

    ms = do_bench(
        fn,
        warmup=warmup_ms,
        rep=rep_ms,
        grad_to_none=list(grad_to_none) if grad_to_none is not None else None,
        return_mode="median",
    )
    return float(ms)
