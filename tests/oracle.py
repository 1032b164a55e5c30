"""FlashAttention's tolerance rule applied to one call: out and lse (factor 2), then dq/dk/dv (factor 3).

Every attention test file checks its outputs through assert_matches_oracle, so the rule lives in
one place (reference.check_close holds the arithmetic).

One addition for gradients (delta_floor): FlashAttention's backward computes dS = P * (dP - delta)
with delta = rowsum(dO * O) taken from the stored output O (rounded to the input dtype, and summed in
another order than dP). Where the softmax gradient cancels exactly (a row with a single visible key,
P = 1), torch's own backward is exact and the rule's bound collapses to its atol, while any
FlashAttention-style kernel is off by delta's error. The gradient of sum_i eps_i * lse_i is what a
per-row delta error eps_i does to dQ and dK (d lse_i / d s_ij = P_ij), so the gradient checks add
its size to the bound (assert_close's floor), for eps_i = sum_d dO_id * (O_id - O_ref_id) (the
stored output's measured error, already checked: this term is the first-order gradient error itself)
and, as a bound, for eps_i = 2 * eps(fp32) * sum_d |dO_id * O_ref_id| (the fp32 sums). Found by
tests/test_fuzz.py (an fp32 single-key sequence, fp16 dropout on one key).

A second addition for fp32 dV (value_sum_floor): where every row sees one key, torch's fp32 dV is
exact, and the bound collapses to its atol again, while the kernels add up to Sq * group rows one
after another and compute that key's P from a rounded logit. The typical size of both is the floor.

A third, for ft.gemm's gradients (gemm_grad_floor): the backward takes act'(z) from the stored
pre-activation z (rounded to the output dtype, as torch's own autograd keeps it) and rounds
grad_z = dout * act'(z) to the inputs' dtype before its two GEMMs. With few terms in the sum torch's
own error can land far below the typical size of those roundings by luck, and 3x it is then no
floor (fp16, [1, 1] @ [1, 17] + bias, gelu_tanh: da 1.41e-3 against 1.33e-3, where over 200 random
douts the kernel path's median error was 8.6e-4 and torch's 1.6e-3; found by tests/test_fuzz.py).
"""

import math
from typing import Optional, Sequence, Tuple

import torch

from flashtile.reference import attention_ref, check_close


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, lowprec: torch.Tensor, factor: float,
                 floor: float = 0.0) -> None:
    """check_close's rule with a rounding floor under factor * lowprec error, used only where it is
    larger, and the floor on top: bound = max(factor * lowprec error, factor * rounding) + floor + atol.

    rounding: half an ulp of out's dtype at the largest |ref|, the error of storing the result at all.
    On a tiny output (one element: D=1, Sq=1) torch's own result can land within 1e-6 of the oracle by
    luck, and one ulp of rounding fails the plain rule (fp16 dQ of a single query against 33 keys,
    found by tests/test_fuzz.py); a large tensor's lowprec error already exceeds this floor, so it
    changes nothing there.
    floor (gradients: delta_floor's, plus value_sum_floor's for fp32 dV): errors of FlashAttention's
    algorithm that torch's own result does not make, so they add to the rounding both make. Taking
    the larger of the two instead failed an fp16 example where they were of a size (SDPA, D=1, GQA:
    dK 3.9e-3 against a bound of 2.9e-3, of which 2.84e-3 was delta's first-order error and about
    1e-3 dS's fp16 rounding, with torch's own fp16 error at 6.5e-4; found by tests/test_fuzz.py).
    """
    _, err, plain = check_close(out, ref, lowprec, factor=factor, atol=0.0)  # plain = factor * lowprec error
    finite = ref.detach()[torch.isfinite(ref.detach())]
    rounding = 0.5 * torch.finfo(out.dtype).eps * float(finite.abs().max()) if finite.numel() else 0.0
    bound = max(plain, factor * rounding) + floor + 1e-5
    assert math.isfinite(err) and err <= bound, f"{name}: max error {err:.3e} exceeds bound {bound:.3e}"


def delta_floor(inputs: Sequence[torch.Tensor], out: torch.Tensor, out_ref: torch.Tensor, lse_ref: torch.Tensor,
                dout: torch.Tensor) -> Tuple[float, ...]:
    """Per input, max |d/d input of sum_i eps_i * lse_i| (module docstring): the gradient error that the
    error eps_i of row i's delta causes. out (the kernel's) and out_ref are [..., rows, Hq, Dv], lse_ref
    [..., Hq, rows] (dense [B, Sq, Hq, Dv] / [B, Hq, Sq]; packed [total, Hq, Dv] / [Hq, total]). The
    oracle's graph is kept for the gradient checks that follow."""
    o_ref = out_ref.detach()
    do = dout.detach().to(o_ref.dtype)
    lse = torch.where(torch.isfinite(lse_ref), lse_ref, torch.zeros_like(lse_ref))
    floors = [0.0] * len(inputs)
    # the stored output's error, with its sign (the first-order gradient error itself), then the fp32
    # sums' rounding as a bound (its sign is unknown; it matters where the first term is exact)
    for eps_rows in ((do * (out.detach().to(o_ref.dtype) - o_ref)).sum(-1),
                     2 * torch.finfo(torch.float32).eps * (do * o_ref).abs().sum(-1)):
        grads = torch.autograd.grad((lse * eps_rows.transpose(-1, -2)).sum(), inputs, retain_graph=True,
                                    allow_unused=True)
        floors = [f + (float(g.abs().max()) if g is not None and g.numel() else 0.0) for f, g in zip(floors, grads)]
    return tuple(floors)


def value_sum_floor(dv_ref: torch.Tensor, out: torch.Tensor, lse_ref: torch.Tensor, factor: float = 3) -> float:
    """What fp32 arithmetic typically costs dV = sum_i P_ij * dO_i beyond torch's own (module docstring's
    second addition): factor * (sqrt(n) * u + 2 * eps * max|lse|) * max|dV|.

    sqrt(n) * u (u = eps / 2, fp32's unit roundoff): n roundings of random sign, each of the size of the
    result, as a sequential sum of n terms makes (the kernels' dV accumulator adds its rows one after
    another); n = rows * Hq bounds the terms of one dV entry (the query rows of its GQA group; packed
    varlen counts every sequence). 2 * eps * max|lse|: the kernels' P = exp2(s * log2(e) - lse * log2(e))
    rounds its argument to an ulp or two of the logits' size, a relative error of P where the oracle's
    lone key gives exactly 1. It is assert_close's rounding floor (n = 1, no logits) grown by both.
    Only fp32 needs it: with one key per row torch's own fp32 dV can be exact (P = 1). Found by
    tests/test_fuzz.py: fp32 SDPA, 197 queries over one key (dV 2.29e-5 against a bound of 2.14e-5
    on the H200), and fp32 ALiBi with 66 queries over one key (1.91e-5 against 1.86e-5)."""
    eps = torch.finfo(torch.float32).eps
    finite = lse_ref.detach()[torch.isfinite(lse_ref.detach())]
    logits = float(finite.abs().max()) if finite.numel() else 0.0
    rows = out.shape[-3] * out.shape[-2]
    largest = float(dv_ref.detach().abs().max()) if dv_ref.numel() else 0.0
    return factor * (math.sqrt(rows) * eps / 2 + 2 * eps * logits) * largest


def assert_grads_match(grads: Sequence[torch.Tensor], out: torch.Tensor, dout: torch.Tensor,
                       ref: Sequence[torch.Tensor], hi: Sequence[torch.Tensor], low_out: torch.Tensor,
                       lo: Sequence[torch.Tensor], names: Sequence[str] = ("dq", "dk", "dv", "dbias")) -> None:
    """The gradient half of the rule (factor 3, delta_floor): grads (the kernel's, for upstream dout) of
    its output out against the oracle's, ref = (out, lse) built on leaves hi, and the same math in the
    input dtype, low_out built on leaves lo (hi and lo may be the same tensors). out / dout / ref are in
    flash layout ([..., rows, Hq, Dv], lse [..., Hq, rows])."""
    floors = list(delta_floor(hi, out, ref[0], ref[1], dout))
    want = torch.autograd.grad(ref[0], hi, dout.to(ref[0].dtype))
    if out.dtype == torch.float32 and "dv" in names[:len(hi)]:  # fp16 / bf16: torch's own error is larger
        at = names.index("dv")
        floors[at] += value_sum_floor(want[at], out, ref[1])
    lowg = torch.autograd.grad(low_out, lo, dout)
    for name, g, w, lg, floor, leaf in zip(names, grads, want, lowg, floors, lo):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        assert_close(name, g, w, lg, 3, floor=floor)


def assert_matches_oracle(inputs: Sequence[torch.Tensor], got: Sequence[torch.Tensor],
                          ref: Sequence[torch.Tensor], low: Sequence[torch.Tensor],
                          dout: Optional[torch.Tensor] = None, backward: bool = True) -> None:
    """got / ref / low are (out, lse) of flashtile, the upcast oracle and the same math in the input dtype.

    With backward, gradients of out w.r.t. inputs (q, k, v) are compared too, for one random dout.
    """
    out, lse = got
    assert_close("out", out, ref[0], low[0], 2)
    assert_close("lse", lse, ref[1], low[1], 2)
    if not backward:
        return
    dout = torch.randn_like(out) if dout is None else dout
    assert_grads_match(torch.autograd.grad(out, inputs, dout), out, dout, ref, inputs, low[0], inputs)


def assert_results_match_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                                got: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], **ref_kw) -> None:
    """The same rule for results computed without autograd (a backward called directly): (out, lse)
    and (dq, dk, dv) for the upstream gradient dout, against attention_ref(**ref_kw)."""
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*hi, **ref_kw)
    low = attention_ref(*lo, upcast=False, **ref_kw)
    for name, g, r, lw in (("out", got[0], ref[0], low[0]), ("lse", got[1], ref[1], low[1])):
        assert g.shape == r.shape, name
        assert_close(name, g, r, lw, 2)
    assert_grads_match(grads, got[0], dout, ref, hi, low[0], lo)


def gemm_grad_floor(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], alpha: float, act,
                    dout: torch.Tensor, out_dtype: torch.dtype, factor: float = 3) -> Tuple[float, float, float]:
    """(da, db, dbias) floors of ft.gemm's backward (module docstring): factor x the root-sum-square,
    over each gradient's reduction, of the per-term first-order errors of rounding z to out_dtype and
    grad_z to the inputs' dtype. act: torch's activation function (z -> act(z)). The root-sum-square is
    the typical size of a sum of independent roundings, not its worst case, so large sums keep their
    power to catch a real precision loss (tests/test_oracle.py)."""
    a64, b64 = a.detach().double(), b.detach().double()
    z = torch.matmul(a64, b64) * alpha
    if bias is not None:
        z = z + bias.detach().double()
    z.requires_grad_(True)
    (d1,) = torch.autograd.grad(act(z).sum(), z, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), z, allow_unused=True)[0] if d1.requires_grad else None
    do = dout.detach().double()
    u_pre, u_in = (torch.finfo(t).eps / 2 for t in (out_dtype, a.dtype))
    e2 = (u_in * (do * d1.detach())).square()
    if d2 is not None:
        e2 = e2 + (u_pre * z.detach().abs() * (do * d2)).square()
    da = (e2 @ b64.square().mT).sum_to_size(a.shape).sqrt() * abs(alpha)
    db = (a64.square().mT @ e2).sum_to_size(b.shape).sqrt() * abs(alpha)
    dbias = e2.sum_to_size(bias.shape).sqrt() if bias is not None else torch.zeros(1, dtype=torch.float64)
    return tuple(factor * (float(f.max()) if f.numel() else 0.0) for f in (da, db, dbias))
