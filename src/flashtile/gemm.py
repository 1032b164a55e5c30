"""``flashtile.gemm``: matrix multiply with a fused epilogue (scale, bias, activation) and autograd.

    out = activation(alpha * (a @ b) + bias)

a [..., M, K], b [..., K, N] (batch dims broadcast as in torch.matmul; any strides, so transposed
views such as ``w.mT`` run without a copy), bias broadcastable to [..., M, N]. fp32 accumulation,
one rounding to ``out_dtype`` at the end. CUDA tensors run the Triton kernel (gemm_launch.py); CPU
tensors run the same math in PyTorch (dispatch.py decides, as for attention).
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from flashtile.dispatch import resolve_backend
from flashtile.errors import UnsupportedError

ACTIVATION_NAMES = (None, "relu", "gelu", "gelu_tanh", "silu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _act(z: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """torch's definition of each activation (the kernel implements the same formulas)."""
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


# ----------------------------------------------------------------------------------------------
# Validation


def broadcast_shape(x: Tuple[int, ...], y: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """torch's broadcasting of two shapes, or None when they do not broadcast (plain Python: a call's
    host time matters for small GEMMs)."""
    n = max(len(x), len(y))
    x, y = (1,) * (n - len(x)) + tuple(x), (1,) * (n - len(y)) + tuple(y)
    out = []
    for p, q in zip(x, y):
        if p != q and p != 1 and q != 1:
            return None
        out.append(q if p == 1 else p)
    return tuple(out)


def _check(a, b, bias, alpha, activation, out_dtype) -> Tuple[Tuple[int, ...], torch.dtype]:
    """Raise a clear error naming the argument; returns (output shape, output dtype)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"gemm: {name}.dtype is {t.dtype}; supported: float16, bfloat16, float32")
        if t.dim() < 2:
            raise UnsupportedError(f"gemm: {name} must have at least 2 dims ([..., M, K] / [..., K, N]), "
                                   f"got shape {tuple(t.shape)}; unsqueeze a vector first")
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: a and b must have the same dtype, got a {a.dtype} and b {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"gemm: a and b must be on the same device, got {a.device} and {b.device}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"gemm: a [..., M, K] and b [..., K, N] disagree on K: a.shape {tuple(a.shape)} "
                         f"has K={a.shape[-1]}, b.shape {tuple(b.shape)} has K={b.shape[-2]}")
    batch = broadcast_shape(a.shape[:-2], b.shape[:-2])
    if batch is None:
        raise ValueError(f"gemm: batch dims of a {tuple(a.shape[:-2])} and b {tuple(b.shape[:-2])} do not "
                         "broadcast (torch.matmul's rule)")
    out_shape = (*batch, a.shape[-2], b.shape[-1])
    if out_dtype is None:
        out_dtype = a.dtype
    elif out_dtype not in DTYPES:
        raise TypeError(f"gemm: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"gemm: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in (a.dtype, out_dtype, torch.float32):
            raise TypeError(f"gemm: bias.dtype {bias.dtype} must be the inputs' dtype ({a.dtype}), out_dtype "
                            "or float32")
        if bias.device != a.device:
            raise ValueError(f"gemm: bias is on {bias.device}, a and b on {a.device}")
        if broadcast_shape(bias.shape, out_shape) != out_shape:
            raise ValueError(f"gemm: bias shape {tuple(bias.shape)} does not broadcast to the output shape "
                             f"{tuple(out_shape)} (typical: [N], [M, 1], [M, N])")
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"gemm: unknown activation {activation!r}; expected one of "
                         f"{', '.join(repr(x) for x in ACTIVATION_NAMES)}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"gemm: alpha must be a real number, got {type(alpha).__name__}")
    return out_shape, out_dtype


# ----------------------------------------------------------------------------------------------
# Implementations


def gemm_torch(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], alpha: float,
               activation: Optional[str], out_dtype: torch.dtype) -> torch.Tensor:
    """The PyTorch path (CPU tensors, backends 'cpu' / 'reference'): the kernel's math, differentiable.

    Half inputs are upcast so that, like the kernel, the result is rounded once (fp32 accumulation).
    """
    compute = torch.float32 if a.dtype != torch.float32 else a.dtype
    z = torch.matmul(a.to(compute), b.to(compute))
    if alpha != 1:
        z = z * alpha
    if bias is not None:
        z = z + bias.to(compute)
    return _act(z, activation).to(out_dtype)


def _reduce_to(grad: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Sum a gradient over the batch dims its input was broadcast along."""
    if grad.shape != shape:
        grad = grad.float().sum_to_size(shape)
    return grad.to(dtype)


class _GemmFunction(torch.autograd.Function):
    """The Triton forward; backward = two GEMMs (themselves ft.gemm) and a bias reduction."""

    @staticmethod
    def forward(ctx, a, b, bias, alpha, activation, out_dtype):
        from flashtile.gemm_launch import gemm_forward

        needs_grad = any(ctx.needs_input_grad[:3])
        # gelu / silu derivatives need the pre-activation; relu's follows from out itself
        store_pre = needs_grad and activation not in (None, "relu")
        out, pre = gemm_forward(a, b, bias, alpha, activation, out_dtype, store_pre=store_pre)
        ctx.alpha, ctx.activation = alpha, activation
        if needs_grad:
            ctx.save_for_backward(a, b, bias, pre if store_pre else out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b, bias, saved = ctx.saved_tensors
        alpha, activation = ctx.alpha, ctx.activation
        grad_z = _pre_activation_grad(grad_out, saved, activation)
        ga = gb = gbias = None
        if ctx.needs_input_grad[0]:
            ga = _grad_a(grad_z.to(a.dtype), a, b, alpha)
        if ctx.needs_input_grad[1]:
            gb = _grad_b(grad_z.to(b.dtype), a, b, alpha)
        if bias is not None and ctx.needs_input_grad[2]:
            gbias = _reduce_to(grad_z, bias.shape, bias.dtype)
        return ga, gb, gbias, None, None, None


def _pre_activation_grad(grad_out: torch.Tensor, saved: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """d loss / d z (fp32) where out = act(z); ``saved`` is out for relu, z for the others."""
    g = grad_out.float()
    if activation is None:
        return g
    if activation == "relu":
        return g * (saved > 0)
    with torch.enable_grad():  # torch's own derivative of its own definition
        z = saved.detach().float().requires_grad_(True)
        (gz,) = torch.autograd.grad(_act(z, activation), z, g)
    return gz


def _grad_a(grad_z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * grad_z @ b^T, summed over the batch dims a was broadcast along."""
    if a.dim() == 2 and b.dim() > 2:
        # a shared by every batch: one GEMM over K' = batch * N (sum over the batch inside the dot)
        n, k = b.shape[-1], b.shape[-2]
        g = grad_z.movedim(-2, 0).reshape(a.shape[0], -1)
        bt = b.expand(*grad_z.shape[:-2], k, n).mT.reshape(-1, k)
        return gemm(g, bt, alpha=alpha, out_dtype=a.dtype)
    shape = grad_z.shape[:-2]
    full = gemm(grad_z, b.mT, alpha=alpha, out_dtype=torch.float32 if a.shape[:-2] != shape else a.dtype)
    return _reduce_to(full, a.shape, a.dtype)


def _grad_b(grad_z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * a^T @ grad_z, summed over the batch dims b was broadcast along."""
    if b.dim() == 2 and a.dim() > 2:
        # b shared (nn.Linear's weight): one GEMM over K' = batch * M
        k, n = a.shape[-1], grad_z.shape[-1]
        af = a.expand(*grad_z.shape[:-2], a.shape[-2], k).reshape(-1, k)
        return gemm(af.mT, grad_z.reshape(-1, n), alpha=alpha, out_dtype=b.dtype)
    shape = grad_z.shape[:-2]
    full = gemm(a.mT, grad_z, alpha=alpha, out_dtype=torch.float32 if b.shape[:-2] != shape else b.dtype)
    return _reduce_to(full, b.shape, b.dtype)


# ----------------------------------------------------------------------------------------------
# Public


@functools.lru_cache(maxsize=None)
def _launch_module():
    """gemm_launch, imported on first use (it imports Triton; the CPU path does not need it)."""
    import flashtile.gemm_launch

    return flashtile.gemm_launch


def gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, *, alpha: float = 1.0,
         activation: Optional[str] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``activation(alpha * (a @ b) + bias)`` in one kernel.

    Args:
        a: [..., M, K], float16 / bfloat16 / float32, any strides.
        b: [..., K, N], a's dtype and device; batch dims broadcast against a's (torch.matmul's rule).
        bias: optional, broadcastable to the output [..., M, N] (typically [N], also [M, 1], [M, N]);
            a's dtype, out_dtype or float32.
        alpha: scale of the product (applied before the bias).
        activation: None, "relu", "gelu" (erf), "gelu_tanh" or "silu" (torch's definitions).
        out_dtype: dtype of the result; default a's dtype.

    Returns:
        [*broadcast(a.shape[:-2], b.shape[:-2]), M, N] of ``out_dtype``, contiguous. Accumulates in
        fp32; fp32 inputs use tf32 only where torch.backends.cuda.matmul.allow_tf32 allows it.
        Differentiable in a, b and bias.
    """
    _, out_dtype = _check(a, b, bias, alpha, activation, out_dtype)
    alpha = float(alpha)
    if resolve_backend(a.device) == "triton":
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _GemmFunction.apply(a, b, bias, alpha, activation, out_dtype)
        return _launch_module().gemm_forward(a, b, bias, alpha, activation, out_dtype)[0]
    return gemm_torch(a, b, bias, alpha, activation, out_dtype)
