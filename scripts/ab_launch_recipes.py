"""A/B of launch recipes (launch_recipe.py) on short training steps: host time and step time.

PYTHONPATH=src python scripts/ab_launch_recipes.py   (needs a CUDA GPU)

For each shape, recipes off and on in 3 interleaved rounds: the host time of 8 forwards issued in a
row (the GPU runs behind), of 8 whole steps, and the step time under do_bench (the median round).
"Off" makes every recipe lookup miss, so each call runs the full launcher (launch plans still apply).
"""

from __future__ import annotations

import time
from typing import Callable, Tuple

import torch
import triton

import flashtile as ft
from flashtile import attention_launch

SHAPES = ((512, 128), (1024, 128), (512, 64))  # (S, D); B = 16384 / S, H = 2048 / D, causal
_LOOKUP = attention_launch._RECIPES.get


def use_recipes(on: bool) -> None:
    attention_launch._RECIPES.clear()
    attention_launch._RECIPES.get = _LOOKUP if on else (lambda key: None)


def steps(S: int, D: int) -> Tuple[Callable[[], None], Callable[[], None]]:
    """(a whole forward + backward step, a forward without autograd) on fresh bf16 inputs."""
    B, H = 16384 // S, 2048 // D
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def step() -> None:
        ft.flash_attn_func(q, k, v, causal=True).backward(dout)
        q.grad = k.grad = v.grad = None

    def forward() -> None:
        with torch.no_grad():
            ft.flash_attn_func(q, k, v, causal=True)

    return step, forward


def host_us(fn: Callable[[], None], calls: int = 8) -> float:
    """Host time per call of `calls` calls in a row (no synchronisation in between)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    for S, D in SHAPES:
        step, forward = steps(S, D)
        results = {False: [], True: []}
        for _ in range(3):
            for on in (False, True):
                use_recipes(on)
                step(), step()  # compile, plan, build the recipe
                results[on].append((host_us(forward), host_us(step), triton.testing.do_bench(step, warmup=25, rep=100)))
        for on, rounds in results.items():
            median_ms = sorted(r[2] for r in rounds)[1]
            print(f"S={S} D={D} recipes {'on ' if on else 'off'}: host forward {min(r[0] for r in rounds):.0f} us, "
                  f"host step {min(r[1] for r in rounds):.0f} us, step {median_ms * 1e3:.0f} us")
    use_recipes(True)


if __name__ == "__main__":
    main()
