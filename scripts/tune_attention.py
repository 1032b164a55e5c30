"""Sweep tile configs of the attention kernels on the current GPU (used to fill tuning.py).

python scripts/tune_attention.py --headdims 64,128,256 --seqlen 4096 [--bwd]
Prints, per (D, causal), the median TFLOP/s of each config next to SDPA FLASH and cuDNN.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton

from flashtile.attention_launch import attention_backward, attention_forward
from flashtile.tuning import BackwardConfig, KernelConfig, backward_config, forward_config


def _time(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sdpa(q, k, v, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(be):
        return _time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", default="64,128,256")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--step", action="store_true", help="with --bwd: time a full fwd+bwd step with the best pair vs the default and SDPA FLASH")
    args = ap.parse_args()
    S = args.seqlen
    for D in [int(x) for x in args.headdims.split(",")]:
        for causal in [bool(int(c)) for c in args.causal.split(",")]:
            B, H = 16384 // S, 2048 // D
            q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            scale = 1 / math.sqrt(D)
            flops = 4 * B * H * S * S * D / (2 if causal else 1)
            right = 0 if causal else None
            ref_out, ref_lse = attention_forward(q, k, v, scale, None, right)
            if not args.bwd:
                fa = flops / _sdpa(q, k, v, causal, "flash") * 1e-9
                cu = flops / _sdpa(q, k, v, causal, "cudnn") * 1e-9
                default = forward_config(q.device, D, D, q.dtype, causal)
                print(f"D={D} causal={causal} S={S}: sdpa_flash {fa:.0f} cudnn {cu:.0f} default {default}")
                for bm, bn, w, st in itertools.product([64, 128] if D > 128 else [128], [32, 64, 128] if D > 64 else [64, 128], [4, 8], [2, 3, 4]):
                    cfg = KernelConfig(bm, bn, w, st)
                    try:
                        out, _ = attention_forward(q, k, v, scale, None, right, config=cfg)
                        err = (out.float() - ref_out.float()).abs().max().item()
                        ms = _time(lambda: attention_forward(q, k, v, scale, None, right, config=cfg))
                        print(f"  fwd {bm:3d} {bn:3d} w{w} s{st}: {flops / ms * 1e-9:6.1f} TFLOP/s err {err:.1e}")
                    except Exception as e:  # out of shared memory etc.
                        print(f"  fwd {bm:3d} {bn:3d} w{w} s{st}: failed {type(e).__name__}")
            else:
                do = torch.randn_like(ref_out)
                bflops = 2.5 * flops
                default = backward_config(q.device, D, D, q.dtype, causal)
                d0 = attention_backward(do, q, k, v, ref_out, ref_lse, scale, None, right, config=default)
                print(f"D={D} causal={causal} S={S}: default {default}")
                results = {"dkdv": [], "dq": []}
                for part in ("dkdv", "dq"):
                    tiles = [(32, 128), (64, 128), (32, 64), (64, 64), (16, 64)] if part == "dkdv" else \
                        [(128, 64), (64, 64), (128, 32), (64, 32)]
                    for (bm, bn), w, st in itertools.product(tiles, [4, 8], [2, 3]):
                        c = KernelConfig(bm, bn, w, st)
                        cfg = BackwardConfig(c, default.dq) if part == "dkdv" else BackwardConfig(default.dkdv, c)
                        try:
                            g = attention_backward(do, q, k, v, ref_out, ref_lse, scale, None, right, config=cfg)
                            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(g, d0))
                            ms = _time(lambda: attention_backward(do, q, k, v, ref_out, ref_lse, scale, None, right, config=cfg))
                            print(f"  {part} {bm:3d} {bn:3d} w{w} s{st}: bwd total {bflops / ms * 1e-9:6.1f} TFLOP/s err {err:.1e}")
                            results[part].append((ms, c))
                        except Exception as e:
                            print(f"  {part} {bm:3d} {bn:3d} w{w} s{st}: failed {type(e).__name__}")
                if args.step:
                    _best_step(q, k, v, causal, D, S, flops, results)
            del q, k, v
            torch.cuda.empty_cache()


def _best_step(q, k, v, causal, D, S, flops, results) -> None:
    """fwd+bwd through flash_attn_func (as the benchmark times it) with the default and the best pair."""
    import flashtile as ft
    from flashtile import attention_launch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = BackwardConfig(min(results["dkdv"], key=lambda r: r[0])[1], min(results["dq"], key=lambda r: r[0])[1])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)

    def step():
        ft.flash_attn_func(*leaves, causal=causal).backward(do)

    real = attention_launch.backward_config
    for name, cfg in (("default", None), ("best", best)):
        attention_launch.backward_config = (lambda *a, **kw: cfg) if cfg else real
        ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median", grad_to_none=leaves)
        print(f"  step {name} {cfg}: fwd+bwd {3.5 * flops / ms * 1e-9:6.1f} TFLOP/s")
    attention_launch.backward_config = real
    st = [t.transpose(1, 2).clone().requires_grad_() for t in (q, k, v)]
    dot = do.transpose(1, 2)

    def sdpa_step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(*st, is_causal=causal).backward(dot)

    ms = triton.testing.do_bench(sdpa_step, warmup=25, rep=100, return_mode="median", grad_to_none=st)
    print(f"  step sdpa_flash: fwd+bwd {3.5 * flops / ms * 1e-9:6.1f} TFLOP/s")


if __name__ == "__main__":
    main()
