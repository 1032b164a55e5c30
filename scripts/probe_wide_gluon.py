"""Offline SASS of the Gluon wide kernels (sm_90, no GPU needed): registers, spills, shared memory, walk loop.

PYTHONPATH=src python scripts/probe_wide_gluon.py CASE [CASE ...] [--save DIR]
  CASE  f,D,Dv,DVP,causal,stages[,kc]         the forward (kernels/attention_wide_gluon.py), O slice DVP
        b,mode,D,Dv,DZP,causal,stages[,kc]    the backward (attention_wide_gluon_bwd.py), mode 0 dV / 1 dK / 2 dQ
  e.g.  f,832,832,832,0,2  b,1,960,960,960,1,4,32

Per case: registers, spill bytes, shared memory, and the longest loop's length with its LDL / STL
(a spill there costs every walk tile). --save DIR writes each case's SASS without addresses, so two
trees can be compared byte for byte (session 40 checked that the shipped configurations' SASS did not
change this way: docs/perf_notes.md).
"""

from __future__ import annotations

import argparse
import os
import re

import torch
import triton
from sass_probe import assemble, loops
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import native_specialize_impl

from flashtile import wide_gluon_launch as launch
from flashtile.kernels.attention_wide_gluon import BLOCK_M, wide_fwd_gluon_kernel
from flashtile.kernels.attention_wide_gluon_bwd import wide_bwd_gluon_kernel

BN = launch.KEYS_PER_TILE


def _desc(t: torch.Tensor, rows: int, cols: int):
    return launch._descriptor(t, launch._tma_view(t), rows, cols)


def _compile(kernel, descs: dict, scalars: dict, consts: dict):
    sig = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0] for name, d in descs.items()}
    sig.update(scalars)
    constants = {}
    for i, p in enumerate(kernel.params):
        if p.name in consts:
            sig[p.name] = "constexpr"
            constants[(i,)] = consts[p.name]
    return triton.compile(GluonASTSource(kernel, sig, constants, {}), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=8))


def forward(d: int, dv: int, dvp: int, causal: int, stages: int, kc: int = 64):
    q, v = torch.empty(1, BN, 2, d, dtype=torch.bfloat16), torch.empty(1, BN, 2, dv, dtype=torch.bfloat16)
    descs = dict(q_desc=_desc(q, BLOCK_M, kc), k_desc=_desc(q, BN, kc), v_desc=_desc(v, BN * kc // 512, 64))
    ints = ("stride_ob", "stride_os", "stride_oh", "stride_lse_b", "stride_lse_h", "seqlen_q", "seqlen_k", "heads_q",
            "group_size", "n_pass", "v_col_base")
    scalars = dict(Out="*bf16", Lse="*fp32", qk_scale="fp32", **{n: "i32" for n in ints})
    consts = dict(DQK=d, DV=dv, DVP=dvp, BM=BLOCK_M, BN=BN, KC=kc, STAGES=stages, CAUSAL=bool(causal), PARK=dvp > 512)
    return _compile(wide_fwd_gluon_kernel, descs, scalars, consts)


def backward(mode: int, d: int, dv: int, dzp: int, causal: int, stages: int, kc: int = 64):
    q, v = torch.empty(1, BN, 2, d, dtype=torch.bfloat16), torch.empty(1, BN, 2, dv, dtype=torch.bfloat16)
    descs = dict(x1_desc=_desc(q, BLOCK_M, kc), y1_desc=_desc(q, BN, kc), x2_desc=_desc(v, BLOCK_M, kc),
                 y2_desc=_desc(v, BN, kc), z_desc=_desc(v if mode == 0 else q, BN * kc // 512, 64))
    ints = ("stride_xb", "stride_xs", "stride_xh", "stride_lse_b", "stride_lse_h", "seqlen_q", "seqlen_k", "heads_q",
            "group_size", "n_pass", "z_col_base")
    scalars = dict(DX="*bf16", Lse="*fp32", Delta="*fp32", qk_scale="fp32", out_scale="fp32", **{n: "i32" for n in ints})
    consts = dict(MODE=mode, DQK=d, DV=dv, DZP=dzp, BM=BLOCK_M, BN=BN, KC=kc, STAGES=stages, CAUSAL=bool(causal),
                  PARK=dzp > 512)
    return _compile(wide_bwd_gluon_kernel, descs, scalars, consts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--save", help="directory for each case's SASS (addresses stripped)")
    args = parser.parse_args()
    for case in args.cases:
        kind, *numbers = case.split(",")
        compiled = (forward if kind == "f" else backward)(*map(int, numbers))
        report, sass = assemble(compiled.asm["ptx"])
        regs = re.search(r"Used (\d+) registers", report).group(1)
        stack = re.search(r"(\d+) bytes cumulative stack size", report)
        start, end, mix = max(loops(sass), key=lambda loop: loop[1] - loop[0])
        ldl = sum(n for op, n in mix.items() if op.startswith("LDL"))
        stl = sum(n for op, n in mix.items() if op.startswith("STL"))
        print(f"{case}: {regs} registers, {stack.group(1) if stack else 0} bytes of stack, shared "
              f"{compiled.metadata.shared}, walk loop {end - start + 1} instructions, LDL {ldl} STL {stl}", flush=True)
        if args.save:
            lines = (re.sub(r"/\*[0-9a-f]{4,}\*/", "", line).strip() for line in sass.splitlines())
            body = [line for line in lines if line and not line.startswith(("//", ".", "#"))]
            with open(os.path.join(args.save, case.replace(",", "_") + ".sass"), "w") as f:
                f.write("\n".join(body))


if __name__ == "__main__":
    main()
