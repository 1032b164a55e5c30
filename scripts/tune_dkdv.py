"""Time the dK/dV kernel's tile configs on the dense and variant backward passes (fills tuning.py).

python scripts/tune_dkdv.py [--dq] [--seq S] [--configs M,N,W,S ...] [case ...]
  (cases: dense causal dropout dropout_causal softcap softcap_causal window sparse10 sparse25 document sparse100
  alibi alibi_causal gqa_causal attn_mask; --dq varies the dQ
  kernel's config with the default dK/dV one instead)
The dK/dV program keeps K, V and two fp32 accumulators in registers, so its best tile depends on
which features add live values (dropout's counters, softcap's tanh): ptxas -v on the sm_90 build
shows spills of 0.5-2.5 KB per thread for some configs. Prints ms of the whole backward per config.
"""

from __future__ import annotations

import math
import sys

import torch
import triton

from flashtile.attention_launch import attention_backward, attention_forward
from flashtile.tuning import BackwardConfig, KernelConfig, backward_config

CONFIGS = [(64, 64, 4, 2), (32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2),
           (16, 64, 4, 2), (64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 16, 3), (32, 64, 8, 2)]
DQ_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3),
              (64, 128, 8, 3), (128, 64, 16, 3)]


def _suite_mask(kind: str, dev: torch.device, density: float = 0.25):
    from flashtile.bench import suites, variants

    case = [c for c in suites.variants_suite() if c.shape.get("variant") == "block_sparse"
            and c.shape.get("mask") == kind and float(c.shape.get("density", density)) == density][0]
    return variants.flashtile_kwargs(case.shape, dev)["block_mask"]


def _slopes(H: int, dev: torch.device) -> torch.Tensor:
    from flashtile.bench import variants

    return variants.alibi_slopes(H, dev)


def _all_full_mask(S: int, dev: torch.device):
    from flashtile.masks import BlockMask

    return BlockMask.from_blocks(torch.ones(S // 128, S // 128, dtype=torch.bool, device=dev), block_size=128)


def main() -> None:
    dev = torch.device("cuda")
    args = sys.argv[1:]
    S = 8192
    if "--seq" in args:  # another length, at 16k tokens (B = 16384 // S) like the standard suite
        i = args.index("--seq")
        S = int(args[i + 1])
        args = args[:i] + args[i + 2:]
    B, H, D = max(1, 16384 // S), 16, 128
    q, k_all, v_all, do = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    scale = 1 / math.sqrt(D)
    cases = {
        "dense": dict(),
        "causal": dict(right=0),
        "dropout": dict(dropout_p=0.1, dropout_seed=(1, 2)),
        "dropout_causal": dict(right=0, dropout_p=0.1, dropout_seed=(1, 2)),
        "softcap": dict(softcap=30.0),
        "softcap_causal": dict(right=0, softcap=30.0),
        "window": dict(left=1024, right=0),
        # the variants suite's block masks (S=8192): random 10% / 25% of 128x128 blocks, 8 causal documents
        "sparse10": dict(block_mask=_suite_mask("random", dev, 0.1)),
        "sparse25": dict(block_mask=_suite_mask("random", dev)),
        "document": dict(right=0, block_mask=_suite_mask("document", dev)),
        "sparse100": dict(block_mask=_all_full_mask(S, dev)),  # the block-list walk against "dense"
        "alibi": dict(alibi_slopes=_slopes(H, dev)),
        "alibi_causal": dict(right=0, alibi_slopes=_slopes(H, dev)),
        "gqa_causal": dict(right=0, kv_heads=H // 4),  # the variants suite's GQA: 4 query heads per kv head
        # SDPA's bool attn_mask, one [S, S] mask per batch broadcast over heads (70% of keys kept)
        "attn_mask": dict(attn_mask=torch.rand(B, 1, S, S, device=dev) > 0.3),
    }
    vary_dq = "--dq" in args
    configs = DQ_CONFIGS if vary_dq else CONFIGS
    if "--configs" in args:
        i = args.index("--configs")
        picked = []
        for a in args[i + 1:]:
            if a.startswith("--") or "," not in a:
                break
            picked.append(tuple(int(x) for x in a.split(",")))
        configs = picked
        args = args[:i] + args[i + 1 + len(picked):]
    only = {a for a in args if not a.startswith("--")}
    for name, kw in cases.items():
        if only and name not in only:
            continue
        kw = dict(kw)
        kv = kw.pop("kv_heads", H)
        k, v = k_all[:, :, :kv], v_all[:, :, :kv]
        out, lse = attention_forward(q, k, v, scale, **kw)
        bm = kw.get("block_mask")
        base = backward_config(dev, D, D, q.dtype, "right" in kw, block_sparse=bm is not None,
                               softcap="softcap" in kw, partial_blocks=bm is not None and bm.element_mask is not None)
        line = []
        for c in configs:
            cfg = BackwardConfig(base.dkdv, KernelConfig(*c)) if vary_dq else BackwardConfig(KernelConfig(*c), base.dq)
            try:
                ms = triton.testing.do_bench(lambda: attention_backward(do, q, k, v, out, lse, scale, config=cfg, **kw),
                                             warmup=25, rep=100, return_mode="median")
                line.append(f"{c}: {ms:.2f}")
            except Exception as e:  # out of resources
                line.append(f"{c}: {type(e).__name__}")
        which = f"dq, dkdv fixed at {base.dkdv}" if vary_dq else f"dkdv, dq fixed at {base.dq}"
        print(f"{name} ({which}; default {base.dq if vary_dq else base.dkdv}): " + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()
