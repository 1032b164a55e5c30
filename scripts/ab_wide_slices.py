"""A/B of the Gluon wide kernels' slice plans (wide_gluon_launch.PARKED_TILES, NARROW_CHUNKS) on the wide suite's shape.

PYTHONPATH=src python scripts/ab_wide_slices.py [DIMS] [CAUSAL] [MODES]   (needs an sm_90 GPU)
  e.g. scripts/ab_wide_slices.py 704,832,896,960 0,1 fwd,fwd_bwd

B=1, H=48, S=8192, bf16, D = Dv. Plans, in 2 interleaved rounds (do_bench median, the better round):
  shipped  PARKED_TILES = 1: slices of at most 768 columns (832 = 512 + 320, two programs recomputing S)
  wide64   PARKED_TILES = 3: one slice up to 960 (832 = 512 + 256 + 64 parked), 2 ring stages of 64 columns
  wide32   PARKED_TILES = 3 and NARROW_CHUNKS: the slices left with 2 stages stream 32-column chunks (4-5 stages)
TFLOP/s as the bench counts them (forward 4 * B * H * S^2 * D, halved causal; forward+backward 3.5x).
"""

from __future__ import annotations

import sys

import torch
import triton

import flashtile as ft
from flashtile import wide_gluon_launch

PLANS = {"shipped": (1, False), "wide64": (3, False), "wide32": (3, True)}
B, H, S = 1, 48, 8192


def use_plan(name: str) -> None:
    wide_gluon_launch.PARKED_TILES, wide_gluon_launch.NARROW_CHUNKS = PLANS[name]


def main(dims, causals, modes) -> None:
    shipped = (wide_gluon_launch.PARKED_TILES, wide_gluon_launch.NARROW_CHUNKS)
    for d in dims:
        for causal in causals:
            q, k, v = (torch.randn(B, S, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn_like(q)

            def forward() -> None:
                ft.flash_attn_func(q, k, v, causal=causal)

            def step() -> None:
                torch.autograd.grad(ft.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout)

            for mode in modes:
                flops = 4 * B * H * S * S * d * (3.5 if mode == "fwd_bwd" else 1.0) / (2 if causal else 1)
                best = {}
                for _ in range(2):
                    for name in PLANS:
                        use_plan(name)
                        ms = triton.testing.do_bench(forward if mode == "fwd" else step, warmup=25, rep=150,
                                                     return_mode="median")
                        best[name] = min(best.get(name, ms), ms)
                tflops = {name: flops / ms / 1e9 for name, ms in best.items()}
                base = tflops["shipped"]
                print(f"D={d} causal={int(causal)} {mode:7s} " + "  ".join(
                    f"{name} {t:6.1f} ({t / base:.3f}x)" for name, t in tflops.items()), flush=True)
    wide_gluon_launch.PARKED_TILES, wide_gluon_launch.NARROW_CHUNKS = shipped


if __name__ == "__main__":
    args = sys.argv[1:] + [None] * 3
    main([int(x) for x in (args[0] or "704,832,896,960").split(",")],
         [c == "1" for c in (args[1] or "0,1").split(",")],
         (args[2] or "fwd,fwd_bwd").split(","))
