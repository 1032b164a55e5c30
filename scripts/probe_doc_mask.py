"""Time the forward of the variants suite's document mask with and without its parts (diagnosis)."""
import torch
import triton

import flashtile as ft
from flashtile.bench import suites, variants
from flashtile.masks import BlockMask

dev = torch.device("cuda")
case = [c for c in suites.variants_suite() if c.shape.get("mask") == "document" and c.mode == "fwd"][0]
bm = variants.flashtile_kwargs(case.shape, dev)["block_mask"]
S = case.shape["Sq"]
q, k, v = (torch.randn(1, S, 16, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
coarse = BlockMask.from_blocks(bm.kind != 0, block_size=128, seqlen_q=S, seqlen_k=S)
full_only = BlockMask.from_blocks(bm.kind == 2, block_size=128, seqlen_q=S, seqlen_k=S)
runs = {
    "doc causal=True": lambda: ft.flash_attn_func(q, k, v, causal=True, block_mask=bm),
    "doc causal=False": lambda: ft.flash_attn_func(q, k, v, block_mask=bm),
    "blocks(kind!=0) causal=False": lambda: ft.flash_attn_func(q, k, v, block_mask=coarse),
    "blocks(kind!=0) causal=True": lambda: ft.flash_attn_func(q, k, v, causal=True, block_mask=coarse),
    "blocks(kind==2) causal=False": lambda: ft.flash_attn_func(q, k, v, block_mask=full_only),
    "dense causal": lambda: ft.flash_attn_func(q, k, v, causal=True),
}
print(bm)
for name, fn in runs.items():
    fn()
    print(f"{name}: {triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median'):.3f} ms", flush=True)
