"""A first flashtile call on whatever device is present (GPU through Triton, else the CPU path)."""

import torch

import flashtile as ft
from flashtile.reference import attention_ref

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
batch, seqlen, heads_q, heads_kv, head_dim = 2, 1000, 8, 2, 72  # GQA 4:1, a head dim that is no power of two

q = torch.randn(batch, seqlen, heads_q, head_dim, device=device, dtype=dtype, requires_grad=True)
k = torch.randn(batch, seqlen, heads_kv, head_dim, device=device, dtype=dtype, requires_grad=True)
v = torch.randn(batch, seqlen, heads_kv, head_dim, device=device, dtype=dtype, requires_grad=True)

out, lse, _ = ft.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
out.sum().backward()

ref, _ = attention_ref(q.detach(), k.detach(), v.detach(), causal=True)
err = (out.detach().to(ref.dtype) - ref).abs().max().item()
print(f"device={device} dtype={dtype}: out {tuple(out.shape)}, lse {tuple(lse.shape)}, "
      f"max |out - float64 oracle| = {err:.2e}, dq finite: {bool(torch.isfinite(q.grad).all())}")

# torch's layout and semantics ([B, H, S, D], top-left causal), as a drop-in for F.scaled_dot_product_attention
o2 = ft.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     is_causal=True, enable_gqa=True)
print("scaled_dot_product_attention:", tuple(o2.shape))
