"""Time attention_fwd_kernel configs on the variants, through the public API (fills tuning.forward_config).

python scripts/tune_forward.py [--cases dense alibi attn_mask ...] [--configs 128x64w8s3 128x128w8s3 ...]
Each case is timed with every config in interleaved rounds (median of 3 rounds, do_bench medians inside),
forward only, bf16, D=128; printed as speedups over the first config. A config too big for shared
memory is shrunk by attention_launch._launch (fewer stages first), as a user's call would be.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch
import triton

import flashtile as ft
from flashtile import attention_launch
from flashtile.tuning import KernelConfig


def _qkv(B, S, H, Hkv=None, layout="bshd", D=128):
    shape_q, shape_kv = ((B, S, H, D), (B, S, Hkv or H, D)) if layout == "bshd" else \
        ((B, H, S, D), (B, Hkv or H, S, D))
    dev = torch.device("cuda")
    return (torch.randn(shape_q, device=dev, dtype=torch.bfloat16),
            *(torch.randn(shape_kv, device=dev, dtype=torch.bfloat16) for _ in range(2)))


def _flash(B, S, H, Hkv=None, D=128, **kw):
    q, k, v = _qkv(B, S, H, Hkv, D=D)
    return lambda: ft.flash_attn_func(q, k, v, **kw)


def _sdpa_mask(kind: str):
    q, k, v = _qkv(4, 4096, 16, layout="bhsd")
    dev = q.device
    mask = (torch.rand(4, 1, 4096, 4096, device=dev) > 0.3 if kind == "bool"
            else torch.randn(4, 1, 4096, 4096, device=dev, dtype=torch.bfloat16))
    return lambda: ft.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _suite_case(variant: str, mask=None, density=None):
    """The variants suite's forward case of this variant (bf16, D=128): varlen or a block mask."""
    from flashtile.bench import variants
    from flashtile.bench.suites import variants_suite
    for c in variants_suite():
        s = c.shape
        if c.mode == "fwd" and variants.variant_of(s) == variant and (mask is None or s.get("mask") == mask) \
                and (density is None or s.get("density") == density):
            dev = torch.device("cuda")
            q, k, v = (torch.randn(s["B"], s["Sq"], s["H"], s["D"], device=dev, dtype=torch.bfloat16)
                       for _ in range(3))
            if variant == "varlen":
                cu, longest = variants.varlen_offsets(s, dev)
                return lambda: ft.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, longest, longest,
                                                         causal=variants._causal(s))
            kw = variants.flashtile_kwargs(s, dev)
            return lambda: ft.flash_attn_func(q, k, v, **kw)
    raise SystemExit(f"no {variant} case in the variants suite")


CASES = {
    "varlen": lambda: _suite_case("varlen"),
    "document": lambda: _suite_case("block_sparse", "document"),
    **{f"random{int(100 * d)}": (lambda d=d: _suite_case("block_sparse", density=d)) for d in (0.5, 0.25, 0.1)},
    "dense": lambda: _flash(2, 8192, 16),
    "causal": lambda: _flash(2, 8192, 16, causal=True),
    # the standard suite's short shapes (16k tokens, hidden 2048)
    **{f"{'causal' if c else 'dense'}{'' if d == 128 else f'_d{d}'}_s{s}":
       (lambda s=s, c=c, d=d: _flash(16384 // s, s, 2048 // d, D=d, causal=c))
       for s in (512, 1024, 2048, 4096, 8192) for c in (False, True) for d in (64, 96, 128)},
    "alibi_s1024": lambda: _flash(16, 1024, 16, alibi_slopes=torch.rand(16, device="cuda") * 0.1),
    "alibi_causal_s1024": lambda: _flash(16, 1024, 16, causal=True, alibi_slopes=torch.rand(16, device="cuda") * 0.1),
    "gqa_causal_s1024": lambda: _flash(16, 1024, 32, Hkv=8, causal=True),
    "alibi": lambda: _flash(2, 8192, 16, alibi_slopes=torch.rand(16, device="cuda") * 0.1),
    "gqa_causal": lambda: _flash(1, 8192, 32, Hkv=8, causal=True),
    "window": lambda: _flash(1, 16384, 16, causal=True, window_size=(1024, 0)),
    "softcap": lambda: _flash(2, 8192, 16, softcap=30.0),
    "dropout": lambda: _flash(2, 8192, 16, dropout_p=0.1),
    "dropout_causal": lambda: _flash(2, 8192, 16, causal=True, dropout_p=0.1),
    "window_both": lambda: _flash(1, 16384, 16, window_size=(1024, 1024)),
    "softcap_causal": lambda: _flash(2, 8192, 16, causal=True, softcap=30.0),
    "attn_mask": lambda: _sdpa_mask("bool"),
    "attn_bias": lambda: _sdpa_mask("float"),
}


def _config(text: str) -> KernelConfig:
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not m:
        raise SystemExit(f"config {text!r}: expected BLOCK_MxBLOCK_NwWARPSsSTAGES, e.g. 128x64w8s3")
    return KernelConfig(*(int(g) for g in m.groups()))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--configs", nargs="+", default=["128x64w8s3", "128x128w8s3", "128x64w8s2", "64x64w4s3"])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cfgs = [_config(c) for c in args.configs]
    current = [cfgs[0]]
    attention_launch.forward_config = lambda *a, **k: current[0]  # every launch takes the config under test
    attention_launch._RECIPES.get = lambda key: None  # no replayed launch recipe (it would hold its first config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name in args.cases:
            fn = CASES[name]()
            ref = None
            for cfg in cfgs:  # compile each, and check that each computes the same output
                current[0] = cfg
                out = fn()
                ref = out if ref is None else ref
                if not name.startswith("dropout") and float((out.float() - ref.float()).abs().max()) > 0.05:
                    print(f"{name}: {args.configs[cfgs.index(cfg)]} differs from {args.configs[0]}", file=sys.stderr)
            times = [[] for _ in cfgs]
            for _ in range(args.rounds):
                for i, cfg in enumerate(cfgs):
                    current[0] = cfg
                    times[i].append(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
            ms = [sorted(t)[len(t) // 2] for t in times]
            print(f"{name} ({ms[0]:.3f} ms): " + " ".join(f"{c}:{ms[0] / x:.3f}" for c, x in zip(args.configs, ms)),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
