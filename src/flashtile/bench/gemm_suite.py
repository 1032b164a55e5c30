"""GEMM benchmark suites (issue 5): flashtile.gemm against cuBLAS (torch.matmul) and, for the fused
epilogue, against torch.addmm followed by the activation as a separate kernel.

Suites:
  gemm        square M = N = K in 256..8192 and transformer-block shapes (16384 tokens, hidden
              4096, FFN 14336: up-projection N = 4096 / 14336 at K = 4096, down-projection N = 4096
              at K = 14336), weight stored [K, N] ("NN") or [N, K] and used as w.mT ("NT", nn.Linear's
              layout), bf16 / fp16 / fp32; each plain and with bias [N] + gelu.
  gemm_sweep  plain bf16 GEMM at every square size 1..2048 (--quick: a subset, listed by --dry-run).

Case definitions are plain Python (no torch at import, like suites.py); the providers at the bottom
import torch and flashtile only when built.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .suites import Case, Suite

DTYPES = ("bfloat16", "float16", "float32")
FUSED_ACTIVATION = "gelu"
SQUARES = (256, 512, 1024, 2048, 4096, 8192)
TOKENS, HIDDEN, FFN = 16384, 4096, 14336
# (label, M, N, K): the projections of one transformer block's MLP
TRANSFORMER = (("up 4096", TOKENS, HIDDEN, HIDDEN), ("up 14336", TOKENS, FFN, HIDDEN),
               ("down 14336", TOKENS, HIDDEN, FFN))


def gemm_flops(m: int, n: int, k: int, batch: int = 1) -> float:
    """2 * M * N * K per batch (the bias and activation are not counted)."""
    return 2.0 * batch * m * n * k


def gemm_case(suite: str, name: str, m: int, n: int, k: int, dtype: str, fused: bool, layout: str = "NN",
              extra_labels: Mapping[str, Any] | None = None) -> Case:
    """One GEMM case; fused = bias [N] + gelu in the epilogue (peer: addmm + F.gelu)."""
    op = f"bias+{FUSED_ACTIVATION}" if fused else "plain"
    peer = "torch_addmm_act" if fused else "cublas"
    labels = {"dtype": dtype, "op": op, "layout": layout, "shape": name, **(extra_labels or {})}
    return Case(
        suite=suite, kind="gemm", mode="fwd", dtype=dtype,
        shape={"M": m, "N": n, "K": k, "layout": layout, "fused": fused},
        labels=labels, flops=gemm_flops(m, n, k),
        providers=("flashtile_gemm", peer), references=(peer,),
    )


def gemm_suite(quick: bool = False) -> list[Case]:
    """Squares and transformer shapes, 3 dtypes, plain and fused: 72 cases (quick: bf16 only, 24)."""
    dtypes = ("bfloat16",) if quick else DTYPES
    cases = []
    for dtype in dtypes:
        for fused in (False, True):
            for s in SQUARES:
                cases.append(gemm_case("gemm", f"{s}^3", s, s, s, dtype, fused))
            for name, m, n, k in TRANSFORMER:
                for layout in ("NN", "NT"):
                    cases.append(gemm_case("gemm", f"{name} ({m}x{n}x{k})", m, n, k, dtype, fused, layout))
    return cases


def sweep_sizes(quick: bool) -> list[int]:
    """Every size 1..2048; quick: 1..16, then steps of 31 (odd sizes) plus the powers of two."""
    if not quick:
        return list(range(1, 2049))
    return sorted(set(range(1, 17)) | set(range(17, 2049, 31)) | {2 ** i for i in range(12)})


def gemm_sweep_suite(quick: bool = False) -> list[Case]:
    """Plain bf16 GEMM, M = N = K = every size 1..2048, against cuBLAS."""
    return [gemm_case("gemm_sweep", f"{s}^3", s, s, s, "bfloat16", False, extra_labels={"size": s})
            for s in sweep_sizes(quick)]


GEMM_NOTES = (
    "- GEMM: TFLOP/s = 2*M*N*K / median time (bias and activation not counted); rows `plain` compare "
    "flashtile.gemm with torch.matmul (cuBLAS), rows `bias+gelu` compare flashtile.gemm(a, b, bias, "
    "activation='gelu') with torch.addmm(bias, a, b) followed by F.gelu (unfused)",
    "- layout NN: a [M, K] and b [K, N] contiguous; NT: b = w.mT with w [N, K] contiguous (nn.Linear); "
    "fp32 is exact fp32 on both sides (torch's default allow_tf32=False)",
    "- inputs: seeded normal values, a scaled by 1/sqrt(K) so outputs are O(1); validation against "
    "the peer's output before timing",
)


def _targets() -> tuple[dict[str, Any], ...]:
    """Issue 5's goals, one per bf16 shape >= 2048 (a target matches rows by their labels)."""
    shapes = [(f"{s}^3", "NN") for s in SQUARES if s >= 2048]
    shapes += [(f"{name} ({m}x{n}x{k})", layout) for name, m, n, k in TRANSFORMER for layout in ("NN", "NT")]
    out = []
    for op, goal, peer in (("plain", 0.95, "cuBLAS"), (f"bias+{FUSED_ACTIVATION}", 1.05, "addmm + gelu")):
        for shape, layout in shapes:
            out.append({"text": f"bf16 {op} {shape} {layout}: flashtile >= {goal}x {peer}",
                        "match": {"dtype": "bfloat16", "op": op, "shape": shape, "layout": layout},
                        "metric": "vs_best", "min": goal})
    return tuple(out)


GEMM_TARGETS = _targets()

GEMM_SUITES = {
    "gemm": Suite(
        name="gemm",
        description="GEMM (issue 5): squares 256..8192 and transformer MLP shapes (16384 tokens, hidden "
        "4096, FFN 14336), bf16 / fp16 / fp32, plain vs cuBLAS and bias+gelu vs addmm + gelu",
        build=gemm_suite, x="shape", group=("dtype", "op", "layout"), subject="flashtile_gemm",
        ratio_peers=("cublas", "torch_addmm_act"), notes=GEMM_NOTES, plot="bars", targets=GEMM_TARGETS,
    ),
    "gemm_sweep": Suite(
        name="gemm_sweep",
        description="GEMM sweep: plain bf16 M = N = K = every size 1..2048 (--quick: the sizes listed by "
        "--dry-run), flashtile vs cuBLAS",
        build=gemm_sweep_suite, x="size", group=("dtype", "op"), subject="flashtile_gemm",
        ratio_peers=("cublas",), notes=GEMM_NOTES,
    ),
}


# ----------------------------------------------------------------------------------------------
# Providers (torch imported when built)


def gemm_inputs(case: Case, device, seed: int = 0) -> dict:
    """Seeded a [M, K] (scaled by 1/sqrt(K)), w (the weight: [K, N] for NN, [N, K] for NT), bias [N]."""
    import torch

    s = case.shape
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    m, n, k = s["M"], s["N"], s["K"]
    a = torch.randn(m, k, generator=gen, device=device, dtype=torch.float32).mul_(1.0 / math.sqrt(k)).to(dtype)
    w_shape = (k, n) if s["layout"] == "NN" else (n, k)
    w = torch.randn(w_shape, generator=gen, device=device, dtype=dtype)
    bias = torch.randn(n, generator=gen, device=device, dtype=dtype)
    return {"a": a, "w": w, "bias": bias}


def _operands(case: Case, inputs: Mapping[str, Any]):
    """Private copies of a, b (w or w.mT: no copy in the timed call) and bias."""
    w = inputs["w"].clone()
    b = w if case.shape["layout"] == "NN" else w.mT
    return inputs["a"].clone(), b, inputs["bias"].clone()


def _build_flashtile_gemm(case: Case, inputs: Mapping[str, Any]):
    import flashtile
    from flashtile.dispatch import use_backend

    from .peers import Prepared

    a, b, bias = _operands(case, inputs)
    fused = bool(case.shape["fused"])

    def fn():
        if fused:
            return flashtile.gemm(a, b, bias, activation=FUSED_ACTIVATION)
        return flashtile.gemm(a, b)

    # Force the Triton kernel: a stray FLASHTILE_BACKEND must not be benchmarked.
    return Prepared(fn=fn, result=lambda: {"out": fn()}, context=lambda: use_backend("triton"))


def _build_cublas(case: Case, inputs: Mapping[str, Any]):
    import torch

    from .peers import Prepared

    if case.shape["fused"]:
        raise ValueError("cublas is the plain-GEMM peer; fused cases use torch_addmm_act")
    a, b, _ = _operands(case, inputs)

    def fn():
        return torch.matmul(a, b)

    return Prepared(fn=fn, result=lambda: {"out": fn()})


def _build_addmm_act(case: Case, inputs: Mapping[str, Any]):
    import torch
    import torch.nn.functional as F

    from .peers import Prepared

    a, b, bias = _operands(case, inputs)

    def fn():
        return F.gelu(torch.addmm(bias, a, b))

    return Prepared(fn=fn, result=lambda: {"out": fn()})


def gemm_providers() -> list:
    """The GEMM providers (peers.py registers them)."""
    from .peers import Provider

    return [
        Provider("flashtile_gemm", "gemm", "flashtile.gemm (Triton), bias and activation fused", _build_flashtile_gemm),
        Provider("cublas", "gemm", "torch.matmul (cuBLAS)", _build_cublas),
        Provider("torch_addmm_act", "gemm", "torch.addmm(bias, a, b) then F.gelu (two kernels)", _build_addmm_act),
    ]
