"""Sweep tile configs of the attention kernels on masked variants (used to fill tuning.py).

python scripts/tune_variants.py [--window 1024] [--seqlen 16384] [--sparse] [--bwd] [--no-window]
Prints the median TFLOP/s (visible work only, as the variants suite counts it) of each forward and
backward config on a sliding window (causal (W, 0) and two-sided (W, W)) and, with --sparse, on a
random 25%-dense 128x128 block mask.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton

from flashtile.attention_launch import attention_backward, attention_forward
from flashtile.masks import BlockMask, visibility_mask
from flashtile.tuning import BackwardConfig, KernelConfig, backward_config, forward_config


def _time(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sweep(name, q, k, v, kw, pairs, bwd) -> None:
    B, S, H, D = q.shape
    scale = 1 / math.sqrt(D)
    flops = 4 * B * H * D * pairs
    out, lse = attention_forward(q, k, v, scale, **kw)
    default = forward_config(q.device, D, D, q.dtype, False)
    print(f"{name}: visible {pairs / S / S:.3f}, default fwd {default}", flush=True)
    for (bm, bn), w, st in itertools.product([(128, 64), (128, 128), (64, 64), (64, 128)], [4, 8], [2, 3]):
        cfg = KernelConfig(bm, bn, w, st)
        try:
            o, _ = attention_forward(q, k, v, scale, config=cfg, **kw)
            err = (o.float() - out.float()).abs().max().item()
            ms = _time(lambda: attention_forward(q, k, v, scale, config=cfg, **kw))
            print(f"  fwd {bm:3d} {bn:3d} w{w} s{st}: {flops / ms * 1e-9:6.1f} TFLOP/s err {err:.1e}", flush=True)
        except Exception as e:  # out of shared memory etc.
            print(f"  fwd {bm:3d} {bn:3d} w{w} s{st}: failed {type(e).__name__}", flush=True)
    if not bwd:
        return
    do = torch.randn_like(out)
    base = backward_config(q.device, D, D, q.dtype, "right" in kw and kw["right"] is not None,
                           block_sparse="block_mask" in kw)
    ref = attention_backward(do, q, k, v, out, lse, scale, config=base, **kw)
    ms = _time(lambda: attention_backward(do, q, k, v, out, lse, scale, config=base, **kw))
    print(f"  bwd default {base}: {2.5 * flops / ms * 1e-9:6.1f} TFLOP/s", flush=True)
    for part in ("dkdv", "dq"):
        tiles = [(64, 64), (64, 128), (32, 128), (128, 64)] if part == "dkdv" else [(128, 64), (64, 64), (128, 128)]
        for (bm, bn), w, st in itertools.product(tiles, [4, 8], [2, 3]):
            c = KernelConfig(bm, bn, w, st)
            cfg = BackwardConfig(c, base.dq) if part == "dkdv" else BackwardConfig(base.dkdv, c)
            try:
                g = attention_backward(do, q, k, v, out, lse, scale, config=cfg, **kw)
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(g, ref))
                ms = _time(lambda: attention_backward(do, q, k, v, out, lse, scale, config=cfg, **kw))
                print(f"  {part} {bm:3d} {bn:3d} w{w} s{st}: bwd {2.5 * flops / ms * 1e-9:6.1f} TFLOP/s err {err:.1e}",
                      flush=True)
            except Exception as e:
                print(f"  {part} {bm:3d} {bn:3d} w{w} s{st}: failed {type(e).__name__}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--sparse", action="store_true")
    ap.add_argument("--no-window", action="store_true", help="skip the sliding-window cases")
    args = ap.parse_args()
    S, H, D, W = args.seqlen, args.heads, 128, args.window
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for left, right in (() if args.no_window else ((W, 0), (W, W))):
        pairs = int(visibility_mask(S, S, False, (left, right)).sum())
        _sweep(f"window ({left}, {right}) S={S}", q, k, v, dict(left=left, right=right), pairs, args.bwd)
    if args.sparse:
        n = S // 128
        g = torch.Generator().manual_seed(0)
        table = torch.rand(n, n, generator=g) < 0.25
        table |= torch.eye(n, dtype=torch.bool)
        bm = BlockMask.from_blocks(table.cuda(), block_size=128, seqlen_q=S, seqlen_k=S)
        pairs = int(table.sum()) * 128 * 128
        _sweep(f"block-sparse {pairs / S / S:.2f} S={S}", q, k, v, dict(block_mask=bm), pairs, args.bwd)


if __name__ == "__main__":
    main()
