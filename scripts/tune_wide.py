"""Config sweep for the wide-head kernels (kernels/attention_wide.py) on a GPU.

    PYTHONPATH=src python3 scripts/tune_wide.py --dims 320 512 640 1024 --fwd 64,64,64,8,3,512 128,64,64,8,3,256 \
        --bwd 64,64,64,8,3,512 --max-seconds 200

A config is block_m,block_n,block_k,num_warps,num_stages,max_part. Forward configs are
timed on wide_forward; backward configs on each backward kernel separately (dQ, dK, dV launches timed
with CUDA events around the launch). Shapes: the wide suite's (B=1, H=48, S=8192, bf16). Prints one
line per measurement as it goes (TFLOP/s of that kernel's share of the work).
"""

from __future__ import annotations

import argparse
import time

import torch


def _cfg(text: str):
    from flashtile.tuning import WideConfig

    return WideConfig(*(int(x) for x in text.split(",")))


def _median_ms(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dims", nargs="+", type=int, default=[512])
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--fwd", nargs="*", default=[])
    p.add_argument("--bwd", nargs="*", default=[])
    p.add_argument("--max-seconds", type=float, default=240)
    args = p.parse_args()

    from flashtile import wide_launch
    from flashtile.tuning import WideBackwardConfig

    t0 = time.time()
    S, H = args.seqlen, args.heads
    right = 0 if args.causal else None
    for d in args.dims:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(1, S, H, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
        scale = d ** -0.5
        fwd_flops = 4.0 * H * S * S * d / (2 if args.causal else 1)
        ref = None
        for text in args.fwd:
            if time.time() - t0 > args.max_seconds:
                print("time budget reached", flush=True)
                return
            cfg = _cfg(text)
            try:
                run = lambda: wide_launch.wide_forward(q, k, v, scale, None, right, config=cfg)  # noqa: E731
                out, lse = run()
                err = 0.0 if ref is None else (out.float() - ref).abs().max().item()
                if ref is None:
                    ref = out.float()
                ms = _median_ms(run)
                print(f"fwd D={d} causal={args.causal} {text}: {ms:.2f} ms {fwd_flops / ms / 1e9:.0f} TFLOP/s "
                      f"(max diff vs first {err:.1e})", flush=True)
            except Exception as e:  # a config that does not fit: report and go on
                print(f"fwd D={d} {text}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        if not args.bwd:
            continue
        out, lse = wide_launch.wide_forward(q, k, v, scale, None, right)
        names = ("dq", "dk", "dv")
        # dQ: S, dP and dS K (3 GEMM units of 2*S*S*d); dK: S, dP, dS^T Q (3); dV: S, P^T dO (2)
        shares = {"dq": 3 / 5, "dk": 3 / 5, "dv": 2 / 5}
        for text in args.bwd:
            if time.time() - t0 > args.max_seconds:
                print("time budget reached", flush=True)
                return
            cfg = _cfg(text)
            timings = {n: [] for n in names}
            real_run = wide_launch._run

            def timed(kernel, grid, c, a, meta, _real=real_run):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _real(kernel, grid, c, a, meta)
                end.record()
                name = "dq" if "DKDV" not in meta else ("dk" if meta["DKDV"] else "dv")
                timings[name].append((start, end))

            try:
                wide_launch._run = timed
                bcfg = WideBackwardConfig(cfg, cfg, cfg)
                for _ in range(3):
                    wide_launch.wide_backward(do, q, k, v, out, lse, scale, None, right, config=bcfg)
                torch.cuda.synchronize()
                res = []
                total = 0.0
                for n in names:
                    ms = sorted(s.elapsed_time(e) for s, e in timings[n][1:])[0]
                    total += ms
                    res.append(f"{n} {ms:.2f} ms {shares[n] * 2.5 * fwd_flops / ms / 1e9:.0f}")
                print(f"bwd D={d} causal={args.causal} {text}: " + ", ".join(res)
                      + f"; total {total:.2f} ms = {2.5 * fwd_flops / total / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as e:
                print(f"bwd D={d} {text}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            finally:
                wide_launch._run = real_run


if __name__ == "__main__":
    main()
