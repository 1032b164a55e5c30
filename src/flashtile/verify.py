"""``python -m flashtile verify``: check each backend this machine can run against the oracle.

Every case goes through the public API (``flashtile.flash_attn_func`` inside
``flashtile.use_backend(name)``), forward and backward, and is judged by FlashAttention's tolerance
rule (reference.check_close): the output error against the float64 oracle may be at most twice the
error of the same math in the input dtype (+1e-5), gradients three times.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from flashtile import dispatch
from flashtile.reference import attention_ref, check_close

KNOWN_BACKENDS = ("reference", "cpu", "triton")


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention shape: q [batch, seqlen_q, heads_q, head_dim], k/v [batch, seqlen_k, heads_kv, head_dim]."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    # Build q/k/v heads-first and transpose them, so strided (non-contiguous) inputs are covered too.
    transposed: bool = False

    def label(self) -> str:
        return (f"B{self.batch} Sq{self.seqlen_q} Sk{self.seqlen_k} H{self.heads_q}/{self.heads_kv} "
                f"D{self.head_dim}{' T' if self.transposed else ''}")


@dataclasses.dataclass
class Result:
    backend: str
    dtype: str
    case: Case
    fwd: Tuple[float, float] = (math.nan, math.nan)  # (err, bound)
    grad: Tuple[float, float] = (math.nan, math.nan)  # the worst of dq, dk, dv by err / bound
    ok: bool = False
    note: str = ""


# Odd lengths (1, 37, 113, 257), odd head dims (1, 40, 72, 111, 333), Sq != Sk both ways (causal with Sq > Sk
# leaves fully masked rows), GQA and MQA.
_CPU_CASES = [
    Case(1, 1, 1, 1, 1, 1, False),
    Case(2, 37, 37, 4, 2, 40, True, transposed=True),
    Case(1, 113, 257, 4, 1, 64, True),
    Case(2, 257, 113, 6, 2, 72, False, transposed=True),
    Case(2, 257, 113, 6, 3, 72, True),
    Case(1, 257, 257, 2, 2, 111, True),
    Case(1, 64, 128, 2, 1, 128, False, transposed=True),
    Case(2, 128, 128, 4, 2, 128, True),
    Case(1, 77, 64, 2, 1, 333, True),  # wide heads (split-D kernels on the Triton path)
]
_CPU_QUICK = _CPU_CASES[:4]
# Larger shapes where a GPU makes them cheap.
_CUDA_EXTRA = [
    Case(2, 1024, 1024, 8, 2, 128, True),
    Case(1, 511, 1537, 4, 1, 256, True, transposed=True),
    Case(1, 2048, 2048, 4, 4, 64, False),
    Case(1, 700, 700, 4, 2, 512, True),
    Case(1, 257, 513, 2, 1, 1000, False, transposed=True),
]
# Triton's interpreter runs every program instance in Python: small shapes only (S <= 64).
_INTERP_CASES = [
    Case(1, 1, 1, 1, 1, 1, False),
    Case(1, 37, 37, 2, 1, 40, True, transposed=True),
    Case(2, 17, 64, 4, 2, 64, False),
    Case(1, 64, 29, 2, 2, 72, True),
    Case(1, 33, 40, 2, 1, 320, True),
]
_INTERP_QUICK = _INTERP_CASES[:2]


def available_backends() -> List[str]:
    """Backends this machine can run: always reference and cpu; triton with CUDA or TRITON_INTERPRET=1."""
    names = ["reference", "cpu"]
    if torch.cuda.is_available() or dispatch.triton_interpreting():
        names.append("triton")
    return names


def _device_for(backend: str) -> torch.device:
    """The cpu backend is checked on CPU tensors; the others on the GPU when there is one."""
    if backend != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _dtypes_for(device: torch.device) -> List[torch.dtype]:
    # bf16 is left to the GPU: slow CPU matmuls, and wrong under Triton's interpreter.
    if device.type == "cuda":
        return [torch.float16, torch.bfloat16, torch.float32]
    return [torch.float16, torch.float32]


def _cases_for(backend: str, device: torch.device, quick: bool) -> List[Case]:
    if backend == "triton" and device.type != "cuda":
        return list(_INTERP_QUICK if quick else _INTERP_CASES)
    if quick:
        return list(_CPU_QUICK)
    return _CPU_CASES + (_CUDA_EXTRA if device.type == "cuda" else [])


def _inputs(case: Case, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Fresh random q, k, v, dout for one case (seeded by the case, so reruns are reproducible)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, str(dtype))).encode()))

    def rnd(seqlen: int, heads: int, dim: int) -> torch.Tensor:
        if case.transposed:
            t = torch.randn(case.batch, heads, seqlen, dim, generator=gen).transpose(1, 2)
        else:
            t = torch.randn(case.batch, seqlen, heads, dim, generator=gen)
        return t.to(device=device, dtype=dtype)

    d = case.head_dim
    return (rnd(case.seqlen_q, case.heads_q, d), rnd(case.seqlen_k, case.heads_kv, d),
            rnd(case.seqlen_k, case.heads_kv, d), rnd(case.seqlen_q, case.heads_q, d))


def _oracle(q, k, v, dout, causal: bool, upcast: bool):
    """out and (dq, dk, dv) by autograd through attention_ref; upcast runs in float64 on the CPU."""
    if upcast:
        leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        dout = dout.cpu().double()
    else:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = attention_ref(*leaves, causal=causal, upcast=upcast)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def run_case(backend: str, case: Case, dtype: torch.dtype, device: torch.device) -> Result:
    """Forward and backward of one case through the public API on ``backend``, judged by check_close."""
    import flashtile

    res = Result(backend, str(dtype).replace("torch.", ""), case)
    q, k, v, dout = _inputs(case, dtype, device)
    try:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with flashtile.use_backend(backend):
            out = flashtile.flash_attn_func(*leaves, softmax_scale=None, causal=case.causal)
            out.backward(dout)
        grads = [t.grad for t in leaves]
    except Exception as exc:  # report the case as failed and go on with the others
        res.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return res
    if any(g is None for g in grads):
        res.note = "no gradient for q, k or v"
        return res

    ref_out, ref_grads = _oracle(q, k, v, dout, case.causal, upcast=True)
    low_out, low_grads = _oracle(q, k, v, dout, case.causal, upcast=False)
    fwd_ok, err, bound = check_close(out, ref_out, low_out, factor=2.0)
    res.fwd = (err, bound)
    failed = [] if fwd_ok else ["out"]
    worst = None
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        ok, err, bound = check_close(g, r, lo, factor=3.0)
        if not ok:
            failed.append(name)
        ratio = err / bound if bound > 0 else math.inf
        if worst is None or not ratio <= worst[0]:  # `not <=` so a NaN ratio counts as worst
            worst = (ratio, err, bound)
    res.grad = (worst[1], worst[2])
    res.ok = not failed
    if failed:
        res.note = f"{', '.join(failed)} out of tolerance"
    return res


_COLUMNS = ("backend", "dtype", "shape", "causal", "fwd err / bound", "grad err / bound", "result")
_WIDTHS = (9, 8, 36, 6, 21, 21, 6)


def _row(cells: Sequence[str]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, _WIDTHS)).rstrip()


def _pair(p: Tuple[float, float]) -> str:
    return "-" if math.isnan(p[0]) else f"{p[0]:.2e} / {p[1]:.2e}"


def format_result(r: Result) -> str:
    """One table row (plus the reason on failure)."""
    line = _row((r.backend, r.dtype, r.case.label(), "yes" if r.case.causal else "no",
                 _pair(r.fwd), _pair(r.grad), "PASS" if r.ok else "FAIL"))
    return line + (f"  {r.note}" if r.note else "")


def run_verify(backends: Optional[List[str]] = None, quick: bool = False,
               echo: Callable[[str], None] = print) -> int:
    """Verify ``backends`` (default: all this machine can run); print a table; 0 if all pass, else 1.

    ``quick`` runs a few small shapes (seconds per backend on a CPU).
    """
    available = available_backends()
    wanted = list(available if not backends else backends)
    status = 0
    for name in wanted:
        if name not in KNOWN_BACKENDS:
            echo(f"verify: unknown backend {name!r}; expected one of {', '.join(KNOWN_BACKENDS)}")
            status = 1
        elif name not in available:
            echo(f"verify: backend {name!r} is not available here: it needs CUDA, or TRITON_INTERPRET=1 "
                 "to run the kernels through Triton's interpreter")
            status = 1
    wanted = [n for n in wanted if n in available]

    echo(_row(_COLUMNS))
    echo(_row("-" * w for w in _WIDTHS))
    passed = total = 0
    for name in wanted:
        device = _device_for(name)
        start = time.perf_counter()
        for dtype in _dtypes_for(device):
            for case in _cases_for(name, device, quick):
                res = run_case(name, case, dtype, device)
                echo(format_result(res))
                total += 1
                passed += res.ok
        echo(f"  ({name} on {device.type}: {time.perf_counter() - start:.1f} s)")
    echo(f"{passed}/{total} cases passed" + ("" if passed == total else f", {total - passed} FAILED"))
    if passed != total or total == 0:
        status = 1
    return status
