"""Host time of one flashtile.gemm call, layer by layer, and where the fused epilogue's time goes (GPU).

    PYTHONPATH=src python3 scripts/profile_gemm_host.py [--calls 400] [--epilogue]

Host times: a loop of --calls calls without synchronising, divided by the count, on a 256^3 problem
whose GPU time (a few us) is below the host time, so the loop measures the host. Then a cProfile of
ft.gemm. With --epilogue: launcher-level TFLOP/s (do_bench medians) of the plain, bias, gelu and
bias+gelu kernels against torch.matmul / addmm / addmm + gelu on the bench's large shapes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch


def _host_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return host


def host_breakdown(calls: int) -> None:
    import flashtile as ft
    import importlib

    gemm_api = importlib.import_module("flashtile.gemm")  # the package attribute `gemm` is the function
    from flashtile import gemm_launch as gl
    from flashtile.dispatch import resolve_backend
    from flashtile.kernels.gemm import gemm_kernel

    for size in (256, 2048):
        a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(size, device="cuda", dtype=torch.bfloat16)
        M = N = K = size
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        grid, args, meta = gl.launch_args(gl._mat2(a, M, K), gl._mat2(b, K, N), gl._mat2(out, M, N), None, None,
                                          1.0, 0, None)
        compiled = gemm_kernel[grid](*args, **meta)
        constexprs = [meta[p.name] for p in gemm_kernel.params if p.is_constexpr]
        full = (*args, *constexprs)  # the kernel's parameters in order: positional args, then constexprs
        assert [p.is_constexpr for p in gemm_kernel.params] == [False] * len(args) + [True] * len(constexprs)
        runner = compiled[(grid[0], 1, 1)]
        rows = {
            "torch.matmul": lambda: torch.matmul(a, b),
            "torch.addmm": lambda: torch.addmm(bias, a, b),
            "ft.gemm": lambda: ft.gemm(a, b),
            "ft.gemm + bias": lambda: ft.gemm(a, b, bias),
            "gemm._check": lambda: gemm_api._check(a, b, None, 1.0, None, None),
            "resolve_backend": lambda: resolve_backend(a.device),
            "gemm_forward": lambda: gl.gemm_forward(a, b, None, 1.0, None, torch.bfloat16),
            "launch_args": lambda: gl.launch_args(gl._mat2(a, M, K), gl._mat2(b, K, N), gl._mat2(out, M, N), None,
                                                  None, 1.0, 0, None),
            "torch.empty": lambda: torch.empty(M, N, device="cuda", dtype=torch.bfloat16),
            "kernel[grid](...) prebuilt args": lambda: gemm_kernel[grid](*args, **meta),
            "CompiledKernel[grid](...)": lambda: runner(*full),
        }
        print(f"\n== host time per call, {size}^3 bf16 (us) ==")
        for name, fn in rows.items():
            print(f"{name:36s} {_host_us(fn, calls):8.1f}")

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    prof = cProfile.Profile()
    ft.gemm(a, a)
    prof.enable()
    for _ in range(calls):
        ft.gemm(a, a)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    print(f"\n== cProfile of {calls} ft.gemm calls (2048^3), by own time ==")
    print(text.getvalue())


def epilogue(shapes) -> None:
    import torch.nn.functional as F
    import triton.testing

    from flashtile import gemm_launch as gl

    for M, N, K in shapes:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        flop = 2 * M * N * K
        rows = {
            "cuBLAS matmul": lambda: torch.matmul(a, b),
            "addmm": lambda: torch.addmm(bias, a, b),
            "addmm + gelu": lambda: F.gelu(torch.addmm(bias, a, b)),
            "ft plain": lambda: gl.gemm_forward(a, b, None, 1.0, None, torch.bfloat16),
            "ft bias": lambda: gl.gemm_forward(a, b, bias, 1.0, None, torch.bfloat16),
            "ft gelu": lambda: gl.gemm_forward(a, b, None, 1.0, "gelu", torch.bfloat16),
            "ft relu": lambda: gl.gemm_forward(a, b, None, 1.0, "relu", torch.bfloat16),
            "ft bias+gelu": lambda: gl.gemm_forward(a, b, bias, 1.0, "gelu", torch.bfloat16),
        }
        print(f"\n== {M}x{N}x{K} bf16, TFLOP/s (median) ==")
        for name, fn in rows.items():
            ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
            print(f"{name:16s} {flop / ms / 1e9:8.1f}  ({ms * 1e3:8.1f} us)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--epilogue", action="store_true")
    args = p.parse_args()
    host_breakdown(args.calls)
    if args.epilogue:
        epilogue([(2048, 2048, 2048), (4096, 4096, 4096), (16384, 14336, 4096), (16384, 4096, 14336)])


if __name__ == "__main__":
    main()
