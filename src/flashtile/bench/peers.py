"""Providers: flashtile and the implementations it is measured against.

Every provider turns a case and the case's seeded input values into a :class:`Prepared`: its own
copies of the inputs in the layout it wants, a callable to time, and a way to produce its outputs
(and gradients) in one common layout for validation. Providers never share tensors, so one
provider's autograd state or in-place work cannot leak into another's numbers.

Heavy or optional imports (flashtile itself, FlexAttention, SDPA backends) happen inside the
builders: a provider that cannot load fails its own cells, never the whole run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping

import torch

from .suites import Case

Tensors = dict[str, torch.Tensor]
AttentionCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]


@dataclass
class Prepared:
    """One provider ready to run one case.

    Attributes:
        fn: the timed work (forward, or forward + backward).
        result: runs the work once and returns its outputs in the common layout
            (attention: "out", and for fwd_bwd "dq", "dk", "dv", all [B, S, H, D]).
        grad_to_none: leaf tensors whose .grad do_bench resets between repetitions.
        context: entered around validation, warm-up and timing (e.g. a forced SDPA backend);
            entering it once keeps its Python cost out of the timed region.
        reference: for a provider that computes another problem than the case (the variants
            suite's flashtile_dense), the outputs of a trusted implementation of *that* problem;
            the runner validates against it instead of the case's reference.
        reference_name: what the report calls that reference.
    """

    fn: Callable[[], Any]
    result: Callable[[], Tensors]
    grad_to_none: list[torch.Tensor] | None = None
    context: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    reference: Callable[[], Tensors] | None = None
    reference_name: str | None = None


@dataclass(frozen=True)
class Provider:
    """A named implementation for one case kind."""

    name: str
    kind: str
    description: str
    build: Callable[[Case, Mapping[str, torch.Tensor]], Prepared]


# ----------------------------------------------------------------------------------------------
# Inputs


def attention_inputs(case: Case, device: torch.device, seed: int = 0) -> Tensors:
    """Seeded standard-normal q, k, v (and dout for fwd_bwd) in flash layout [B, S, H, D].

    Random values, never zeros or constants: a kernel that ignores part of its input must not be
    able to produce the right answer by accident.
    """
    s = case.shape
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device, dtype=dtype)

    tensors = {
        "q": randn(s["B"], s["Sq"], s["H"], s["D"]),
        "k": randn(s["B"], s["Sk"], s["Hkv"], s["D"]),
        "v": randn(s["B"], s["Sk"], s["Hkv"], s.get("Dv", s["D"])),
    }
    if case.mode == "fwd_bwd":
        tensors["dout"] = randn(s["B"], s["Sq"], s["H"], s.get("Dv", s["D"]))
    return tensors


INPUT_MAKERS: dict[str, Callable[[Case, torch.device, int], Tensors]] = {
    "attention": attention_inputs,
}


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Tensors:
    """The seeded input values of a case, shared (read-only) by all its providers."""
    try:
        maker = INPUT_MAKERS[case.kind]
    except KeyError:
        raise ValueError(f"no input maker for case kind {case.kind!r}") from None
    return maker(case, device, seed)


# ----------------------------------------------------------------------------------------------
# Attention providers


def _first(out: Any) -> torch.Tensor:
    """Some APIs return (out, lse, ...); the benchmark only needs out."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _attention(
    case: Case,
    inputs: Mapping[str, torch.Tensor],
    *,
    layout: str,
    call: AttentionCall,
    context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
) -> Prepared:
    """Build a Prepared for an attention call taking q, k, v in ``layout`` ("bshd" or "bhsd")."""
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be bshd or bhsd, got {layout!r}")
    grad = case.mode == "fwd_bwd"

    def own(x: torch.Tensor) -> torch.Tensor:
        # A contiguous private copy: the layout each API is fastest with, no sharing.
        y = x.transpose(1, 2) if layout == "bhsd" else x
        return y.clone(memory_format=torch.contiguous_format).requires_grad_(grad)

    def common(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2) if layout == "bhsd" else x

    q, k, v = own(inputs["q"]), own(inputs["k"]), own(inputs["v"])
    leaves = [q, k, v]
    dout = own(inputs["dout"]).detach() if grad else None

    if grad:

        def fn() -> None:
            _first(call(q, k, v)).backward(dout)

    else:

        def fn() -> torch.Tensor:
            return _first(call(q, k, v))

    def result() -> Tensors:
        for t in leaves:
            t.grad = None
        out = _first(call(q, k, v))
        res = {"out": common(out.detach())}
        if grad:
            out.backward(dout)
            res.update(dq=common(q.grad), dk=common(k.grad), dv=common(v.grad))
            for t in leaves:
                t.grad = None
        return res

    return Prepared(fn=fn, result=result, grad_to_none=leaves if grad else None, context=context)


def _causal(case: Case) -> bool:
    return bool(case.shape.get("causal", False))


def _build_flashtile(case: Case, inputs: Mapping[str, torch.Tensor]) -> Prepared:
    import flashtile
    from flashtile.dispatch import use_backend

    from . import variants

    shape = case.shape
    device = inputs["q"].device
    # Masks, slopes and offsets are built here, once, outside the timed region.
    kwargs = variants.flashtile_kwargs(shape, device)

    if variants.variant_of(shape) == "varlen":
        if shape["B"] != 1:
            raise variants.VariantError("varlen cases pack their sequences into B = 1")
        cu_seqlens, max_len = variants.varlen_offsets(shape, device)

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
            # squeeze, not q[0]: the gradient of a squeeze is a view, while indexing's backward writes
            # each gradient into a zero-filled [1, S, H, D] copy (a fill and a copy per tensor, about 8%
            # of the step), work that a training loop over packed tensors never does
            out = flashtile.flash_attn_varlen_func(q.squeeze(0), k.squeeze(0), v.squeeze(0), cu_seqlens,
                                                   cu_seqlens, max_len, max_len, **kwargs)
            return out.unsqueeze(0)

    else:

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
            return flashtile.flash_attn_func(q, k, v, **kwargs)

    # Force the Triton kernels: a stray FLASHTILE_BACKEND=reference must not be benchmarked.
    return _attention(case, inputs, layout="bshd", call=call, context=lambda: use_backend("triton"))


def dense_shape(case: Case) -> dict[str, Any]:
    """The problem flashtile_dense solves: the case's B, H, S, D and causal flag, no variant, Hkv = H."""
    s = case.shape
    return {"B": s["B"], "H": s["H"], "Hkv": s["H"], "Sq": s["Sq"], "Sk": s["Sk"], "D": s["D"],
            "causal": bool(s.get("causal", False))}


def _build_flashtile_dense(case: Case, inputs: Mapping[str, torch.Tensor]) -> Prepared:
    """flashtile without the case's variant, on the same shape: the denominator of "vs flashtile dense"."""
    import flashtile
    from flashtile.dispatch import use_backend

    from . import variants

    dense = dense_shape(case)
    causal = dense["causal"]
    own = dict(inputs)
    group = dense["H"] // case.shape["Hkv"]
    if group != 1:  # GQA's dense counterpart is MHA: every query head gets its own K/V head
        own["k"] = inputs["k"].repeat_interleave(group, dim=2)
        own["v"] = inputs["v"].repeat_interleave(group, dim=2)

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        return flashtile.flash_attn_func(q, k, v, causal=causal)

    prepared = _attention(case, own, layout="bshd", call=call, context=lambda: use_backend("triton"))
    score_mod, mask_mod = variants.mods(dense, own["q"].device)

    def reference() -> Tensors:
        return variants.dense_reference(own["q"], own["k"], own["v"], own.get("dout"),
                                        score_mod=score_mod, mask_mod=mask_mod)

    prepared.reference = reference
    prepared.reference_name = "torch_ref (dense)"
    return prepared


def _build_torch_ref(case: Case, inputs: Mapping[str, torch.Tensor]) -> Prepared:
    """The float32 reference of a case: every (batch, head) by the book, with Flex's mods densely."""
    from . import variants

    score_mod, mask_mod = variants.mods(case.shape, inputs["q"].device)

    def result() -> Tensors:
        return variants.dense_reference(inputs["q"], inputs["k"], inputs["v"], inputs.get("dout"),
                                        score_mod=score_mod, mask_mod=mask_mod)

    return Prepared(fn=result, result=result)


def _sdpa_builder(backend: str) -> Callable[[Case, Mapping[str, torch.Tensor]], Prepared]:
    """An SDPA provider with exactly one backend allowed, so torch cannot silently pick another."""

    def build(case: Case, inputs: Mapping[str, torch.Tensor]) -> Prepared:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from . import variants

        chosen = getattr(SDPBackend, backend)
        s = case.shape
        causal = _causal(case)
        # Variant tensors (ALiBi's explicit bias) are built here, outside the timed region.
        kwargs: dict[str, Any] = variants.sdpa_kwargs(s, inputs["q"].device, inputs["q"].dtype)
        if s["Hkv"] != s["H"]:
            kwargs["enable_gqa"] = True
        # An explicit bias already hides what causal hides (SDPA takes one or the other).
        if "attn_mask" not in kwargs:
            if causal and s["Sq"] != s["Sk"]:
                # SDPA's is_causal is top-left aligned; flashtile (like FlashAttention) is bottom-right.
                from torch.nn.attention.bias import causal_lower_right

                kwargs["attn_mask"] = causal_lower_right(s["Sq"], s["Sk"])
            else:
                kwargs["is_causal"] = causal

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

        return _attention(case, inputs, layout="bhsd", call=call, context=lambda: sdpa_kernel(chosen))

    return build


def _raise_dynamo_limits() -> None:
    """Let one process compile many shapes: past the limit dynamo silently runs eager code."""
    import torch._dynamo.config as cfg

    for name, value in (
        ("cache_size_limit", 1024),
        ("recompile_limit", 1024),
        ("accumulated_cache_size_limit", 8192),
        ("accumulated_recompile_limit", 8192),
    ):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), value))


def _build_flex(case: Case, inputs: Mapping[str, torch.Tensor]) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from . import variants

    s = case.shape
    device = inputs["q"].device
    if variants.variant_of(s) == "varlen" and s["B"] != 1:
        raise variants.VariantError("varlen cases pack their sequences into B = 1")
    # A fresh compile per shape: FlexAttention's kernel is specialised on it, and a stale cache
    # (or hitting the recompile limit) would fall back to the unfused eager path.
    torch._dynamo.reset()
    _raise_dynamo_limits()
    # fullgraph=True turns any graph break into an error instead of a slow eager fallback.
    compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)

    # Causal (bottom-right, as in flashtile) and every variant's mask / score rule; varlen runs as
    # a document mask over the packed tokens. The block mask is built here, once per case.
    score_mod, mask_mod = variants.mods(s, device)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=s["Sq"], KV_LEN=s["Sk"], device=device,
                                       BLOCK_SIZE=variants.flex_block_size(s))
    kwargs: dict[str, Any] = {"block_mask": block_mask}
    if score_mod is not None:
        kwargs["score_mod"] = score_mod
    if s["Hkv"] != s["H"]:
        kwargs["enable_gqa"] = True

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q, k, v, **kwargs)

    return _attention(case, inputs, layout="bhsd", call=call)


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("flashtile", "attention", "flashtile.flash_attn_func (Triton)", _build_flashtile),
        Provider("sdpa_flash", "attention", "torch SDPA, FLASH_ATTENTION (FlashAttention-2)", _sdpa_builder("FLASH_ATTENTION")),
        Provider("sdpa_cudnn", "attention", "torch SDPA, CUDNN_ATTENTION", _sdpa_builder("CUDNN_ATTENTION")),
        Provider("sdpa_efficient", "attention", "torch SDPA, EFFICIENT_ATTENTION (xformers-style)", _sdpa_builder("EFFICIENT_ATTENTION")),
        Provider("sdpa_math", "attention", "torch SDPA, MATH (materialises S x S)", _sdpa_builder("MATH")),
        Provider("flex", "attention", "torch.compile(flex_attention), block mask for causal / masks, score_mod for softcap / ALiBi", _build_flex),
        Provider("flashtile_dense", "attention", "flashtile on the same shape without the variant (variants suite baseline)", _build_flashtile_dense),
        Provider("torch_ref", "attention", "float32 attention by the book, one head at a time (reference only)", _build_torch_ref),
    )
}


def get_provider(name: str) -> Provider:
    """Look a provider up by name, with the known names in the error."""
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}") from None


# GEMM providers and inputs (issue 5), defined with their suites in gemm_suite.py.
from .gemm_suite import gemm_inputs, gemm_providers  # noqa: E402

PROVIDERS.update({p.name: p for p in gemm_providers()})
INPUT_MAKERS["gemm"] = gemm_inputs
