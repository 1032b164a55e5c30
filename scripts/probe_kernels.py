"""Per-kernel GPU time of one forward + backward step for several attention variants (diagnosis).

python scripts/probe_kernels.py [--only NAME ...]
Prints, per variant, the mean time per step of each kernel (torch.profiler) and the total.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import flashtile as ft
from flashtile.bench import suites, variants


def _dense(B, S, H, D=128, Hkv=None, **kw):
    dev = torch.device("cuda")
    q = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, S, Hkv or H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    return lambda: ft.flash_attn_func(q, k, v, **kw)


def _varlen():
    dev = torch.device("cuda")
    case = [c for c in suites.variants_suite() if c.shape.get("variant") == "varlen"][0]
    cu, longest = variants.varlen_offsets(case.shape, dev)
    total, H = int(case.shape["Sq"]), int(case.shape["H"])
    q, k, v = (torch.randn(total, H, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return lambda: ft.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)


VARIANTS = {
    "dense": lambda: _dense(2, 8192, 16),
    "dense_causal": lambda: _dense(2, 8192, 16, causal=True),
    "dropout": lambda: _dense(2, 8192, 16, dropout_p=0.1),
    "dropout_causal": lambda: _dense(2, 8192, 16, dropout_p=0.1, causal=True),
    "window": lambda: _dense(1, 16384, 16, causal=True, window_size=(1024, 0)),
    "gqa_causal": lambda: _dense(1, 8192, 32, Hkv=8, causal=True),
    "softcap": lambda: _dense(2, 8192, 16, softcap=30.0),
    "varlen": _varlen,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    for name, make in VARIANTS.items():
        if a.only and name not in a.only:
            continue
        fn = make()
        out = fn()
        grad = torch.randn_like(out)
        for _ in range(3):
            fn().backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                fn().backward(grad)
            torch.cuda.synchronize()
        times = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name[:40]] += e.device_time / a.steps
        total = sum(times.values())
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1]) if v > 5)
        print(f"{name}: total {total:.0f} us: {parts}", flush=True)


if __name__ == "__main__":
    main()
