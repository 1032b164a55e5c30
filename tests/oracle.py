"""FlashAttention's tolerance rule applied to one call: out and lse (factor 2), then dq/dk/dv (factor 3).

Every attention test file checks its outputs through assert_matches_oracle, so the rule lives in
one place (reference.check_close holds the arithmetic).
"""

from typing import Optional, Sequence

import torch

from flashtile.reference import attention_ref, check_close


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, lowprec: torch.Tensor, factor: float) -> None:
    ok, err, bound = check_close(out, ref, lowprec, factor=factor)
    assert ok, f"{name}: max error {err:.3e} exceeds bound {bound:.3e}"


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
    grads = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref[0], inputs, dout.to(ref[0].dtype))
    lowg = torch.autograd.grad(low[0], inputs, dout)
    for name, g, w, lg in zip(("dq", "dk", "dv"), grads, want, lowg):
        assert g.shape == w.shape and g.dtype == inputs[0].dtype
        assert_close(name, g, w, lg, 3)


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
    want = torch.autograd.grad(ref[0], hi, dout.double())
    lowg = torch.autograd.grad(low[0], lo, dout)
    for name, g, w, lg in zip(("dq", "dk", "dv"), grads, want, lowg):
        assert g.shape == w.shape, name
        assert_close(name, g, w, lg, 3)
