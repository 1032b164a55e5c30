"""Benchmark cases: what to measure, independent of how it is measured.

A *suite* is a named list of :class:`Case` objects plus how to lay them out in a report.
A case is generic on purpose: ``kind`` says which inputs the providers need ("attention" today,
"gemm" later), ``shape`` holds the sizes, ``labels`` holds the columns the report shows, and
``providers`` names who runs it. A new suite (variants, GQA, GEMM) is a new builder function
registered in ``SUITES``; the runner and the report never need to change for it.
"""

from __future__ import annotations

import random
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
        provider_flops: provider -> FLOPs of *its* call, for a provider that computes a different
            problem than the case (the variants suite's flashtile_dense baseline); others use flops.
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
    provider_flops: Mapping[str, float] = field(default_factory=dict)

    def flops_for(self, provider: str) -> float:
        """FLOPs behind ``provider``'s TFLOP/s on this case."""
        return float(self.provider_flops.get(provider, self.flops))

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
            **({"provider_flops": dict(self.provider_flops)} if self.provider_flops else {}),
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
        provider_flops={p: float(f) for p, f in d.get("provider_flops", {}).items()},
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
        baseline: a provider that is the subject itself on an easier problem (the variants suite's
            flashtile_dense): not a peer; it gets the columns "vs <baseline_label>" (subject TFLOP/s /
            baseline TFLOP/s) and "time / dense" (subject time / baseline time) instead.
        baseline_label: how the report names the baseline.
        notes: extra lines for the report header (how FLOPs and ratios are counted).
        plot: "lines" (TFLOP/s against x, one subplot per group) or "bars" (one bar group per case,
            labelled by the group labels and x; for suites whose x is not a number).
        targets: goals checked in the report, each {"text", "match": {label: value}, "metric":
            "time_vs_dense" | "vs_dense" | "vs_best", "max" or "min"}.
    """

    name: str
    description: str
    build: Callable[[bool], list[Case]]
    x: str
    group: tuple[str, ...]
    subject: str = "flashtile"
    ratio_peers: tuple[str, ...] = ()
    baseline: str | None = None
    baseline_label: str | None = None
    notes: tuple[str, ...] = ()
    plot: str = "lines"
    targets: tuple[Mapping[str, Any], ...] = ()

    def layout(self) -> dict[str, Any]:
        """The report-facing part of the suite, stored in the results JSON."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "x": self.x,
            "group": list(self.group),
            "subject": self.subject,
            "ratio_peers": list(self.ratio_peers),
        }
        # Only suites that use them carry the newer keys, so older suites' files stay unchanged.
        if self.baseline:
            out["baseline"] = self.baseline
            out["baseline_label"] = self.baseline_label or self.baseline
        if self.notes:
            out["notes"] = list(self.notes)
        if self.plot != "lines":
            out["plot"] = self.plot
        if self.targets:
            out["targets"] = [dict(t) for t in self.targets]
        return out


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


def _token_suite(suite: str, seqlens: Sequence[int], headdims: Sequence[int], providers: Sequence[str],
                 references: Sequence[str]) -> list[Case]:
    """FlashAttention's shapes: B = 16384 // S and H = 2048 // D keep the tokens and the hidden size
    fixed, so TFLOP/s across S compares kernels at equal token counts."""
    cases = []
    for mode in MODES:
        for d in headdims:
            for causal in (False, True):
                for s in seqlens:
                    cases.append(attention_case(suite, b=16384 // s, h=2048 // d, s=s, d=d, causal=causal, mode=mode,
                                                providers=providers, references=references))
    return cases


def standard_suite(quick: bool = False) -> list[Case]:
    """FlashAttention's benchmark: 16k tokens per batch, hidden size 2048, bf16 (_token_suite).
    6 S x 3 D x 2 causal x 2 modes = 72 cases."""
    seqlens = (1024, 4096, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    headdims = (64, 128) if quick else (64, 128, 256)
    return _token_suite("standard", seqlens, headdims, STANDARD_PROVIDERS, STANDARD_REFERENCES)


HEAD_DIM_PROVIDERS = ("flashtile", "sdpa_flash", "sdpa_cudnn", "flex")
HEAD_DIM_REFERENCES = ("sdpa_flash", "sdpa_cudnn")


def head_dim_suite(quick: bool = False) -> list[Case]:
    """Head dims that are not powers of two (80, 96, 160, 192) on the standard suite's shapes
    (_token_suite): the dense kernels run them as two column chunks (tuning.head_dim_chunks) instead
    of a padded power-of-two tile."""
    return _token_suite("headdims", (8192,) if quick else (2048, 8192), (80, 96, 160, 192), HEAD_DIM_PROVIDERS,
                        HEAD_DIM_REFERENCES)


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


WIDE_MLA_PAIRS = ((192, 128), (576, 512))  # (Dqk, Dv) of MLA-style models (DeepSeek: 192/128 and 576/512)


def wide_mla_suite(quick: bool = False) -> list[Case]:
    """Different head dims for Q/K and V (MLA): B=1, H=48, S=8192, bf16, against SDPA.

    FLOPs: 2*B*H*Sq*Sk*(Dqk + Dv) for the forward (Q K^T over Dqk, P V over Dv), halved for causal,
    x 3.5 for forward + backward. cuDNN runs where it accepts the pair (it refuses D > 256).
    """
    cases = []
    for mode in MODES:
        for causal in (False, True):
            for dqk, dv in WIDE_MLA_PAIRS:
                flops = 2.0 * 48 * 8192 * 8192 * (dqk + dv) / (2 if causal else 1)
                providers = WIDE_PROVIDERS + (("sdpa_cudnn",) if dqk <= 256 else ())
                cases.append(Case(
                    suite="wide_mla", kind="attention", mode=mode, dtype="bfloat16",
                    shape={"B": 1, "H": 48, "Hkv": 48, "Sq": 8192, "Sk": 8192, "D": dqk, "Dv": dv, "causal": causal},
                    labels={"Dqk": dqk, "Dv": dv, "causal": causal, "S": 8192},
                    flops=flops * FWD_BWD_FACTOR if mode == "fwd_bwd" else flops,
                    providers=providers, references=WIDE_REFERENCES,
                    skip=_math_skip(1, 48, 8192, 8192, WIDE_MATH_LIMIT_BYTES)))
    return cases


# ----------------------------------------------------------------------------------------------
# Variants suite: window, softcap, ALiBi, dropout, GQA, varlen, block-sparse
#
# Everything here is plain Python (no torch, no device): the masks are rebuilt from the case's
# shape (seeds included) by flashtile.bench.variants on the device, and the FLOPs of a masked case
# come from an exact count of its visible (query, key) pairs done here, so --dry-run shows them.


def visible_pairs_window(sq: int, sk: int, left: int, right: int) -> int:
    """Pairs (i, j), 0 <= i < sq, 0 <= j < sk, with i + off - left <= j <= i + off + right.

    flash_attn_func's window_size (bottom-right aligned, off = sk - sq; -1 = unbounded side);
    causal is right = 0.
    """
    off = sk - sq
    total = 0
    for i in range(sq):
        lo = 0 if left < 0 else max(0, i + off - left)
        hi = sk - 1 if right < 0 else min(sk - 1, i + off + right)
        total += max(0, hi - lo + 1)
    return total


def visible_pairs_documents(lengths: Sequence[int], causal: bool) -> int:
    """Pairs of packed self-attention where a token sees its own document (and, causal, j <= i)."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def visible_pairs_blocks(table: Sequence[Sequence[bool]], block_q: int, block_k: int, sq: int, sk: int) -> int:
    """Pairs inside the True blocks of a block table (edge blocks cropped to sq x sk)."""
    rows = [min(block_q, sq - r * block_q) for r in range(len(table))]
    total = 0
    for r, row in enumerate(table):
        cols = sum(min(block_k, sk - c * block_k) for c, full in enumerate(row) if full)
        total += rows[r] * cols
    return total


def doc_lengths(total: int, count: int, seed: int, min_len: int = 1) -> list[int]:
    """``count`` seeded random lengths >= ``min_len`` summing to ``total`` (packed documents).

    Each document gets ``min_len`` tokens plus its share of the rest, cut at ``count - 1`` uniform
    random points: a spread of long and short documents, most not multiples of a block size.
    """
    if count < 1 or count * min_len > total:
        raise ValueError(f"cannot split {total} tokens into {count} documents of >= {min_len}")
    rng = random.Random(seed)
    extra = total - count * min_len
    cuts = sorted(rng.randint(0, extra) for _ in range(count - 1))
    bounds = [0, *cuts, extra]
    return [min_len + bounds[i + 1] - bounds[i] for i in range(count)]


def random_block_table(nq: int, nk: int, density: float, seed: int) -> tuple[tuple[bool, ...], ...]:
    """A seeded random block table with round(density * nq * nk) True blocks.

    The diagonal blocks (query block r, key block r * nk // nq) are always kept, so no query row is
    fully masked (implementations differ on what such rows return); the rest are drawn uniformly.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rng = random.Random(seed)
    diag = {(r, r * nk // nq) for r in range(nq)}
    target = max(round(density * nq * nk), len(diag))
    others = [(r, c) for r in range(nq) for c in range(nk) if (r, c) not in diag]
    chosen = diag | set(rng.sample(others, target - len(diag)))
    return tuple(tuple((r, c) in chosen for c in range(nk)) for r in range(nq))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def visible_pairs(shape: Mapping[str, Any]) -> int:
    """Exact count of visible (query, key) pairs per (batch, head) of an attention case's mask.

    Plain causal counts Sq * (Sq + 1) / 2 here; :func:`attention_flops` uses the convention Sq^2 / 2
    (the two differ by 1 / (2 Sq)), which is why only mask variants use this count for FLOPs.
    """
    sq, sk = int(shape["Sq"]), int(shape["Sk"])
    variant = shape.get("variant")
    causal = bool(shape.get("causal", False))
    if variant == "window":
        return visible_pairs_window(sq, sk, int(shape["window_left"]), 0 if causal else int(shape["window_right"]))
    if variant == "varlen" or (variant == "block_sparse" and shape.get("mask") == "document"):
        return visible_pairs_documents(variant_doc_lengths(shape), causal)
    if variant == "block_sparse":
        table = variant_block_table(shape)
        if causal:
            raise ValueError("random block masks are non-causal in this suite")
        return visible_pairs_blocks(table, int(shape["block"]), int(shape["block"]), sq, sk)
    return visible_pairs_window(sq, sk, -1, 0 if causal else -1)


def variant_doc_lengths(shape: Mapping[str, Any]) -> list[int]:
    """The document / sequence lengths of a varlen or document-mask case (seeded)."""
    return doc_lengths(int(shape["Sq"]), int(shape["docs"]), int(shape["seed"]), int(shape["min_len"]))


def variant_block_table(shape: Mapping[str, Any]) -> tuple[tuple[bool, ...], ...]:
    """The block table of a random block-sparse case (seeded)."""
    bs = int(shape["block"])
    return random_block_table(_cdiv(int(shape["Sq"]), bs), _cdiv(int(shape["Sk"]), bs), float(shape["density"]),
                              int(shape["seed"]))


def masked_attention_flops(b: int, h: int, pairs: int, d: int, mode: str) -> float:
    """FLOPs of attention that skips masked work: 4 * B * H * D per visible (i, j) pair (x 3.5 fwd_bwd)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flops = 4.0 * b * h * pairs * d
    return flops * FWD_BWD_FACTOR if mode == "fwd_bwd" else flops


# Variants whose mask differs from the plain dense / causal one: their FLOPs use the exact count.
MASK_VARIANTS = ("window", "varlen", "block_sparse")
VARIANTS = ("window", "softcap", "alibi", "gqa", "varlen", "block_sparse")
VARIANT_REFERENCES = ("torch_ref", "flex")
# SDPA EFFICIENT with an explicit [1, H, S, S] bias (ALiBi): skipped above this many bias bytes.
SDPA_BIAS_LIMIT_BYTES = 16e9


@dataclass(frozen=True)
class VariantSizes:
    """Sizes of the variants suite (tests shrink them; the issue's values are the defaults)."""

    d: int = 128
    heads: int = 16
    window_s: int = 16384  # window: B=1, H=16, S=16384
    window: int = 1024
    s: int = 8192  # softcap, ALiBi, GQA, block-sparse
    softcap_b: int = 2  # softcap and ALiBi: B=2 (16k tokens)
    softcap: float = 30.0
    dropout_p: float = 0.1
    gqa_hq: int = 32
    gqa_hkv: int = 8
    varlen_tokens: int = 16384
    varlen_seqs: int = 16
    min_len: int = 64
    block: int = 128
    densities: tuple[float, ...] = (0.5, 0.25, 0.1)
    docs: int = 8
    seed: int = 0
    dtype: str = "bfloat16"


def _pct(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def _variant_case(
    variant: str,
    setting: str,
    *,
    b: int,
    h: int,
    hkv: int,
    s: int,
    d: int,
    causal: bool,
    mode: str,
    providers: Sequence[str],
    references: Sequence[str] = VARIANT_REFERENCES,
    skip: Mapping[str, str] | None = None,
    dtype: str = "bfloat16",
    **params: Any,
) -> Case:
    """A variants-suite case: flashtile, flashtile_dense (same B, H, S, D, causal, no variant) and peers.

    ``params`` (window_left, softcap, density, seed, ...) go into the shape, so they are part of the
    case's key and everything a provider needs to rebuild the variant on the device.
    """
    shape: dict[str, Any] = {"B": b, "H": h, "Hkv": hkv, "Sq": s, "Sk": s, "D": d, "causal": causal,
                             "variant": variant, **params}
    pairs = visible_pairs(shape)
    if variant in MASK_VARIANTS:
        flops = masked_attention_flops(b, h, pairs, d, mode)
        visible = pairs / (s * s)
    else:  # same mask as dense: the dense convention, so "vs flashtile dense" is the time ratio
        flops = attention_flops(b, h, s, s, d, causal, mode)
        visible = 0.5 if causal else 1.0
    return Case(
        suite="variants",
        kind="attention",
        mode=mode,
        dtype=dtype,
        shape=shape,
        labels={"variant": variant, "setting": setting, "causal": causal, "B": b, "H": h, "S": s,
                "visible": _pct(visible)},
        flops=flops,
        providers=tuple(providers),
        references=tuple(references),
        skip=dict(skip or {}),
        provider_flops={"flashtile_dense": attention_flops(b, h, s, s, d, causal, mode)},
    )


_NO_SDPA = {
    "window": "SDPA has no sliding-window argument (FlexAttention runs the same mask)",
    "softcap": "SDPA has no softcap (FlexAttention's score_mod does it)",
    "varlen": "SDPA FLASH run per sequence is not a fair peer (one launch per sequence)",
    "block_sparse": "SDPA has no block-sparse mask (FlexAttention's BlockMask does it)",
}


def variants_suite(quick: bool = False, sizes: VariantSizes | None = None) -> list[Case]:
    """Attention variants, each against flashtile's own dense time on the same shape, bf16, D=128.

    window (1024, 0) causal and (1024, 1024) at B=1, H=16, S=16384; softcap 30 and ALiBi at B=2,
    H=16, S=8192 (causal and not); dropout p=0.1 at the same shapes; GQA Hq=32 / Hkv=8 causal at
    B=1, S=8192; varlen: 16 seeded sequences packed into 16384 tokens, causal; block-sparse at B=1,
    H=16, S=8192: random 128x128 block tables at 50% / 25% / 10% density and an 8-document causal mask. Every case in fwd and
    fwd_bwd: 28 cases (quick: one per variant, 14).
    """
    z = sizes or VariantSizes()
    d, h = z.d, z.heads
    base = ("flashtile", "flashtile_dense")

    def variant_case(*args: Any, **kwargs: Any) -> Case:
        return _variant_case(*args, dtype=z.dtype, **kwargs)

    sdpa_skip = lambda v: {"sdpa_flash": _NO_SDPA[v]}  # noqa: E731
    cases: list[Case] = []
    for mode in MODES:
        # window
        for causal, right in ((True, 0), (False, z.window)):
            if quick and not causal:
                continue
            cases.append(variant_case("window", f"({z.window}, {right})", b=1, h=h, hkv=h, s=z.window_s, d=d,
                                      causal=causal, mode=mode, providers=base + ("sdpa_flash", "flex"),
                                      skip=sdpa_skip("window"), window_left=z.window, window_right=right))
        # softcap and ALiBi
        for causal in (False, True):
            if quick and not causal:
                continue
            cases.append(variant_case("softcap", f"{z.softcap:g}", b=z.softcap_b, h=h, hkv=h, s=z.s, d=d,
                                      causal=causal, mode=mode, providers=base + ("sdpa_flash", "flex"),
                                      skip=sdpa_skip("softcap"), softcap=z.softcap))
            bias_bytes = 2.0 * h * z.s * z.s
            skip = {}
            if bias_bytes > SDPA_BIAS_LIMIT_BYTES:
                skip["sdpa_efficient"] = f"explicit bias needs {bias_bytes / 1e9:.1f} GB > {SDPA_BIAS_LIMIT_BYTES / 1e9:.0f} GB"
            cases.append(variant_case("alibi", "2^(-8(h+1)/H)", b=z.softcap_b, h=h, hkv=h, s=z.s, d=d,
                                      causal=causal, mode=mode, providers=base + ("sdpa_efficient", "flex"),
                                      skip=skip, alibi="2^(-8(h+1)/H)"))
        # dropout: random output, so no reference cell (tests/test_dropout.py checks it exactly)
        for causal in (False, True):
            if quick and not causal:
                continue
            cases.append(variant_case("dropout", f"p={z.dropout_p:g}", b=z.softcap_b, h=h, hkv=h, s=z.s, d=d,
                                      causal=causal, mode=mode, providers=base + ("sdpa_flash",), references=(),
                                      dropout_p=z.dropout_p))
        # GQA
        cases.append(variant_case("gqa", f"Hkv={z.gqa_hkv}", b=1, h=z.gqa_hq, hkv=z.gqa_hkv, s=z.s, d=d,
                                  causal=True, mode=mode, providers=base + ("sdpa_flash", "sdpa_cudnn", "flex"),
                                  references=("torch_ref", "sdpa_flash", "sdpa_cudnn", "flex")))
        # varlen
        cases.append(variant_case("varlen", f"{z.varlen_seqs} seqs", b=1, h=h, hkv=h, s=z.varlen_tokens, d=d,
                                  causal=True, mode=mode, providers=base + ("sdpa_flash", "flex"),
                                  skip=sdpa_skip("varlen"), docs=z.varlen_seqs, seed=z.seed, min_len=z.min_len))
        # block-sparse
        for density in z.densities:
            if quick and density != 0.25:
                continue
            cases.append(variant_case("block_sparse", f"random {100 * density:g}%", b=1, h=h, hkv=h, s=z.s, d=d,
                                      causal=False, mode=mode, providers=base + ("sdpa_flash", "flex"),
                                      skip=sdpa_skip("block_sparse"), mask="random", density=density,
                                      block=z.block, seed=z.seed))
        if not quick:
            cases.append(variant_case("block_sparse", f"document x{z.docs}", b=1, h=h, hkv=h, s=z.s, d=d,
                                      causal=True, mode=mode, providers=base + ("sdpa_flash", "flex"),
                                      skip=sdpa_skip("block_sparse"), mask="document", docs=z.docs,
                                      block=z.block, seed=z.seed, min_len=z.min_len))
    return cases


VARIANTS_NOTES = (
    "- variants: the FLOPs of window, varlen and block_sparse count only visible (i, j) pairs: "
    "4*B*H*D x pairs (column `visible` = pairs / S^2, counted exactly from the mask rule); softcap, "
    "ALiBi and GQA do the dense (or causal) work and use the formula above",
    "- flashtile_dense: flashtile on the same B, H, S, D and causal flag without the variant (no "
    "window / softcap / ALiBi / block mask; varlen as one packed sequence; GQA with K/V expanded to H "
    "heads), timed in the same run, its TFLOP/s from the dense formula; `vs flashtile dense` = "
    "flashtile TFLOP/s / flashtile_dense TFLOP/s, `time / dense` = flashtile time / flashtile_dense time",
    "- dropout: the output is random, so its cells are unchecked (no reference); tests/test_dropout.py "
    "checks flashtile's dropout exactly against its returned keep pattern",
    "- validation: every provider against torch_ref (float32, one head at a time, the same score_mod / "
    "mask_mod as FlexAttention's); flashtile_dense against torch_ref of the dense problem",
    "- masks: random block tables keep every diagonal block (no fully masked rows), the rest drawn "
    "with a seed; document and varlen lengths are seeded random cuts (>= 64 tokens each)",
)

VARIANTS_TARGETS = (
    {
        "text": "block-sparse, random 25% density: flashtile time <= 0.35x flashtile dense",
        "match": {"variant": "block_sparse", "setting": "random 25%"},
        "metric": "time_vs_dense",
        "max": 0.35,
    },
)

SUITES: dict[str, Suite] = {
    "standard": Suite(
        name="standard",
        description="FlashAttention's suite: 16k tokens (B = 16384/S), hidden 2048 (H = 2048/D), bf16",
        build=standard_suite,
        x="S",
        group=("D", "causal"),
        ratio_peers=("sdpa_flash", "sdpa_cudnn", "flex"),
    ),
    "headdims": Suite(
        name="headdims",
        description="Head dims between powers of two (80, 96, 160, 192): 16k tokens (B = 16384/S), "
        "hidden ~2048 (H = 2048 // D), bf16",
        build=head_dim_suite,
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
    "wide_mla": Suite(
        name="wide_mla",
        description="Dqk != Dv (MLA): 192/128 and 576/512, B=1, H=48, S=8192, bf16",
        build=wide_mla_suite,
        x="Dqk",
        group=("causal",),
        ratio_peers=("sdpa_efficient", "sdpa_cudnn"),
        plot="bars",
    ),
    "variants": Suite(
        name="variants",
        description="Attention variants vs flashtile dense on the same shape: sliding window, softcap, "
        "ALiBi, dropout, GQA, varlen, block-sparse; bf16, D=128",
        build=variants_suite,
        x="setting",
        group=("variant", "causal"),
        ratio_peers=("flex",),
        baseline="flashtile_dense",
        baseline_label="flashtile dense",
        notes=VARIANTS_NOTES,
        plot="bars",
        targets=VARIANTS_TARGETS,
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
    variants: Sequence[str] | None = None,
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
        if variants is not None and "variant" in shape and shape["variant"] not in variants:
            continue
        if providers is not None:
            kept = tuple(p for p in case.providers if p in providers)
            if not kept:
                continue
            case = replace(case, providers=kept, skip={p: r for p, r in case.skip.items() if p in kept})
        out.append(case)
    return out


# GEMM suites (issue 5) live in gemm_suite.py; imported last because they build on Case and Suite.
from .gemm_suite import GEMM_SUITES  # noqa: E402

SUITES.update(GEMM_SUITES)
