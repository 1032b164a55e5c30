"""How much the attention kernels gain when lengths and strides are compile-time constants (diagnosis).

python scripts/probe_constants.py [--kernels fwd bwd]

FlexAttention's generated kernels have the sequence lengths, the softmax scale and every stride as
literal constants (torch.compile specialises per shape); ours take them as run-time arguments. This
script builds variants of the shipped kernels whose parameters in one group become tl.constexpr
(the kernel bodies are unchanged, so the results must be bit-identical), and times each against the
shipped kernel on the standard suite's D=128 shapes:
  all      lengths, head counts, head dims, softmax scale, window edges and every stride;
  rowhead  the row and head strides of the tensors (they depend on H and D only, not on S);
  seqlen   seqlen_q and seqlen_k.
Launches go through Triton's front door for both sides (no launch plans), so compare within a row.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import re
import sys
import tempfile

import torch
import triton

from flashtile import attention_launch as launch
from flashtile.kernels import attention_bwd, attention_fwd

GROUPS = {
    "all": r"^(stride_\w+|seqlen_q|seqlen_k|heads_q|group_size|heads_per_program|n_head_programs|head_dim"
           r"|head_dim_v|softmax_scale|window_left|window_right)$",
    "rowhead": r"^stride_(q|k|v|o|do|dq|dk|dv)(s|h)$",
    "seqlen": r"^(seqlen_q|seqlen_k)$",
}
KERNELS = {"fwd": ("attention_fwd_kernel",), "bwd": ("attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")}
SHAPES = (("S=512 non-causal", 32, 512, None), ("S=512 causal", 32, 512, 0), ("S=2048 non-causal", 8, 2048, None),
          ("S=8192 non-causal", 2, 8192, None), ("S=8192 causal", 2, 8192, 0))


def _variant_source(kernel, name: str, pattern: re.Pattern) -> str:
    """The kernel's source under a new name, with the parameters that match pattern as tl.constexpr."""
    src = inspect.getsource(kernel.fn)
    src = src[src.index("def "):]  # drop the decorator (its do_not_specialize names plain parameters)
    head, body = src.split("):\n", 1)
    opening = head.index("(") + 1
    params = []
    for p in head[opening:].split(","):
        s = p.strip()
        params.append(p.replace(s, s + ": tl.constexpr") if s and ":" not in s and pattern.match(s) else p)
    return ("@triton.jit\n" + head[:opening].replace(kernel.fn.__name__, name) + ",".join(params) + "):\n" + body)


def _build_variants(kernel_names) -> object:
    """A module holding <kernel>__<group> for each kernel and group (its helpers come from the shipped
    modules; Triton needs the source in a file)."""
    code = ["import triton", "import triton.language as tl",
            "from flashtile.kernels.attention_fwd import *", "from flashtile.kernels.attention_bwd import *",
            "from flashtile.kernels.attention_fwd import _fwd_tile, _fwd_tiles, _fwd_block_list",
            "from flashtile.kernels.attention_bwd import (_dkdv_tile, _dkdv_tiles, _dkdv_block_list, _dq_tile,",
            "                                            _dq_tiles, _dq_block_list, _load_lse2)",
            "from flashtile.kernels.common import *", ""]
    for kname in kernel_names:
        kernel = getattr(attention_fwd if kname == "attention_fwd_kernel" else attention_bwd, kname)
        for group, pattern in GROUPS.items():
            code.append(_variant_source(kernel, f"{kname}__{group}", re.compile(pattern)))
    path = os.path.join(tempfile.mkdtemp(prefix="flashtile_probe_"), "constant_kernels.py")
    with open(path, "w") as f:
        f.write("\n\n".join(code))
    spec = importlib.util.spec_from_file_location("constant_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["constant_kernels"] = module
    spec.loader.exec_module(module)
    return module


def _front_door_launch(kernel, cfg, sparse_block, grid_of, order_of, args, meta):
    """attention_launch._launch without plans or recipes (a variant kernel has other parameter kinds)."""
    bm, bn = cfg.block_m, cfg.block_n
    kernel[grid_of(bm, bn)](*args, order_of(bm, bn), BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages, **meta)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=["bwd", "fwd"])
    args = ap.parse_args()
    names = [k for part in args.kernels for k in KERNELS[part]]
    variants = _build_variants(names)
    shipped = {k: getattr(launch, k) for k in names}
    launch._launch = _front_door_launch
    # "shipped" means the run-time lengths: the launcher's own constant lengths (from a signature's
    # second call, tuning.dkdv_constant_lengths) would otherwise turn on during do_bench
    launch.CONSTANT_LENGTHS_FROM_CALL = 10**9

    def use(group):
        for k in names:
            setattr(launch, k, shipped[k] if group is None else getattr(variants, f"{k}__{group}"))

    D, H = 128, 16
    scale = 1 / math.sqrt(D)
    for part in args.kernels:
        for label, B, S, right in SHAPES:
            q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            use(None)
            out, lse = launch.attention_forward(q, k, v, scale, None, right)
            if part == "fwd":
                call = lambda: launch.attention_forward(q, k, v, scale, None, right)
            else:
                call = lambda: launch.attention_backward(do, q, k, v, out, lse, scale, None, right)
            results, times = {}, {}
            for group in (None, *GROUPS) * 2:  # two interleaved rounds
                use(group)
                results[group] = call()
                times.setdefault(group, []).append(triton.testing.do_bench(call, warmup=25, rep=100) * 1e3)
            base = min(times[None])
            cells = ", ".join(f"{g} {min(times[g]):.0f} ({min(times[g]) / base:.3f}"
                              f"{'' if all(torch.equal(a, b) for a, b in zip(results[None], results[g])) else ', DIFFERS'})"
                              for g in GROUPS)
            print(f"{part} {label}: shipped {base:.0f} us; {cells}", flush=True)
    use(None)


if __name__ == "__main__":
    main()
