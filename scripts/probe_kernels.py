"""Per-kernel GPU time of one forward + backward step for several attention variants (diagnosis).

python scripts/probe_kernels.py [--only NAME ...] [--flex] [--natural-order]
Prints, per variant, the mean time per step of each kernel (torch.profiler) and the total. The
block-sparse cases are the variants suite's (random 25% and the document mask); --flex also profiles
torch.compile(flex_attention) with the same mask for each of them.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import flashtile as ft
from flashtile.bench import suites, variants


def _dense(B, S, H, D=128, Hkv=None, **kw):
    dev = torch.device("cuda")
    q = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, S, Hkv or H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    return lambda: ft.flash_attn_func(q, k, v, **kw)


def _varlen():
    dev = torch.device("cuda")
    case = [c for c in suites.variants_suite() if c.shape.get("variant") == "varlen"][0]
    cu, longest = variants.varlen_offsets(case.shape, dev)
    total, H = int(case.shape["Sq"]), int(case.shape["H"])
    q, k, v = (torch.randn(total, H, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return lambda: ft.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)


def _suite_case(mask: str):
    """The suite's block-sparse case: "document", or "random:<density>" (e.g. "random:0.25")."""
    kind, _, density = mask.partition(":")
    return [c for c in suites.variants_suite()
            if c.shape.get("variant") == "block_sparse" and c.shape.get("mask") == kind
            and (kind != "random" or float(c.shape.get("density")) == float(density))][0]


def _block_sparse(mask: str):
    dev = torch.device("cuda")
    s = _suite_case(mask).shape
    kw = variants.flashtile_kwargs(s, dev)
    return _dense(int(s["B"]), int(s["Sq"]), int(s["H"]), **kw)


def _flex(mask: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = torch.device("cuda")
    s = _suite_case(mask).shape
    B, S, H = int(s["B"]), int(s["Sq"]), int(s["H"])
    _, mask_mod = variants.mods(s, dev)
    bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=S, KV_LEN=S, device=dev,
                           BLOCK_SIZE=variants.flex_block_size(s))
    q, k, v = (torch.randn(B, H, S, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=bm)


def _all_full(S: int):
    from flashtile.masks import BlockMask

    n = S // 128
    return BlockMask.from_blocks(torch.ones(n, n, dtype=torch.bool, device="cuda"), block_size=128)


SPARSE_MASKS = {"sparse10": "random:0.1", "sparse25": "random:0.25", "document": "document"}

VARIANTS = {
    "dense": lambda: _dense(2, 8192, 16),
    "dense_b1": lambda: _dense(1, 8192, 16),  # the block-sparse cases' shape
    "dense_causal": lambda: _dense(2, 8192, 16, causal=True),
    "dropout": lambda: _dense(2, 8192, 16, dropout_p=0.1),
    "dropout_causal": lambda: _dense(2, 8192, 16, dropout_p=0.1, causal=True),
    "window": lambda: _dense(1, 16384, 16, causal=True, window_size=(1024, 0)),
    "gqa_causal": lambda: _dense(1, 8192, 32, Hkv=8, causal=True),
    "softcap": lambda: _dense(2, 8192, 16, softcap=30.0),
    "varlen": _varlen,
    "sparse10": lambda: _block_sparse(SPARSE_MASKS["sparse10"]),
    "sparse25": lambda: _block_sparse(SPARSE_MASKS["sparse25"]),
    "document": lambda: _block_sparse(SPARSE_MASKS["document"]),
    # every block full: the block-list walk's own cost against dense_b1 (same shape, no mask)
    "sparse100": lambda: _dense(1, 8192, 16, block_mask=_all_full(8192)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--flex", action="store_true", help="also profile FlexAttention on the block-sparse cases")
    ap.add_argument("--natural-order", action="store_true",
                    help="block-sparse programs in id order instead of heaviest first (BlockMask.program_order)")
    a = ap.parse_args()
    if a.natural_order:
        from flashtile.masks import BlockMask

        def natural(self, by, batch, heads, heads_per_program, tile, num_tiles):
            n = batch * (heads // heads_per_program) * num_tiles
            return torch.arange(n, dtype=torch.int32, device=self.kind.device)

        BlockMask.program_order = natural
    runs = []
    for name, make in VARIANTS.items():
        if a.only and name not in a.only:
            continue
        runs.append((name, make))
        if a.flex and name in SPARSE_MASKS:
            runs.append((f"{name} (flex)", lambda m=SPARSE_MASKS[name]: _flex(m)))
    for name, make in runs:
        fn = make()
        out = fn()
        grad = torch.randn_like(out)
        for _ in range(3):
            fn().backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                fn().backward(grad)
            torch.cuda.synchronize()
        times = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name[:40]] += e.device_time / a.steps
        total = sum(times.values())
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1]) if v > 5)
        print(f"{name}: total {total:.0f} us: {parts}", flush=True)


if __name__ == "__main__":
    main()
