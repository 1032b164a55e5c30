"""Probe (not shipped): a warp-specialised ping-pong GEMM in Gluon for sm_90, bias + gelu epilogue.

One producer warp issues the TMA loads of every tile a persistent program runs into one ring of
stages; two consumer warpgroups take alternate tiles (128 x 128 each, the accumulator 128 registers a
thread), so that one's epilogue can overlap the other's main loop. docs/perf_notes.md session 34 has
what it measured: plain GEMM 0.92-1.09x cuBLAS (flashtile.gemm's Triton kernel 0.99-1.07x in the same
runs), bias + gelu 0.97-1.09x addmm + gelu (flashtile.gemm 0.99-1.04x); the gelu epilogue still cost
it 4-12%. Not wired into ft.gemm.

    python scripts/probe_gluon_gemm.py --compile [BM BN BK STAGES]   # offline, no GPU: smem, registers
    python scripts/probe_gluon_gemm.py [--configs 128,128,64,4;...]  # on an H200: interleaved timings

The two consumers read one ring in tile order. A consumer whose next tile starts k_tiles ring
positions ahead must not wait on those stages before the other consumer has passed the waits of its
own tile: an mbarrier wait checks a phase parity, so a wait two or more phases ahead returns at once
(the first version did this and read stale stages: wrong results at two tiles a program, a launch
failure at more). The `order` barriers hand the turn from one consumer to the other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from flashtile.kernels.gemm import ACT_GELU, _gelu, _tile_coords  # Gluon calls Triton helpers as they are

GELU = ACT_GELU.value


@gluon.jit
def _tile_counts(M, N, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    """(program id, programs, tile rows, tile columns, k-steps a tile, tiles): every partition walks the
    same tiles in the same order."""
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    return gl.program_id(0), gl.num_programs(0), num_pid_m, num_pid_n, gl.cdiv(K, BK), num_pid_m * num_pid_n


@gluon.jit
def _b_view(buf, B_TRANS: gl.constexpr):
    if B_TRANS:
        return buf.permute((1, 0))
    else:
        return buf


@gluon.jit
def _producer(a_desc, b_desc, c_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M: gl.constexpr,
              B_TRANS: gl.constexpr):
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    pid, nprog, num_pid_m, num_pid_n, k_tiles, total = _tile_counts(M, N, K, BM, BN, BK)
    c = 0
    for t in range(pid, total, nprog):
        _, pid_m, pid_n = _tile_coords(t, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        for kk in range(k_tiles):
            s = c % STAGES
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, kk * BK], bar, a_bufs.index(s))
            if B_TRANS:
                tma.async_copy_global_to_shared(b_desc, [off_n, kk * BK], bar, b_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(b_desc, [kk * BK, off_n], bar, b_bufs.index(s))
            c += 1


@gluon.jit
def _consumer(a_desc, b_desc, c_desc, bias_ptr, a_bufs, b_bufs, c_bufs, ready, empty, order, M, N, K,
              GROUP_M: gl.constexpr, B_TRANS: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
              WG: gl.constexpr):
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    dtype: gl.constexpr = c_desc.dtype
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    pid, nprog, num_pid_m, num_pid_n, k_tiles, total = _tile_counts(M, N, K, BM, BN, BK)
    c_smem = c_bufs.index(WG)
    c = WG * k_tiles
    n = 0
    for t in range(pid + WG * nprog, total, 2 * nprog):
        _, pid_m, pid_n = _tile_coords(t, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        # ping-pong: start waiting on this tile's stages only once the other consumer has passed the
        # waits of its tile (a wait more than one ring pass ahead would read a stale phase parity)
        if WG == 1:
            mbarrier.wait(order.index(1), n & 1)
        else:
            if n > 0:
                mbarrier.wait(order.index(0), (n - 1) & 1)
        n += 1
        acc = gl.zeros([BM, BN], gl.float32, mma_layout)
        prev = 0
        for kk in range(k_tiles):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), _b_view(b_bufs.index(s), B_TRANS), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            mbarrier.arrive(empty.index(prev), count=1, pred=kk > 0)
            prev = s
            c += 1
        mbarrier.arrive(order.index(1 - WG), count=1)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index(prev), count=1)
        c += k_tiles  # the other consumer's tile
        if HAS_BIAS:
            offs_n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
            bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            acc = acc + gl.expand_dims(bias, 0)
        if ACT == ACT_GELU:
            acc = _gelu(acc, True)
        tma.store_wait(0)
        c_smem.store(acc.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
    tma.store_wait(0)


@gluon.jit
def gemm_ws_kernel(a_desc, b_desc, c_desc, bias_ptr, M, N, K, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                   B_TRANS: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                   PRODUCER_REGS: gl.constexpr):
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_bufs = gl.allocate_shared_memory(dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)
    # The argument tuples are written out per partition: in Triton 3.6 a tuple built first and passed by
    # name turns its constexprs into tensors, and the partitions' `if B_TRANS` then compiles both arms.
    gl.warp_specialize([
        (_consumer, (a_desc, b_desc, c_desc, bias_ptr, a_bufs, b_bufs, c_bufs, ready, empty, order, M, N, K, GROUP_M,
                     B_TRANS, ACT, HAS_BIAS, 0)),
        (_consumer, (a_desc, b_desc, c_desc, bias_ptr, a_bufs, b_bufs, c_bufs, ready, empty, order, M, N, K, GROUP_M,
                     B_TRANS, ACT, HAS_BIAS, 1)),
        (_producer, (a_desc, b_desc, c_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M, B_TRANS))],
        [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _descriptors(a, b, c, b_trans, BM, BN, BK):
    dt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[a.dtype]
    shared = gl.NVMMASharedLayout.get_default_for
    bb = [BN, BK] if b_trans else [BK, BN]
    return (TensorDescriptor.from_tensor(a, [BM, BK], shared([BM, BK], dt)),
            TensorDescriptor.from_tensor(b, bb, shared(bb, dt)),
            TensorDescriptor.from_tensor(c, [BM, BN], shared([BM, BN], dt)))


def gemm_ws(a, b, bias=None, act=0, b_trans=False, BM=128, BN=128, BK=64, STAGES=4, GROUP_M=8, regs=(232, 40),
            maxnreg=168):
    """a [M, K] @ b [K, N] (b_trans: b is w [N, K] and the product a @ w.T), then + bias [N] and gelu (act 2).

    Registers: 3 warpgroups x maxnreg 168 = 64512 of the SM's 65536; the consumers take 232 each and the
    producer's warpgroup 40 (setmaxnreg)."""
    M, K = a.shape
    N = b.shape[0] if b_trans else b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    a_desc, b_desc, c_desc = _descriptors(a, b, c, b_trans, BM, BN, BK)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)), )
    gemm_ws_kernel[grid](a_desc, b_desc, c_desc, bias if bias is not None else a, M, N, K, STAGES, GROUP_M, b_trans,
                         act, bias is not None, regs[0], regs[1], num_warps=4, maxnreg=maxnreg)
    return c


def compile_offline(BM: int, BN: int, BK: int, STAGES: int) -> None:
    """Compile the bias + gelu kernel for sm_90 without a GPU; print its shared memory and registers."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import native_specialize_impl

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sass_probe import assemble

    a, b, c = (torch.empty(1024, 1024, dtype=torch.bfloat16) for _ in range(3))
    descs = _descriptors(a, b, c, False, BM, BN, BK)
    signature = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
                 for name, d in zip(("a_desc", "b_desc", "c_desc"), descs)}
    signature.update(bias_ptr="*bf16", M="i32", N="i32", K="i32")
    consts = dict(STAGES=STAGES, GROUP_M=8, B_TRANS=False, ACT=GELU, HAS_BIAS=True, CONSUMER_REGS=232,
                  PRODUCER_REGS=40)
    constants = {}
    for i, p in enumerate(gemm_ws_kernel.params):
        if p.name in consts:
            signature[p.name] = "constexpr"
            constants[(i, )] = consts[p.name]
    kernel = triton.compile(GluonASTSource(gemm_ws_kernel, signature, constants, {}),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
    report, _ = assemble(kernel.asm["ptx"])
    print(f"{BM}x{BN}x{BK} {STAGES} stages: shared memory {kernel.metadata.shared} bytes;",
          " ".join(line.split(":")[-1].strip() for line in report.splitlines() if "registers" in line))


def bench(configs, shapes) -> None:
    """flashtile.gemm and this kernel against cuBLAS (plain) and addmm + gelu, 3 interleaved rounds."""
    import torch.nn.functional as F

    import flashtile as ft

    timed = lambda f: triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median")  # noqa: E731
    for name, M, N, K in shapes:
        for layout in ("NN", "NT"):
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            b = w if layout == "NT" else w.T.contiguous()
            bm = w.mT if layout == "NT" else b
            bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            ref = F.gelu(torch.addmm(bias, a, bm)).float()
            fns = {"cublas": lambda: torch.matmul(a, bm), "addmm_gelu": lambda: F.gelu(torch.addmm(bias, a, bm)),
                   "ft": lambda: ft.gemm(a, bm), "ft_gelu": lambda: ft.gemm(a, bm, bias, activation="gelu")}
            for cfg in configs:
                kw = dict(b_trans=layout == "NT", BM=cfg[0], BN=cfg[1], BK=cfg[2], STAGES=cfg[3])
                err = (gemm_ws(a, b, bias, GELU, **kw).float() - ref).abs().max().item()
                print(f"  {cfg} {layout} max |error| of bias + gelu {err:.4f}")
                fns[f"ws{cfg}"] = lambda kw=kw: gemm_ws(a, b, None, 0, **kw)
                fns[f"ws{cfg}_gelu"] = lambda kw=kw: gemm_ws(a, b, bias, GELU, **kw)
            times = {k: [] for k in fns}
            for _ in range(3):
                for k, f in fns.items():
                    times[k].append(timed(f))
            tf = {k: 2 * M * N * K / statistics.median(v) / 1e9 for k, v in times.items()}
            print(f"{name} {layout}: " + " ".join(f"{k} {v:.0f}" for k, v in tf.items()))
            for k in tf:
                if k.startswith(("ft", "ws")) and not k.endswith("_gelu"):
                    print(f"    {k}: plain / cuBLAS {tf[k] / tf['cublas']:.3f}, "
                          f"bias + gelu / addmm + gelu {tf[k + '_gelu'] / tf['addmm_gelu']:.3f}")


SHAPES = [("4096^3", 4096, 4096, 4096), ("8192^3", 8192, 8192, 8192), ("up4096", 16384, 4096, 4096),
          ("up14336", 16384, 14336, 4096), ("down14336", 16384, 4096, 14336)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", nargs="*", type=int, help="offline compile: BM BN BK STAGES (default 128 128 64 4)")
    ap.add_argument("--configs", default="128,128,64,4;128,128,64,5", help="BM,BN,BK,STAGES;...")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    a = ap.parse_args()
    if a.compile is not None:
        compile_offline(*(a.compile or [128, 128, 64, 4]))
        return
    configs = [tuple(int(x) for x in c.split(",")) for c in a.configs.split(";")]
    bench(configs, [s for s in SHAPES if s[0] in a.shapes.split(",")])


if __name__ == "__main__":
    main()
