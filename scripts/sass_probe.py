"""Offline SASS of the attention kernels for sm_90: registers, spills and each loop's instruction mix.

python scripts/sass_probe.py [CASE ...] [--list] [--loops-only]

No GPU is needed: the kernel is compiled for sm_90a with the divisibility hints the runtime gives
aligned pointers and strides, then assembled and disassembled with the ptxas / nvdisasm in the triton
wheel. Per loop (a backward branch) it prints the instruction count and the HGMMA (tensor core), MUFU
(exp2 / tanh), LDL / STL (spill) counts: a spill that sits in an inner loop costs every tile, one in
the outer head loop almost nothing. A case is a kernel, its flags and a tile config; see CASES.

Session 16 used it to rule out two leads (docs/perf_notes.md): the dK/dV kernel's 255-register
spills sit outside its query-tile loops, and a quarter fewer loop instructions left its time unchanged.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton

from flashtile.kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from flashtile.kernels.attention_fwd import attention_fwd_kernel
from flashtile.offline_compile import compile_for_sm90

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# flags of a plain D=128 bf16 call; a case overrides some
PLAIN = dict(HAS_LEFT=False, HAS_RIGHT=False, SOFTCAP=0, HAS_ALIBI=False, VARLEN=False, BLOCK_SPARSE=False,
             ATTN_MASK=0, DROPOUT=False, EVEN_D=True, EVEN_DV=True, TILE_MAJOR=False, HEAD_GROUP=0,
             SPLIT_PHASES=False, SEQLEN_Q=0, SEQLEN_K=0, BLOCK_D=128, BLOCK_DV=128, BLOCK_SQ=0, BLOCK_SK=0,
             DOT_PRECISION="ieee", BIAS_GRAD=False)
FWD, DQ, DKDV = attention_fwd_kernel, attention_bwd_dq_kernel, attention_bwd_dkdv_kernel
RAW = 3  # the forward's MAX_RAW (attention_launch.max_mode: plain scores, a positive scale)
# name -> (kernel, flags, (block_m, block_n, num_warps, num_stages)): the shipped H200 tiles (tuning.py)
CASES = {
    "fwd": (FWD, dict(MAX_MODE=RAW), (128, 128, 8, 3)),
    "fwd_128x64": (FWD, dict(MAX_MODE=RAW), (128, 64, 8, 3)),
    "fwd_causal": (FWD, dict(HAS_RIGHT=True, MAX_MODE=RAW), (128, 128, 8, 3)),
    "fwd_softcap": (FWD, dict(SOFTCAP=2), (128, 64, 8, 3)),
    "fwd_softcap_fixed_max": (FWD, dict(SOFTCAP=2, MAX_MODE=1), (128, 64, 8, 3)),
    # head dims 257..384 in the dense forward (dispatch.wide_forward_heads): 256 + 64 and 256 + 128 columns
    "fwd_d320": (FWD, dict(BLOCK_D=256, BLOCK_D2=64, BLOCK_DV=256, BLOCK_DV2=64, MAX_MODE=RAW), (128, 32, 8, 3)),
    "fwd_d384": (FWD, dict(BLOCK_D=256, BLOCK_D2=128, BLOCK_DV=256, BLOCK_DV2=128, MAX_MODE=2), (128, 32, 8, 2)),
    "dq": (DQ, {}, (128, 64, 8, 3)),
    "dkdv": (DKDV, {}, (64, 64, 4, 2)),
    # constant lengths as shipped (tuning.dkdv_constant_lengths), with aligned lse / delta rows (dkdv_aligned_rows)
    "dkdv_constant": (DKDV, dict(SEQLEN_Q=8192, SEQLEN_K=8192, ALIGN_LSE=True), (64, 64, 4, 2)),
    "dkdv_causal": (DKDV, dict(HAS_RIGHT=True), (64, 128, 8, 2)),
    "dkdv_causal_split": (DKDV, dict(HAS_RIGHT=True, SPLIT_PHASES=True), (64, 64, 4, 2)),
    "dkdv_causal_medium": (DKDV, dict(HAS_RIGHT=True, SEQLEN_Q=2048, SEQLEN_K=2048, ALIGN_LSE=True), (32, 64, 4, 3)),
    "dkdv_window": (DKDV, dict(HAS_LEFT=True, HAS_RIGHT=True, SEQLEN_Q=16384, SEQLEN_K=16384, ALIGN_LSE=True), (32, 64, 4, 3)),
    "dkdv_softcap": (DKDV, dict(SOFTCAP=2), (64, 64, 4, 2)),
    "dkdv_softcap_causal": (DKDV, dict(SOFTCAP=2, HAS_RIGHT=True, SEQLEN_Q=8192, SEQLEN_K=8192, ALIGN_LSE=True), (32, 64, 4, 3)),
    "dq_softcap": (DQ, dict(SOFTCAP=2), (128, 64, 8, 3)),
    "dkdv_alibi": (DKDV, dict(HAS_ALIBI=1), (64, 64, 4, 2)),
    "fwd_alibi": (FWD, dict(HAS_ALIBI=1), (128, 128, 8, 3)),
    "dq_alibi": (DQ, dict(HAS_ALIBI=1), (128, 64, 8, 3)),
    # causal: the one-sided bias as shipped above D = 64 (kernels/common.py's ALIBI_*: forward 3 =
    # both terms, backward 2 = key term); *_abs the |distance| form (1)
    "fwd_alibi_causal": (FWD, dict(HAS_ALIBI=3, HAS_RIGHT=True), (128, 128, 8, 3)),
    "fwd_alibi_causal_abs": (FWD, dict(HAS_ALIBI=1, HAS_RIGHT=True), (128, 128, 8, 3)),
    "dq_alibi_causal": (DQ, dict(HAS_ALIBI=2, HAS_RIGHT=True), (128, 64, 8, 3)),
    "dq_alibi_causal_abs": (DQ, dict(HAS_ALIBI=1, HAS_RIGHT=True), (128, 64, 8, 3)),
    "dkdv_alibi_causal": (DKDV, dict(HAS_ALIBI=2, HAS_RIGHT=True, SPLIT_PHASES=True), (64, 64, 4, 2)),
    "dkdv_alibi_causal_abs": (DKDV, dict(HAS_ALIBI=1, HAS_RIGHT=True, SPLIT_PHASES=True), (64, 64, 4, 2)),
    # two-sided (non-causal, windows with a right edge > 0): 4 = |key term - query term| in fp32 (the
    # forward above D = 64, dQ, dK/dV at D <= 64), against dq_alibi / fwd_alibi / dkdv_alibi (|distance|)
    "fwd_alibi_terms": (FWD, dict(HAS_ALIBI=4), (128, 128, 8, 3)),
    "dq_alibi_terms": (DQ, dict(HAS_ALIBI=4), (128, 64, 8, 3)),
    "dkdv_alibi_terms": (DKDV, dict(HAS_ALIBI=4), (64, 64, 4, 2)),
    # dropout with constant lengths and aligned rows; causal on the 32 x 64 tiles that two-chunk head dims
    # run (tuning.backward_config; a D=128 causal call runs 64 x 64)
    "dkdv_dropout": (DKDV, dict(DROPOUT=True, SEQLEN_Q=8192, SEQLEN_K=8192, ALIGN_LSE=True), (64, 64, 4, 2)),
    "dkdv_dropout_causal": (DKDV, dict(DROPOUT=True, HAS_RIGHT=True, SEQLEN_Q=8192, SEQLEN_K=8192, ALIGN_LSE=True),
                            (32, 64, 4, 3)),
    "fwd_dropout": (FWD, dict(DROPOUT=2, MAX_MODE=RAW), (128, 64, 8, 3)),
    "dq_dropout": (DQ, dict(DROPOUT=True), (128, 64, 8, 3)),
    "dkdv_block_sparse": (DKDV, dict(BLOCK_SPARSE=True, BLOCK_SQ=128, BLOCK_SK=128), (64, 128, 8, 3)),
    # a mask without partial blocks (BLOCK_SPARSE 2: no partial-list loop compiled in; session 24)
    "fwd_block_sparse_full": (FWD, dict(BLOCK_SPARSE=2, BLOCK_SQ=128, BLOCK_SK=128, MAX_MODE=RAW), (128, 64, 8, 3)),
    "dq_block_sparse_full": (DQ, dict(BLOCK_SPARSE=2, BLOCK_SQ=128, BLOCK_SK=128), (128, 64, 8, 3)),
    "dkdv_block_sparse_full": (DKDV, dict(BLOCK_SPARSE=2, BLOCK_SQ=128, BLOCK_SK=128), (64, 128, 8, 3)),
}


def compile_case(kernel, flags: dict, tiles) -> str:
    """PTX of kernel for sm_90 with flags over PLAIN and tiles, as an aligned bf16 call compiles it."""
    block_m, block_n, num_warps, num_stages = tiles
    constexprs = dict(PLAIN, **flags, BLOCK_M=block_m, BLOCK_N=block_n)
    return compile_for_sm90(kernel, "bf16", constexprs, num_warps, num_stages, aligned=True).asm["ptx"]


def assemble(ptx: str) -> tuple:
    """(ptxas -v report, SASS text) of ptx for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        report = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--gpu-name=sm_90a", src, "-o", cubin],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    return report, sass


def loops(sass: str) -> list:
    """[(first, last, opcode counter)] of each loop: a branch back to an earlier label."""
    opcodes, targets, labels, pending = [], [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        instr = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if instr:
            labels.update((p, len(opcodes)) for p in pending)
            pending = []
            text = instr.group(1).strip()
            opcodes.append(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0])
            branch = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
            targets.append(branch.group(1) if branch else None)
    return [(labels[t], i, collections.Counter(opcodes[labels[t]:i + 1]))
            for i, t in enumerate(targets) if t is not None and labels.get(t, 1 << 30) < i]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--top", type=int, default=0, help="also print each loop's N most frequent opcodes")
    a = ap.parse_args()
    if a.list:
        print("\n".join(CASES))
        return
    for name in a.cases or list(CASES):
        kernel, flags, tiles = CASES[name]
        report, sass = assemble(compile_case(kernel, flags, tiles))
        regs = re.search(r"Used (\d+) registers", report).group(1)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        print(f"{name}: {kernel.fn.__name__} {tiles[0]}x{tiles[1]} w{tiles[2]} s{tiles[3]}: {regs} registers, "
              f"spills {spill.group(1)} / {spill.group(2)} bytes (stores / loads)")
        for first, last, ops in loops(sass):
            if last - first < 2:
                continue
            count = sum(ops.values())
            mix = ", ".join(f"{k} {ops[k]}" for k in ("HGMMA.64x64x16.F32.BF16", "HGMMA.64x128x16.F32.BF16",
                                                     "MUFU.EX2", "MUFU.TANH", "LDL", "STL") if ops[k])
            print(f"  loop {first}-{last}: {count} instructions; {mix}")
            if a.top:
                print("    " + ", ".join(f"{k} {v}" for k, v in ops.most_common(a.top)))


if __name__ == "__main__":
    main()
