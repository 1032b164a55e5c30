"""Benchmark cases: what to measure, independent of how it is measured.

A *suite* is a named list of :class:`Case` objects plus how to lay them out in a report.
A case is generic on purpose: ``kind`` says which inputs the providers need ("attention" today,
"gemm" later), ``shape`` holds the sizes, ``labels`` holds the columns the report shows, and
``providers`` names who runs it. A new suite (variants, GQA, GEMM) is a new builder function
registered in ``SUITES``; the runner and the report never need to change for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

MODES = ("fwd", "fwd_bwd")

# The forward + backward cost relative to the forward alone. FlashAttention's convention
# (backward = 2.5 x forward: five matmuls against two) so our numbers compare with published ones.
FWD_BWD_FACTOR = 3.5

# SDPA's math backend materialises the S x S scores (in float32 for half inputs), and its backward
# keeps several such tensors. Above this size it either runs out of memory or takes minutes.
MATH_SCORES_LIMIT_BYTES = 8e9


@dataclass(frozen=True)
class Case:
    """One measurement: a shape, a mode, and the providers to compare on it.

    Attributes:
        suite: name of the suite the case belongs to.
        kind: which inputs the providers need ("attention"; later "gemm").
        mode: "fwd" or "fwd_bwd".
        dtype: torch dtype name of the inputs, e.g. "bfloat16".
        shape: sizes and flags the providers read (attention: B, H, Hkv, Sq, Sk, D, causal).
        labels: the report's columns for this case, in display order (e.g. D, causal, S).
        flops: floating point operations of one call in this mode.
        providers: providers timed on this case, in report order.
        references: providers trusted for validation, in order of preference; the first that runs
            gives the output every other provider is compared with.
        skip: provider -> reason it is not run on this case (reported as "-" with the reason).
    """

    suite: str
    kind: str
    mode: str
    dtype: str
    shape: Mapping[str, Any]
    labels: Mapping[str, Any]
    flops: float
    providers: tuple[str, ...]
    references: tuple[str, ...] = ()
    skip: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable identity used to merge results of several runs (shape and mode, no labels)."""
        sizes = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.shape.items()))
        return f"{self.suite}|{self.kind}|{self.mode}|{self.dtype}|{sizes}"

    @property
    def name(self) -> str:
        """Short human-readable description, e.g. "D=64 causal=no S=512 fwd"."""
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.labels.items()) + f" {self.mode}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see :func:`case_from_dict`)."""
        return {
            "key": self.key,
            "suite": self.suite,
            "kind": self.kind,
            "mode": self.mode,
            "dtype": self.dtype,
            "shape": dict(self.shape),
            "labels": {k: _fmt(v) for k, v in self.labels.items()},
            "flops": self.flops,
            "providers": list(self.providers),
            "references": list(self.references),
            "skip": dict(self.skip),
        }


def case_from_dict(d: Mapping[str, Any]) -> Case:
    """Inverse of :meth:`Case.to_dict` (labels come back as display strings)."""
    return Case(
        suite=d["suite"],
        kind=d["kind"],
        mode=d["mode"],
        dtype=d["dtype"],
        shape=dict(d["shape"]),
        labels=dict(d["labels"]),
        flops=float(d["flops"]),
        providers=tuple(d["providers"]),
        references=tuple(d.get("references", ())),
        skip=dict(d.get("skip", {})),
    )


def _fmt(v: Any) -> Any:
    """Booleans read better as yes/no in tables and names."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return v


@dataclass(frozen=True)
class Suite:
    """A named case list and how the report lays it out.

    Attributes:
        name: the --suite value.
        description: one line for the report header.
        build: ``build(quick) -> list[Case]``.
        x: label plotted on the x axis.
        group: labels that pick the subplot (one subplot per distinct combination).
        subject: the provider whose speed the ratio columns describe.
        ratio_peers: peers that get their own "vs" column (plus "vs best" over all peers).
    """

    name: str
    description: str
    build: Callable[[bool], list[Case]]
    x: str
    group: tuple[str, ...]
    subject: str = "flashtile"
    ratio_peers: tuple[str, ...] = ()

    def layout(self) -> dict[str, Any]:
        """The report-facing part of the suite, stored in the results JSON."""
        return {
            "name": self.name,
            "description": self.description,
            "x": self.x,
            "group": list(self.group),
            "subject": self.subject,
            "ratio_peers": list(self.ratio_peers),
        }


# ----------------------------------------------------------------------------------------------
# FLOPs


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool, mode: str) -> float:
    """FLOPs of one attention call, FlashAttention's convention.

    Forward is two matmuls (Q K^T and P V) of 2*Sq*Sk*D each per head: 4*B*H*Sq*Sk*D, halved for
    causal with Sq == Sk (half the scores are masked and a good kernel skips them).
    fwd_bwd counts 3.5 x forward.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flops = 4.0 * b * h * sq * sk * d
    if causal and sq == sk:
        flops /= 2
    return flops * FWD_BWD_FACTOR if mode == "fwd_bwd" else flops


def tflops(flops: float, median_ms: float) -> float:
    """Throughput in TFLOP/s from a FLOP count and a median time in milliseconds."""
    return flops / (median_ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# Attention suites


def _math_skip(b: int, h: int, sq: int, sk: int, limit: float) -> dict[str, str]:
    """Skip SDPA's math backend when its float32 S x S scores would not fit comfortably."""
    scores = 4.0 * b * h * sq * sk
    if scores < limit:
        return {}
    return {"sdpa_math": f"S x S scores need {scores / 1e9:.1f} GB > {limit / 1e9:.0f} GB limit"}


def attention_case(
    suite: str,
    *,
    b: int,
    h: int,
    s: int,
    d: int,
    causal: bool,
    mode: str,
    providers: Sequence[str],
    references: Sequence[str],
    dtype: str = "bfloat16",
    math_limit: float = MATH_SCORES_LIMIT_BYTES,
) -> Case:
    """A self-attention case (Sq == Sk, Hkv == H) with the usual labels D, causal, S."""
    skip = _math_skip(b, h, s, s, math_limit) if "sdpa_math" in providers else {}
    return Case(
        suite=suite,
        kind="attention",
        mode=mode,
        dtype=dtype,
        shape={"B": b, "H": h, "Hkv": h, "Sq": s, "Sk": s, "D": d, "causal": causal},
        labels={"D": d, "causal": causal, "S": s},
        flops=attention_flops(b, h, s, s, d, causal, mode),
        providers=tuple(providers),
        references=tuple(references),
        skip=skip,
    )


STANDARD_PROVIDERS = ("flashtile", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex")
STANDARD_REFERENCES = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")


def standard_suite(quick: bool = False) -> list[Case]:
    """FlashAttention's benchmark: 16k tokens per batch, hidden size 2048, bf16.

    B = 16384 // S and H = 2048 // D keep the work per S proportional to S, so TFLOP/s across S
    compares kernels at equal token counts. 6 S x 3 D x 2 causal x 2 modes = 72 cases.
    """
    seqlens = (1024, 4096, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    headdims = (64, 128) if quick else (64, 128, 256)
    cases = []
    for mode in MODES:
        for d in headdims:
            for causal in (False, True):
                for s in seqlens:
                    cases.append(
                        attention_case(
                            "standard",
                            b=16384 // s,
                            h=2048 // d,
                            s=s,
                            d=d,
                            causal=causal,
                            mode=mode,
                            providers=STANDARD_PROVIDERS,
                            references=STANDARD_REFERENCES,
                        )
                    )
    return cases


WIDE_PROVIDERS = ("flashtile", "sdpa_efficient", "sdpa_math")
WIDE_REFERENCES = ("sdpa_efficient", "sdpa_math")
# The wide suite compares against math explicitly, and B*H*S*S*4 = 12.9 GB at B=1, H=48, S=8192:
# that fits an H200 (141 GB) even with math's backward, so the limit is raised for this suite.
WIDE_MATH_LIMIT_BYTES = 32e9


def wide_suite(quick: bool = False) -> list[Case]:
    """FFPA's large-head benchmark: B=1, H=48, S=8192, D = 320..1024 step 64, bf16.

    FlashAttention-2 and cuDNN refuse D > 256, so the peers are SDPA's efficient and math backends.
    Non-causal is the published comparison; causal is included too (filter with --causal no).
    """
    headdims = (320, 512, 1024) if quick else tuple(range(320, 1025, 64))
    cases = []
    for mode in MODES:
        for causal in (False, True):
            for d in headdims:
                cases.append(
                    attention_case(
                        "wide",
                        b=1,
                        h=48,
                        s=8192,
                        d=d,
                        causal=causal,
                        mode=mode,
                        providers=WIDE_PROVIDERS,
                        references=WIDE_REFERENCES,
                        math_limit=WIDE_MATH_LIMIT_BYTES,
                    )
                )
    return cases


SUITES: dict[str, Suite] = {
    "standard": Suite(
        name="standard",
        description="FlashAttention's suite: 16k tokens (B = 16384/S), hidden 2048 (H = 2048/D), bf16",
        build=standard_suite,
        x="S",
        group=("D", "causal"),
        ratio_peers=("sdpa_flash", "sdpa_cudnn", "flex"),
    ),
    "wide": Suite(
        name="wide",
        description="Wide heads (FFPA's): B=1, H=48, S=8192, D = 320..1024, bf16",
        build=wide_suite,
        x="D",
        group=("causal",),
        ratio_peers=("sdpa_efficient", "sdpa_math"),
    ),
}


# ----------------------------------------------------------------------------------------------
# Filters (so a big suite can be split over several runs)


def filter_cases(
    cases: Iterable[Case],
    *,
    seqlens: Sequence[int] | None = None,
    headdims: Sequence[int] | None = None,
    causal: str = "both",
    modes: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
) -> list[Case]:
    """Keep the cases matching every given filter; ``providers`` narrows each case's provider list.

    A filter on a field a case does not have (e.g. --seqlens on a GEMM case) does not drop it.
    Cases left with no provider are dropped.
    """
    if causal not in ("both", "yes", "no"):
        raise ValueError(f"causal filter must be both, yes or no, got {causal!r}")
    out = []
    for case in cases:
        shape = case.shape
        if seqlens is not None and "Sq" in shape and shape["Sq"] not in seqlens:
            continue
        if headdims is not None and "D" in shape and shape["D"] not in headdims:
            continue
        if causal != "both" and "causal" in shape and bool(shape["causal"]) != (causal == "yes"):
            continue
        if modes is not None and case.mode not in modes:
            continue
        if providers is not None:
            kept = tuple(p for p in case.providers if p in providers)
            if not kept:
                continue
            case = replace(case, providers=kept, skip={p: r for p, r in case.skip.items() if p in kept})
        out.append(case)
    return out
