"""A/B of source trees on attention steps: per case, the forward+backward step and each kernel's time.

    git archive HEAD src | tar -x -C /tmp/base      # the tree to compare against
    for round in 1 2; do for tree in /tmp/base/src src; do
        PYTHONPATH=$tree python scripts/ab_trees.py $tree dense8k,causal8k,doc
    done; done

(needs a CUDA GPU). One process per tree, so each imports its own flashtile; alternating the trees
over rounds spreads the machine's drift over both. Per case it prints the step time (do_bench median
of torch.autograd.grad over flash_attn_func, after warm-up, so a repeated signature has reached its
launch recipe and constant-length dK/dV compile) and the GPU time per step of each attention kernel
(torch.profiler, 10 steps). The A/B runs of docs/perf_notes.md, session 27, are these cases.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import flashtile as ft
from flashtile.bench import variants
from flashtile.bench.suites import variants_suite

DEVICE = torch.device("cuda")


def dense(B: int, H: int, S: int, D: int, hkv: int = 0, **kw) -> Callable:
    """A case of random bf16 q, k, v [B, S, H|hkv, D] and flash_attn_func keywords."""
    def make():
        torch.manual_seed(0)
        q = torch.randn(B, S, H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, S, hkv or H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        opts = dict(kw)
        if opts.get("alibi_slopes") == "suite":  # the variants suite's slopes
            opts["alibi_slopes"] = variants.alibi_slopes(H, DEVICE)
        return q, k, v, opts
    return make


def block_mask_case(mask: str) -> Callable:
    """The variants suite's forward+backward block-mask case: "document", or a density ("0.25")."""
    def make():
        for c in variants_suite():
            s = c.shape
            if c.mode == "fwd_bwd" and variants.variant_of(s) == "block_sparse" \
                    and (s.get("mask") == mask or str(s.get("density")) == mask):
                torch.manual_seed(0)
                q, k, v = (torch.randn(s["B"], s["Sq"], s["H"], s["D"], device=DEVICE, dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                return q, k, v, variants.flashtile_kwargs(s, DEVICE)
        raise SystemExit(f"no block-mask case {mask!r}")
    return make


CASES: Dict[str, Callable] = {
    "dense8k": dense(2, 16, 8192, 128),
    "dense2k": dense(8, 16, 2048, 128),
    "d64": dense(2, 32, 8192, 64),
    "causal2k": dense(8, 16, 2048, 128, causal=True),
    "causal8k": dense(2, 16, 8192, 128, causal=True),
    "causal16k": dense(1, 16, 16384, 128, causal=True),
    "gqa_causal": dense(1, 32, 8192, 128, hkv=8, causal=True),
    "softcap_causal": dense(2, 16, 8192, 128, causal=True, softcap=30.0),
    "alibi": dense(2, 16, 8192, 128, alibi_slopes="suite"),
    "alibi_causal": dense(2, 16, 8192, 128, causal=True, alibi_slopes="suite"),
    "win_c": dense(1, 16, 16384, 128, causal=True, window_size=(1024, 0)),
    "win": dense(1, 16, 16384, 128, window_size=(1024, 1024)),
    "drop": dense(2, 16, 8192, 128, dropout_p=0.1),
    "drop_c": dense(2, 16, 8192, 128, causal=True, dropout_p=0.1),
    "drop2k": dense(8, 16, 2048, 128, dropout_p=0.1),
    "drop_d64": dense(2, 32, 8192, 64, dropout_p=0.1),
    "doc": block_mask_case("document"),
    "r25": block_mask_case("0.25"),
    "r50": block_mask_case("0.5"),
    "r10": block_mask_case("0.1"),
}


def run_case(name: str, label: str) -> None:
    """Print one case's step time and per-kernel GPU times."""
    q, k, v, kw = CASES[name]()
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=DEVICE, dtype=torch.bfloat16)

    def step():
        return torch.autograd.grad(ft.flash_attn_func(q, k, v, **kw), (q, k, v), dout)

    for _ in range(4):  # compiles, recipes, the constant-length dK/dV compile
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    kernels = {e.key[:22]: e.device_time_total / 10 for e in prof.key_averages() if "attention" in e.key}
    us = triton.testing.do_bench(step, warmup=25, rep=150, return_mode="median") * 1e3
    print(f"{name:15s} {label} step {us:8.1f}  " + "  ".join(f"{k_} {t:7.1f}" for k_, t in sorted(kernels.items())),
          flush=True)


def main() -> None:
    label = sys.argv[1]
    for name in sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES):
        run_case(name, label)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
