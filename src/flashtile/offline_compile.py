"""Compile a flashtile kernel for Hopper (sm_90) without a GPU: Triton's compiler and the ptxas in the
triton wheel need no driver. Used by tests/test_kernels_compile.py (every shipped specialisation
compiles) and scripts/sass_probe.py (registers, spills and SASS of one config).

A kernel's run-time arguments get their Triton types from flashtile's naming convention: capitalised
names are pointers (fp32 / int32 / uint8 for the buffers listed below, else the input element type;
ElemTiles holds int64 key intervals under BLOCK_SPARSE 3), FLOAT_SCALARS are fp32, every other
scalar int32.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FP32_POINTERS = {"Lse", "Delta", "Alibi", "AttnMask", "DBias"}
INT32_POINTERS = {"CuSeqQ", "CuSeqK", "FullNum", "FullIdx", "PartNum", "PartIdx", "PartTile", "ProgramOrder"}
UINT8_POINTERS = {"ElemTiles"}
FLOAT_SCALARS = {"softmax_scale", "softcap", "drop_scale"}


def compile_for_sm90(kernel, elem: str, constexprs: dict, num_warps: int = 8, num_stages: int = 2,
                     aligned: bool = False):
    """triton.compile of kernel for sm_90 with its constexprs (those with a default may be left out);
    elem: the inputs' type ("bf16", "fp32").

    aligned: give every pointer, and every stride the kernel lets Triton specialise, the divisibility
    by 16 that the runtime finds on contiguous tensors with aligned rows, so the code is what a
    typical call runs (without it the compile is the most general one).
    """
    not_specialised = set(getattr(kernel, "do_not_specialize", ()))
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constants[(i,)] = constexprs[p.name] if p.name in constexprs or not p.has_default else p.default
        elif p.name[0].isupper():
            signature[p.name] = ("*fp32" if p.name in FP32_POINTERS else "*i32" if p.name in INT32_POINTERS
                                 else "*u8" if p.name in UINT8_POINTERS else f"*{elem}")
            if p.name == "ElemTiles" and constexprs.get("BLOCK_SPARSE") == 3:  # BlockMask.partial_intervals
                signature[p.name] = "*i64"
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in FLOAT_SCALARS:
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
            if aligned and p.name.startswith("stride") and p.name not in not_specialised:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
