"""Sweep the GEMM configs of gemm_launch.SWEEP_16BIT / SWEEP_FP32 on the GPU (fills its table).

Compiles every (config, layout, epilogue) variant in parallel worker processes first (they share
Triton's on-disk cache), then times each config on each shape in this process with do_bench
(median), next to cuBLAS (torch.matmul) and addmm + gelu. Writes JSON lines as it goes.

    PYTHONPATH=src python scripts/tune_gemm.py --out sweep.jsonl [--kinds 16bit] [--configs p128x256 ...]
        [--shapes 2048x2048x2048:NN ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import sys
import time

import torch

SHAPES_16 = [  # (M, N, K, layout)
    (8192, 8192, 8192, "NN"), (4096, 4096, 4096, "NN"), (2048, 2048, 2048, "NN"),
    (16384, 4096, 4096, "NN"), (16384, 4096, 4096, "NT"), (16384, 14336, 4096, "NT"),
    (16384, 4096, 14336, "NT"), (16384, 14336, 4096, "NN"), (16384, 4096, 14336, "NN"),
    (1024, 1024, 1024, "NN"), (512, 512, 512, "NN"), (256, 256, 256, "NN"),
]
SHAPES_32 = [(4096, 4096, 4096, "NN"), (1024, 1024, 1024, "NN")]


def operands(m, n, k, layout, dtype, device="cuda"):
    a = torch.randn(m, k, device=device, dtype=torch.float32).div_(math.sqrt(k)).to(dtype)
    w = torch.randn((k, n) if layout == "NN" else (n, k), device=device, dtype=dtype)
    return a, (w if layout == "NN" else w.mT), torch.randn(n, device=device, dtype=dtype)


def _jobs(kinds, configs=None, layouts=("NN", "NT")):
    from flashtile.gemm_launch import SWEEP_16BIT, SWEEP_FP32

    jobs = []
    for name, cfg in SWEEP_16BIT.items():
        if "16bit" in kinds and (not configs or name in configs):
            for layout in layouts:
                for fused in (False, True):
                    jobs.append(("16bit", name, layout, fused))
    for name in SWEEP_FP32:
        if "fp32" in kinds and (not configs or name in configs):
            jobs.append(("fp32", name, "NN", False))
    return jobs


def _compile(job):
    """Run one variant once on a small problem: same specialisation as the big one, fills the cache."""
    kind, name, layout, fused = job
    from flashtile.gemm_launch import SWEEP_16BIT, SWEEP_FP32, gemm_forward

    cfg = (SWEEP_16BIT if kind == "16bit" else SWEEP_FP32)[name]
    dtype = torch.bfloat16 if kind == "16bit" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = name.startswith("tf32")
    a, b, bias = operands(512, 512, 512, layout, dtype)
    t0 = time.time()
    try:
        gemm_forward(a, b, bias if fused else None, 1.0, "gelu" if fused else None, dtype, config=cfg)
        torch.cuda.synchronize()
        return job, f"ok {time.time() - t0:.1f}s"
    except Exception as exc:  # a config that does not fit is a result, not a crash
        return job, f"error {type(exc).__name__}: {str(exc)[:200]}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--rep-ms", type=float, default=40)
    p.add_argument("--rounds", type=int, default=3, help="time every variant this many times, interleaved")
    p.add_argument("--kinds", nargs="+", default=["16bit", "fp32"])
    # compiling every variant takes over 7 minutes on 16 cores: narrow the sweep to fit a time limit
    p.add_argument("--configs", nargs="+", default=None, help="only these config names")
    p.add_argument("--shapes", nargs="+", default=None, help="only these shapes, as MxNxK:LAYOUT")
    args = p.parse_args()
    from triton.testing import do_bench

    from flashtile.gemm_launch import SWEEP_16BIT, SWEEP_FP32, gemm_forward

    out = open(args.out, "w")
    t0 = time.time()
    shapes = None if args.shapes is None else {s.upper() for s in args.shapes}
    keep = lambda m, n, k, layout: shapes is None or f"{m}X{n}X{k}:{layout}" in shapes  # noqa: E731
    layouts = tuple(sorted({lay for (m, n, k, lay) in SHAPES_16 + SHAPES_32 if keep(m, n, k, lay)}))
    jobs = _jobs(args.kinds, args.configs, layouts)
    status = {}
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for job, msg in pool.imap_unordered(_compile, jobs):
            status[job] = msg
            print("compile", job, msg, flush=True)
    print(f"compiled {len(jobs)} variants in {time.time() - t0:.0f}s", flush=True)

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median")

    import torch.nn.functional as F

    plan = [("16bit", s) for s in SHAPES_16 if keep(*s)] if "16bit" in args.kinds else []
    plan += [("fp32", s) for s in SHAPES_32 if keep(*s)] if "fp32" in args.kinds else []
    for kind, (m, n, k, layout) in plan:
        dtype = torch.bfloat16 if kind == "16bit" else torch.float32
        torch.backends.cuda.matmul.allow_tf32 = False
        a, b, bias = operands(m, n, k, layout, dtype)
        flops = 2.0 * m * n * k
        row = {"M": m, "N": n, "K": k, "layout": layout, "dtype": str(dtype)}
        fns = {"cublas": lambda: torch.matmul(a, b), "addmm_gelu": lambda: F.gelu(torch.addmm(bias, a, b))}
        ref = torch.matmul(a.float(), b.float())
        table = SWEEP_16BIT if kind == "16bit" else SWEEP_FP32
        for name, cfg in table.items():
            if args.configs and name not in args.configs:
                continue
            torch.backends.cuda.matmul.allow_tf32 = name.startswith("tf32")
            for fused in ((False, True) if kind == "16bit" else (False,)):
                if not status.get((kind, name, layout if kind == "16bit" else "NN", fused), "").startswith("ok"):
                    continue
                fn = functools.partial(gemm_forward, a, b, bias if fused else None, 1.0, "gelu" if fused else None,
                                       dtype, config=cfg)
                try:
                    if not fused:
                        row[f"{name}_err"] = float((fn()[0].float() - ref).abs().max())
                    fns[name + ("_fused" if fused else "")] = fn
                except Exception as exc:
                    row[name + ("_fused" if fused else "")] = f"error {type(exc).__name__}: {str(exc)[:120]}"
        # rounds over every variant, median per variant: the clock drifts under minutes of full load,
        # and timing each variant once, in order, would charge the drift to the later ones
        times = {key: [] for key in fns}
        for _ in range(args.rounds):
            for key, fn in fns.items():
                times[key].append(bench(fn))
        for key, ts in times.items():
            row[key] = flops / sorted(ts)[len(ts) // 2] / 1e9
        out.write(json.dumps(row) + "\n")
        out.flush()
        best = max((v, key) for key, v in row.items() if isinstance(v, float) and not key.endswith("_err")
                   and key not in ("cublas", "addmm_gelu") and not key.endswith("_fused"))
        bestf = max(((v, key) for key, v in row.items() if isinstance(v, float) and key.endswith("_fused")),
                    default=(0, "-"))
        print(f"{m}x{n}x{k} {layout} {dtype}: cublas {row['cublas']:.0f} best {best[1]} {best[0]:.0f} | "
              f"addmm+gelu {row['addmm_gelu']:.0f} best fused {bestf[1]} {bestf[0]:.0f}  "
              f"({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
