"""Where the time of one attention training step goes: kernels vs host overhead.

python scripts/profile_step.py --seqlen 512 --headdim 128 [--causal]
Prints the median of forward, backward-launcher and autograd fwd+bwd, and a torch.profiler table.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton

import flashtile as ft
from flashtile.attention_launch import attention_backward, attention_forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    a = ap.parse_args()
    S, D = a.seqlen, a.headdim
    B, H = 16384 // S, 2048 // D
    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale, right = 1 / math.sqrt(D), (0 if a.causal else None)
    out, lse = attention_forward(q, k, v, scale, None, right)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def step():
        ft.flash_attn_func(qg, kg, vg, causal=a.causal).backward(do)

    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731
    t_fwd = bench(lambda: attention_forward(q, k, v, scale, None, right))
    t_bwd = bench(lambda: attention_backward(do, q, k, v, out, lse, scale, None, right))
    t_step = bench(step)
    t_api_fwd = bench(lambda: ft.flash_attn_func(q, k, v, causal=a.causal))
    print(f"S={S} D={D} causal={a.causal}: fwd {t_fwd*1e3:.0f} us, bwd {t_bwd*1e3:.0f} us, "
          f"api fwd {t_api_fwd*1e3:.0f} us, autograd step {t_step*1e3:.0f} us")
    import time

    def host_us(f, n=200):
        """Host time per call with the GPU queue never full: what the CPU spends to launch f."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / n * 1e6

    print(f"host us per call: empty {host_us(lambda: torch.empty(8, device='cuda')):.1f}, "
          f"launcher fwd {host_us(lambda: attention_forward(q, k, v, scale, None, right), 50):.1f}, "
          f"launcher bwd {host_us(lambda: attention_backward(do, q, k, v, out, lse, scale, None, right), 20):.1f}, "
          f"api fwd {host_us(lambda: ft.flash_attn_func(q, k, v, causal=a.causal), 50):.1f}")
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
