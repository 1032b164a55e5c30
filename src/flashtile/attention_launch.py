"""Launchers for the Triton attention kernels: size the grid, pick the config, allocate, launch.

Inputs arrive in flash layout with any strides whose last dim is contiguous (api.py guarantees it):
q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]; or packed (varlen) q [total_q, Hq, D],
k/v [total_k, Hkv, D|Dv] with int32 cu_seqlens [B+1]. Outputs are allocated contiguous; lse is
[B, Hq, Sq] dense or [Hq, total_q] packed (FlashAttention-2's layouts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Hashable, Optional, Tuple

import torch
import triton

from flashtile import dropout
from flashtile.dispatch import triton_interpreting, wide_forward_heads, wide_heads
from flashtile.errors import UnsupportedError
from flashtile.key_layout import keys_in_range
from flashtile.kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from flashtile.kernels import attention_fwd as fwd_kernel
from flashtile.kernels import common as kernel_common
from flashtile.kernels.attention_fwd import attention_fwd_kernel
from flashtile.launch_cache import MAX_PLANS, KernelPlan, PlanCache, specialization_key
from flashtile.launch_fit import launch_fitting
from flashtile.launch_recipe import MISSING, RecipeCache, aliases, capture
from flashtile.row_align import aligned_rows, narrowed
from flashtile.tuning import (LONG_CAUSAL_KEYS, LONG_FORWARD_KEYS, MEDIUM_CAUSAL_KEYS, MEDIUM_WINDOW,
                              SHORT_CAUSAL_KEYS, SHORT_WINDOW, BackwardConfig, KernelConfig, backward_config,
                              forward_config, head_dim_chunks, padded_columns, tile_width)


def _empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it with NaN to prove full coverage)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _softcap_flag(softcap: float, dtype: torch.dtype) -> int:
    """SOFTCAP of the kernels: 0 off; 2 the hardware tanh.approx for bf16 on a GPU (its error, about
    2^-11 relative, is 8x below bf16's rounding; softcap's three special-function ops per score
    outran the tensor cores); 1 the exp2 form otherwise (fp16 / fp32 need its accuracy; the
    interpreter cannot run inline PTX)."""
    if softcap <= 0:
        return 0
    return 2 if dtype == torch.bfloat16 and not triton_interpreting() else 1


def _dropout_flag(dropout_p: float) -> int:
    """DROPOUT of the forward kernel: 0 off; 2 on a GPU, where the kept P goes through an opaque
    register move (common.fp32_fence) so it is selected in fp32 before its bf16 / fp16 copy; 1 in the
    interpreter, which cannot run inline PTX."""
    if dropout_p <= 0:
        return 0
    return 1 if triton_interpreting() else 2


LOG2E = 1.4426950408889634
# softcap * log2(e) up to this: the forward may take the scores' bound as its softmax max (fixed_max)
FIXED_MAX_LOG2 = 60.0


def fixed_max(softcap: float, dtype: torch.dtype, has_alibi: bool, attn_mask_kind: int) -> bool:
    """FIXED_MAX of the forward kernel: softcap bounds every log2-domain score s by c = softcap * log2(e),
    so exp2(s - c) can stand in for the online softmax's exp2(s - running max), with no max to track
    and no accumulator to rescale. Only where nothing else adds to the score (ALiBi, an additive
    attn_mask) and where p >= 2^(-2c) stays a normal number in P's dtype: c <= FIXED_MAX_LOG2 = 60
    keeps p >= 2^-120 for fp32 and bf16 (2^-126); fp16's P would underflow below 2^-24."""
    return (0 < softcap * LOG2E <= FIXED_MAX_LOG2 and dtype in (torch.bfloat16, torch.float32)
            and not has_alibi and attn_mask_kind != 2)


# The forward kernel's MAX_MODE values, as the kernel defines them
MAX_RUNNING, MAX_FIXED, MAX_LAZY, MAX_RAW = (int(m.value) for m in (fwd_kernel.MAX_RUNNING, fwd_kernel.MAX_FIXED,
                                                                     fwd_kernel.MAX_LAZY, fwd_kernel.MAX_RAW))
ALIBI_DISTANCE, ALIBI_KEY_TERM, ALIBI_BOTH_TERMS, ALIBI_TERM_DISTANCE = (
    int(m.value) for m in (kernel_common.ALIBI_DISTANCE, kernel_common.ALIBI_KEY_TERM, kernel_common.ALIBI_BOTH_TERMS,
                           kernel_common.ALIBI_TERM_DISTANCE))
# accumulators at least this wide (Dv's register tiles, tuning.tile_width) rescale lazily
LAZY_RESCALE_MIN_WIDTH = 384


def raw_max_scale(softmax_scale: float) -> bool:
    """Whether a scale lets the forward take its row max before scaling (MAX_RAW): finite and positive,
    so max(q.k) * scale is max(q.k * scale). The launch-recipe key holds this too (_call_key)."""
    return 0 < softmax_scale < math.inf


def max_mode(softcap: float, dtype: torch.dtype, has_alibi: bool, attn_mask_kind: int, head_dim_v: int,
             has_left: bool = False, softmax_scale: float = 1.0) -> int:
    """The forward kernel's MAX_MODE: MAX_FIXED where fixed_max holds; MAX_LAZY where the [128, Dv]
    fp32 accumulator is at least LAZY_RESCALE_MIN_WIDTH columns (Dv = 321..384, 16-bit: wider heads
    run the split-D kernels) and no window's left edge bounds the walk; else FlashAttention-2's
    running max: MAX_RAW where the score is q.k times a positive scale (no softcap, ALiBi or additive
    attn_mask), whose max is taken before the scale (one multiply a row, not a score), else
    MAX_RUNNING.

    The lazy rescale skips multiplying the accumulator by each tile's alpha until some row's max grows
    by more than 2^8, at the price of a program-wide reduction and barrier per key tile. H200, bf16,
    B=1, H=48, S=8192, forward TFLOP/s, every tile -> lazy: D=384 361 -> 396, causal 380 -> 410,
    dropout 317 -> 350, causal ALiBi 367 -> 395, causal GQA (8 kv heads) 376 -> 410, fp16 softcap 319
    -> 348, but window (1024, 0) 335 -> 322; D=320 455-458 -> 442-469 (+2% non-causal, -3% causal);
    D=256 (B=2, H=8) +0.7%; D=128 -10 to -15%, D=64 -34%, where the accumulator is narrow and the
    barrier costs more than the multiplies it saves."""
    if fixed_max(softcap, dtype, has_alibi, attn_mask_kind):
        return MAX_FIXED
    if tile_width(head_dim_v) >= LAZY_RESCALE_MIN_WIDTH and not has_left:
        return MAX_LAZY
    plain_score = softcap <= 0 and not has_alibi and attn_mask_kind != 2
    return MAX_RAW if plain_score and raw_max_scale(softmax_scale) else MAX_RUNNING


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are fp32-exact unless torch allows tf32 for matmuls (design.md)."""
    if dtype == torch.float32 and not triton_interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _alibi_args(alibi_slopes: Optional[torch.Tensor], dummy: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Slopes pointer and batch stride ([Hq] broadcasts over batch with stride 0)."""
    if alibi_slopes is None:
        return dummy, 0
    slopes = alibi_slopes.to(torch.float32).contiguous()
    return slopes, (slopes.stride(0) if slopes.dim() == 2 else 0)


def _alibi_flag(alibi_slopes: Optional[torch.Tensor], has_right: bool, right: int, head_dim: int,
                kernel: str) -> int:
    """HAS_ALIBI (kernels/common.py's ALIBI_* modes) of one kernel ("fwd", "dq" or "dkdv"): 0 without
    slopes; _alibi_one_sided's form where a right edge <= 0 (as causal) puts every visible key at or
    left of the diagonal; else _alibi_two_sided's."""
    if alibi_slopes is None:
        return 0
    if has_right and right <= 0:
        return _alibi_one_sided(head_dim, kernel != "fwd")
    return _alibi_two_sided(head_dim, kernel)


def _alibi_two_sided(head_dim: int, kernel: str) -> int:
    """The two-sided ALiBi form per kernel (H200, bf16, ALiBi without a causal edge, kernel us with
    |distance| -> |key term - query term|): non-causal S=8192 D=128 forward 2401 -> 2335, dQ 2641 ->
    2581, dK/dV 3940 -> 4815; window (1024, 1024) at S=16384 forward 753 -> 668, dQ 813 -> 748, dK/dV
    1402 -> 1378; D=64 (H=32) dQ 2888 -> 2746, dK/dV 4999 -> 4846. The 64x64 dK/dV tiles at D=128 lose
    (a register allocation at 255 with spills, as every dK/dV variant), and the D=64 forward would go
    from 116 to 200 registers, past two programs per SM: those keep |distance|."""
    if kernel == "dq":
        return ALIBI_TERM_DISTANCE
    if kernel == "fwd":
        return ALIBI_TERM_DISTANCE if head_dim > 64 else ALIBI_DISTANCE
    return ALIBI_TERM_DISTANCE if head_dim <= 64 else ALIBI_DISTANCE  # dK/dV


def _alibi_one_sided(head_dim: int, backward: bool) -> int:
    """The one-sided ALiBi form per direction (H200, bf16, causal, fwd / fwd+bwd A/B against the
    |distance| form): the forward adds both terms per score above D = 64 (S=8192 1.23 -> 1.21 ms, folding
    the query term into the max measured 1.26); at D = 64 the key-term vector lifts the 128x64 w8
    forward from 127 to 141 registers, past two programs per SM (1.54 -> 1.82 ms), so it keeps the
    |distance|. The backward folds the query term into lse above D = 64 (S=8192 backward -3%) and adds
    it per score at D <= 64 (folded: +2%; per score: -5%)."""
    if backward:
        return ALIBI_KEY_TERM if head_dim > 64 else ALIBI_BOTH_TERMS
    return ALIBI_BOTH_TERMS if head_dim > 64 else ALIBI_DISTANCE


def _mask_flags(left: Optional[int], right: Optional[int]) -> Tuple[bool, bool, int, int]:
    """Edges (spec.mask_edges; None = unbounded) -> (HAS_LEFT, HAS_RIGHT, left, right)."""
    return left is not None, right is not None, left or 0, right or 0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Batch / sequence geometry shared by every launch of one call."""

    batch: int
    seqlen_q: int  # the maximum over sequences when packed
    seqlen_k: int
    cu_seqlens_q: Optional[torch.Tensor] = None  # packed (varlen) when set
    cu_seqlens_k: Optional[torch.Tensor] = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def bsh(self, t: torch.Tensor) -> Tuple[int, int, int]:
        """(batch, sequence, head) strides; packed tensors have no batch dim (stride 0)."""
        s = t.stride()  # one call, not three: a short step asks for 16 of these (host time)
        return (0, s[0], s[1]) if self.varlen else s[:3]

    def lse_shape(self, heads: int, rows: int) -> Tuple[int, ...]:
        return (heads, rows) if self.varlen else (self.batch, heads, self.seqlen_q)

    def lse_bh(self, lse: torch.Tensor) -> Tuple[int, int]:
        """(batch, head) strides of lse / delta."""
        s = lse.stride()
        return (0, s[0]) if self.varlen else s[:2]

    def cu(self, dummy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return (self.cu_seqlens_q, self.cu_seqlens_k) if self.varlen else (dummy, dummy)


@dataclasses.dataclass(frozen=True)
class _Sparse:
    """Kernel arguments of a masks.BlockMask (or inert placeholders when there is none)."""

    kv_lists: Tuple[torch.Tensor, ...]  # full num, full idx, partial num, partial idx, partial tile (per query block)
    q_lists: Tuple[torch.Tensor, ...]  # the same per key block (the dK/dV pass)
    tiles: torch.Tensor  # element masks of the partial blocks: uint8 [P, bq, bk] tiles or int64 [2P, bq] intervals
    scalars: Tuple[int, int, int, int]  # row multipliers of b and h, query and key blocks per row
    block: Tuple[int, int]
    mask: Optional[object] = None  # the BlockMask under the kernels' rule

    @property
    def enabled(self) -> bool:
        return self.block != (0, 0)

    @property
    def flag(self) -> int:
        """The kernels' BLOCK_SPARSE: 0 no block mask, 1 full and partial block lists, 2 full lists only
        (no partial block, so the partial-list loops are not compiled in), 3 full and partial lists whose
        element masks are one key interval per row (BlockMask.partial_intervals)."""
        if not self.enabled:
            return 0
        if self.mask.element_mask is None:  # BlockMask keeps one only with a partial block
            return 2
        return 3 if self.mask.partial_intervals is not None else 1

    def order(self, dummy: torch.Tensor, by: str, batch: int, heads: int, heads_per_program: int, tile: int,
              seqlen: int) -> torch.Tensor:
        """The ProgramOrder argument: heaviest programs first (BlockMask.program_order), or a placeholder."""
        if not self.enabled:
            return dummy
        return self.mask.program_order(by, batch, heads, heads_per_program, tile, triton.cdiv(seqlen, tile))


def _partial_entries(bm) -> torch.Tensor:
    """What the kernels read for a mask's partial blocks: its row intervals where it has them (cheaper
    than the tiles: two numbers per row against a byte per element), else its uint8 tiles."""
    return bm.partial_tiles if bm.partial_intervals is None else bm.partial_intervals


def _q_entry_list(bm) -> torch.Tensor:
    """The dK/dV walk's entry of each listed partial block: with intervals the key-major copy's, whose
    entries are consecutive along a key-block column (BlockMask.partial_q_interval)."""
    return bm.partial_q_tile if bm.partial_intervals is None else bm.partial_q_interval


def _sparse_args(block_mask, dummy: torch.Tensor, left: Optional[int], right: Optional[int]) -> _Sparse:
    """Kernel arguments of a block mask; left / right: the causal / window rule the kernels also apply
    (partial blocks that the rule explains run as full or empty blocks: BlockMask.under_rule)."""
    if block_mask is None:
        return _Sparse((dummy,) * 5, (dummy,) * 5, dummy, (0, 0, 0, 0), (0, 0))
    bm = block_mask.under_rule(left, right)
    if any(x < 16 or x & (x - 1) for x in bm.block_size):  # kernel tiles must tile a block exactly
        raise UnsupportedError(f"block_mask.block_size {tuple(bm.block_size)}: the Triton kernels need powers of "
                               "two >= 16")
    Bm, Hm, nq, nk = bm.kind.shape
    return _Sparse((bm.full_kv_num, bm.full_kv_idx, bm.partial_kv_num, bm.partial_kv_idx, bm.partial_kv_tile),
                   (bm.full_q_num, bm.full_q_idx, bm.partial_q_num, bm.partial_q_idx, _q_entry_list(bm)), _partial_entries(bm),
                   (Hm if Bm > 1 else 0, 1 if Hm > 1 else 0, nq, nk), tuple(bm.block_size), bm)


def _attn_mask_args(attn_mask: Optional[torch.Tensor], shape: Tuple[int, int, int, int],
                    dummy: torch.Tensor) -> Tuple[int, torch.Tensor, Tuple[int, int, int, int]]:
    """(ATTN_MASK kind, pointer, strides) of torch SDPA's attn_mask broadcast to [B, Hq, Sq, Sk] (0 strides)."""
    if attn_mask is None:
        return 0, dummy, (0, 0, 0, 0)
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(*shape)
    if m.dtype == torch.bool:
        return 1, m.view(torch.uint8), tuple(m.stride())
    return 2, m, tuple(m.stride())


_SHRUNK: dict = {}  # (kernel, config, specialisation) -> the config that fitted this GPU


def _shrink(cfg: KernelConfig) -> Optional[KernelConfig]:
    """The next smaller config: fewer pipeline stages first, then narrower tiles (powers of two >= 16)."""
    if cfg.num_stages > 1:
        return dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 16:
        return dataclasses.replace(cfg, block_n=cfg.block_n // 2, num_stages=2)
    if cfg.block_m > 16:
        return dataclasses.replace(cfg, block_m=cfg.block_m // 2, num_stages=2)
    return None


def program_order(layout: _Layout, causal: bool, window: bool, group: int, block_sparse: bool) -> Tuple[bool, int]:
    """(TILE_MAJOR, HEAD_GROUP) of the kernels' launch order (kernels/common.py:program_tile).

    Head-major order starts each head's heaviest causal tile first, but the last head's heaviest one
    near the end of the grid, where it runs alone. Up to 8192 keys, causal MHA without a window and
    varlen therefore launch tile-major inside groups of 4 (batch, head) rows, whose tensors stay in L2
    (H200, B=2, H=16, S=8192, D=128 causal, per kernel: forward 1221 -> 1169 us, dQ 1401 -> 1341;
    varlen with 16 sequences: dK/dV 1026 -> 989, dQ 586 -> 573). Every head tile-major had measured
    2-6% slower for causal MHA at S <= 4096, and at 16384 keys (B=1, H=16) head-major beat groups of
    1, 2, 4 and 8 rows by 1.5-3% per step. Causal GQA stays tile-major over all rows (its dQ ran 3%
    slower in groups; the kv heads' K/V fit in L2). Windows keep head-major (their tiles are equally
    heavy; groups measured 1-6% slower); block-sparse programs follow their own ProgramOrder.
    """
    rows = 4 if layout.seqlen_k <= 8192 else 0
    if layout.varlen:
        return True, rows
    if block_sparse or not causal:
        return False, 0
    if group > 1:
        return True, 0
    return (False, 0) if window or not rows else (True, rows)


def _head_dim_flags(D: int, Dv: int) -> dict:
    """The kernels' head-dim constexprs: each head dim as one or two power-of-two column chunks
    (tuning.head_dim_chunks) and whether each chunk lies wholly inside the head dim."""
    flags = {}
    for name, dim in (("D", D), ("DV", Dv)):
        first, tail = head_dim_chunks(dim)
        flags.update({f"BLOCK_{name}": first, f"BLOCK_{name}2": tail, f"EVEN_{name}": first <= dim,
                      f"EVEN_{name}2": first + tail == dim or tail == 0})
    return flags


def _order_flags(order: Tuple[bool, int]) -> dict:
    return dict(TILE_MAJOR=order[0], HEAD_GROUP=order[1])


def _launch(kernel, cfg: KernelConfig, sparse_block: Tuple[int, int], grid_of, order_of, args,
            meta) -> Optional[Tuple[KernelPlan, tuple, Tuple[int, int]]]:
    """Launch with cfg; if this GPU lacks the shared memory or registers for it, retry smaller.

    grid_of(block_m, block_n) -> grid; order_of(block_m, block_n) -> the kernel's last run-time
    argument, ProgramOrder (both depend on the tiles that finally run).

    tuning.py's tables are measured on an H200; a GPU with less shared memory (consumer cards,
    older architectures) gets the largest config that fits instead of an OutOfResources error.

    Repeated calls (a training step relaunches the same shapes) go through a launch plan
    (launch_cache.py): Triton's binder costs 0.1-0.2 ms of host time per launch, and a short causal
    step (S = 512) launches three kernels in about 0.65 ms of GPU time.

    Returns the plan that ran, its runtime arguments and its (block_m, block_n) (launch_recipe.capture's
    input), or None where Triton made no plan (the interpreter).
    """
    key = (id(kernel), cfg, sparse_block, meta["BLOCK_D"], meta["BLOCK_DV"], meta["BLOCK_D2"], meta["BLOCK_DV2"],
           args[0].dtype, args[0].device)
    constexprs = tuple(meta.items())

    def attempt(c: KernelConfig, plan_only: bool = False) -> bool:
        block_m, block_n = _fit_tile(c.block_m, sparse_block[0]), _fit_tile(c.block_n, sparse_block[1])
        grid = grid_of(block_m, block_n)
        full = (*args, order_of(block_m, block_n))
        plan_key = (key, c, grid, constexprs, specialization_key(full))
        plans = _PLANS.get(kernel) or _PLANS.setdefault(kernel, PlanCache(kernel))
        plan = plans.get(plan_key)
        ran[:] = plans, plan_key, full, (block_m, block_n)
        if plan is not None:
            plan.launch(*full)
            return True
        if plan_only:
            return False
        plans.launch_and_plan(plan_key, grid, full, dict(meta, BLOCK_M=block_m, BLOCK_N=block_n,
                                                         num_warps=c.num_warps, num_stages=c.num_stages))
        return True

    ran: list = []
    fitted = _SHRUNK.get(key, cfg)
    if not attempt(fitted, plan_only=True):
        _SHRUNK[key] = launch_fitting(attempt, fitted, _shrink)
    plans, plan_key, full, tile = ran
    plan = plans.get(plan_key)
    return None if plan is None else (plan, full, tile)


_PLANS: dict = {}  # kernel -> its launch_cache.PlanCache


_RECIPES = RecipeCache()  # call signature -> launch_recipe launches (calls without attn_mask or config)
# the per-call scalars of a recipe, after its tensor roles (_FWD_ROLES / _BWD_ROLES tensors)
_SCALAR_NAMES = ("softmax_scale", "softcap", "seed_lo", "seed_hi")
# a block mask's roles, last among the tensors: its ten index lists (_mask_lists), partial_tiles, and the
# ProgramOrder of the query-tile and the key-tile launches
_MASK_ROLES = 13
_FWD_ROLES = 8 + _MASK_ROLES  # q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, mask roles
# dout, q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, delta, dq, dk, dv, mask roles
_BWD_ROLES = 13 + _MASK_ROLES
_NO_MASK = (None,) * _MASK_ROLES


def _recipe_layout(layout: Optional[_Layout]) -> Tuple[Tuple[torch.Tensor, ...], Optional[Tuple[int, int]]]:
    """(cu_seqlens tensors, max lengths) of a recipe's call: none for dense calls (shapes give both)."""
    if layout is None:
        return (), None
    return (layout.cu_seqlens_q, layout.cu_seqlens_k), (layout.seqlen_q, layout.seqlen_k)


_CALLS: Dict[Hashable, int] = {}  # backward recipe key -> calls seen (signature_calls)
_CONSTANT_SHAPES: set = set()  # (seqlen_q, seqlen_k) pairs compiled as constants so far
# a backward signature's second call may compile the length-constant dK/dV kernel (one-off shapes never
# do); that call also rebuilds the signature's recipe
CONSTANT_LENGTHS_FROM_CALL = 2
# at most this many length pairs get constant kernels: a loop whose lengths keep changing (dynamic
# padding) stops compiling new ones and runs the run-time-length kernel (torch.compile's "automatic
# dynamic" idea)
MAX_CONSTANT_SHAPES = 8


def signature_calls(recipe_key: Optional[Hashable], layout: Optional[_Layout]) -> int:
    """How many times this backward signature (recipe key) has been called, this call included; 0 for
    calls that never take constant lengths: packed calls (max_seqlen changes with every batch) and
    calls without a recipe key (attn_mask, an explicit config). From CONSTANT_LENGTHS_FROM_CALL on, the
    dK/dV kernel may take seqlen_q / seqlen_k as compile-time constants (SEQLEN_Q / SEQLEN_K in
    kernels/attention_bwd.py)."""
    if recipe_key is None or layout is not None:
        return 0
    if len(_CALLS) >= MAX_PLANS:
        _CALLS.clear()  # (a cleared key counts again: one more recipe rebuild, no wrong result)
    seen = _CALLS[recipe_key] = _CALLS.get(recipe_key, 0) + 1
    return seen


def constant_lengths(repeated: bool, cfg: BackwardConfig, seqlen_q: int, seqlen_k: int) -> bool:
    """Whether this call's dK/dV launch fixes the lengths at compile time: a repeated signature, a
    config measured faster with them (BackwardConfig.constant_lengths), and a length pair within the
    MAX_CONSTANT_SHAPES budget."""
    if not (repeated and cfg.constant_lengths):
        return False
    if (seqlen_q, seqlen_k) not in _CONSTANT_SHAPES:
        if len(_CONSTANT_SHAPES) >= MAX_CONSTANT_SHAPES:
            return False
        _CONSTANT_SHAPES.add((seqlen_q, seqlen_k))
    return True


def _mask_lists(bm) -> Tuple[torch.Tensor, ...]:
    """A block mask's index lists in the recipe roles' order (per query block, then per key block)."""
    return (bm.full_kv_num, bm.full_kv_idx, bm.partial_kv_num, bm.partial_kv_idx, bm.partial_kv_tile,
            bm.full_q_num, bm.full_q_idx, bm.partial_q_num, bm.partial_q_idx, _q_entry_list(bm))


def _recipe_mask(block_mask, left: Optional[int], right: Optional[int]):
    """(the mask under the kernels' rule, its index lists, what else of it a recipe's key needs), or
    (None, (), None) without one. The lists' shapes hold the block counts; the partial tiles' count is
    data (a replay passes the new mask's tiles), so the key holds their tile shape and layout only, plus
    the block size and whether there are element masks at all, i.e. partial blocks (the backward's tiles:
    tuning.py; the kernels' BLOCK_SPARSE: _Sparse.flag)."""
    if block_mask is None:
        return None, (), None
    bm = block_mask.under_rule(left, right)
    t = _partial_entries(bm)
    return bm, _mask_lists(bm), (bm.block_size, bm.element_mask is not None, t.shape[1:], t.stride(), t.dtype,
                                 t.data_ptr() % 16)


def _mask_roles(lists: Tuple[torch.Tensor, ...], tiles: torch.Tensor, order_q: Optional[torch.Tensor],
                order_k: Optional[torch.Tensor]) -> tuple:
    """A block mask's recipe roles in their order (_MASK_ROLES), for capture and for replay alike."""
    return (*lists, tiles, order_q, order_k)


def _mask_values(bm, lists: Tuple[torch.Tensor, ...], q: torch.Tensor, k: torch.Tensor, query_tile: Optional[int],
                 key_tile: Optional[int]) -> tuple:
    """A replay's mask roles: the lists, partial tiles and program orders of this call's mask, for the
    tiles that the recipe's launches ran (RecipeLaunch.tile); nothing without a mask."""
    if bm is None:
        return _NO_MASK
    B, Sq, Hq = q.shape[:3]
    Sk, Hkv = k.shape[1], k.shape[2]
    order_q = None if query_tile is None else bm.program_order("query", B, Hq, 1, query_tile,
                                                                triton.cdiv(Sq, query_tile))
    # a recipe's dK/dV launch sums the GQA group in registers (the expanded path makes no recipe)
    order_k = None if key_tile is None else bm.program_order("key", B, Hq, Hq // Hkv, key_tile,
                                                              triton.cdiv(Sk, key_tile))
    return _mask_roles(lists, _partial_entries(bm), order_q, order_k)


def _scalar_roles(first: int) -> dict:
    return {name: first + i for i, name in enumerate(_SCALAR_NAMES)}


def _call_key(tensors: Tuple[torch.Tensor, ...], left: Optional[int], right: Optional[int], softmax_scale: float,
              softcap: float, alibi_slopes: Optional[torch.Tensor], dropout_p: float,
              dropout_seed: Tuple[int, int], lengths: Optional[Tuple[int, int]] = None, mask_sig=None) -> tuple:
    """What the launcher's decisions read, for launch_recipe: every tensor's shape, strides, dtype and
    16-byte alignment (row_align, key_layout, the configs, Triton's specialisation), the device, the mask
    edges, which features are on (and whether a softcap lies within fixed_max's bound), dropout's p (its
    threshold and scale are fixed arguments), the scalars' types, the tf32 setting (fp32's dot
    precision), which tensors are one object (a recipe maps each by role: launch_recipe.capture), a
    packed call's max lengths and a block mask's _recipe_mask facts. A packed call's cu_seqlens and a block mask's lists are tensors like the others: their values
    are read by the kernels only."""
    if alibi_slopes is not None:
        tensors = (*tensors, alibi_slopes)
    # FIXED_MAX from fixed_max itself (recipes exist only without attn_mask), so the key follows its
    # rule; max_mode's other inputs: Dv is in the shapes below, and raw_max_scale (MAX_RAW)
    bounded = fixed_max(softcap, tensors[0].dtype, alibi_slopes is not None, 0)
    sig = [left, right, softcap > 0, bounded, raw_max_scale(softmax_scale), type(softmax_scale), type(softcap), dropout_p,
           torch.backends.cuda.matmul.allow_tf32, tensors[0].device, lengths, aliases(tensors), mask_sig]
    for t in tensors:
        sig += (t.shape, t.stride(), t.dtype, t.data_ptr() % 16)
    if dropout_p > 0:
        sig.append(specialization_key(dropout_seed))
    return tuple(sig)


def _dropout_args(dropout_p: float, seed: Tuple[int, int]) -> Tuple[int, int, int, float]:
    """(seed_lo, seed_hi, keep threshold, 1 / (1 - p)) for kernels/common.py:dropout_keep."""
    return seed[0], seed[1], dropout.threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _fit_tile(tile: int, block: int) -> int:
    """Kernel tiles must tile a sparse block exactly; blocks are powers of two >= 16 (_sparse_args checks)."""
    return tile if block == 0 else min(tile, block)


def _dense_layout(q: torch.Tensor, k: torch.Tensor) -> _Layout:
    return _Layout(q.shape[0], q.shape[1], k.shape[1])


def _packed_layout(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                   max_seqlen_k: int) -> _Layout:
    return _Layout(cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)


def forward_buffers(q: torch.Tensor, v: torch.Tensor, layout: _Layout) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """out [.., Hq, Dv] (q's dtype) and lse fp32 of one forward, and whether they are already final:
    empty shapes, or no keys at all (every row fully masked: out 0, lse -inf)."""
    Hq = q.shape[-2]
    out = _empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = _empty(layout.lse_shape(Hq, q.shape[0]), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse, True
    if layout.seqlen_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse, True
    return out, lse, False


def backward_buffers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in the shapes and dtypes of q, k, v) and delta (fp32, lse's shape) of one
    backward."""
    return (_empty(q.shape, dtype=q.dtype, device=q.device), _empty(k.shape, dtype=k.dtype, device=k.device),
            _empty(v.shape, dtype=v.dtype, device=v.device), _empty(lse.shape, dtype=torch.float32, device=q.device))


def _padded(t: torch.Tensor, backward: bool) -> torch.Tensor:
    """t with rows the dense kernels load unmasked where that pays (tuning.padded_columns)."""
    return aligned_rows(t, padded_columns(t.shape[-1], t.dtype, backward))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                      left: Optional[int] = None, right: Optional[int] = None,
                      softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                      config: Optional[KernelConfig] = None,
                      layout: Optional[_Layout] = None, block_mask=None,
                      attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                      dropout_seed: Tuple[int, int] = (0, 0)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out [B, Sq, Hq, Dv] (q's dtype) and lse fp32 [B, Hq, Sq] (packed: [total_q, Hq, Dv], [Hq, total_q]).

    left/right: visibility edges around the bottom-right diagonal (spec.mask_edges), None = unbounded.
    """
    if wide_forward_heads(q.shape[-1], v.shape[-1], q.dtype, q.device, block_mask):
        from flashtile.wide_launch import wide_forward
        return wide_forward(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, config, layout, block_mask,
                            attn_mask, dropout_p, dropout_seed)
    if config is None and block_mask is None and wide_heads(q.shape[-1], v.shape[-1]):
        # heads of 321..384 take the Gluon wide forward where it applies (dispatch.gluon_forward_heads)
        from flashtile.wide_launch import gluon_wide_forward
        done = gluon_wide_forward(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, layout, attn_mask,
                                  dropout_p)
        if done is not None:
            return done
    recipe_key = None
    if config is None and attn_mask is None and (layout is None or layout.varlen):
        cu, lengths = _recipe_layout(layout)
        bm, mask_lists, mask_sig = _recipe_mask(block_mask, left, right)
        recipe_key = _call_key((q, k, v, *cu, *mask_lists), left, right, softmax_scale, softcap, alibi_slopes,
                               dropout_p, dropout_seed, lengths, mask_sig)
        recipe = _RECIPES.get(recipe_key)
        if recipe is not MISSING and recipe is not None:  # see launch_recipe.py
            out, lse, _ = forward_buffers(q, v, layout or _dense_layout(q, k))  # only where one launched
            mask_values = _mask_values(bm, mask_lists, q, k, recipe[0].tile[0], None)
            with _device_ctx(q):
                recipe[0]((q, k, v, out, lse, alibi_slopes, *(cu or (None, None)), *mask_values, softmax_scale,
                           softcap, *dropout_seed))
            return out, lse
    call_tensors = (q, k, v, alibi_slopes)
    dv_asked = v.shape[-1]
    q, k, v = _padded(q, False), _padded(k, False), _padded(v, False)  # see row_align.py
    layout = layout or _dense_layout(q, k)
    k, v = (keys_in_range(t, layout.seqlen_k, layout.varlen) for t in (k, v))  # see key_layout.py
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv, Dv = k.shape[-2], v.shape[-1]
    B, Sq, Sk = layout.batch, layout.seqlen_q, layout.seqlen_k
    out, lse, done = forward_buffers(q, v, layout)
    if done:
        return narrowed(out, dv_asked), lse
    causal = right is not None
    sp = _sparse_args(block_mask, lse, left, right)
    has_left, has_right, left, right = _mask_flags(left, right)
    plain = not has_left and softcap <= 0 and dropout_p == 0 and not sp.enabled and not layout.varlen
    am_kind, am, am_strides = _attn_mask_args(attn_mask, (B, Hq, Sq, Sk), lse)
    bounded = fixed_max(softcap, q.dtype, alibi_slopes is not None, am_kind)
    cfg = config or forward_config(
        q.device, D, Dv, q.dtype, causal, plain_keys=Sk if plain and attn_mask is None else 0,
        long_bool_mask=plain and Sk >= LONG_FORWARD_KEYS and attn_mask is not None and attn_mask.dtype == torch.bool,
        fixed_max=bounded, alibi=alibi_slopes is not None, causal_blocks=causal and not has_left and sp.enabled)
    slopes, stride_alibi_b = _alibi_args(alibi_slopes, q)
    cu_q, cu_k = layout.cu(lse)
    args = (q, k, v, out, lse, slopes, cu_q, cu_k, *sp.kv_lists, sp.tiles, am,
            *layout.bsh(q), *layout.bsh(k), *layout.bsh(v), *layout.bsh(out), *layout.lse_bh(lse), stride_alibi_b,
            Sq, Sk, Hq, Hq // Hkv, D, Dv,
            softmax_scale, softcap, left, right, *sp.scalars, *am_strides, *_dropout_args(dropout_p, dropout_seed))
    meta = dict(**_head_dim_flags(D, Dv), DROPOUT=_dropout_flag(dropout_p),
                HAS_LEFT=has_left, HAS_RIGHT=has_right, SOFTCAP=_softcap_flag(softcap, q.dtype),
                HAS_ALIBI=_alibi_flag(alibi_slopes, has_right, right, max(D, Dv), "fwd"),
                VARLEN=layout.varlen, BLOCK_SPARSE=sp.flag, BLOCK_SQ=sp.block[0], BLOCK_SK=sp.block[1],
                ATTN_MASK=am_kind, DOT_PRECISION=_dot_precision(q.dtype),
                MAX_MODE=max_mode(softcap, q.dtype, alibi_slopes is not None, am_kind, Dv, has_left, softmax_scale),
                **_order_flags(program_order(layout, causal, has_left, Hq // Hkv, sp.enabled)))
    with _device_ctx(q):
        ran = _launch(attention_fwd_kernel, cfg, sp.block, lambda bm, bn: (triton.cdiv(Sq, bm) * B * Hq,),
                      lambda bm, bn: sp.order(lse, "query", B, Hq, 1, bm, Sq), args, meta)
    if recipe_key is not None and _RECIPES.get(recipe_key) is MISSING:
        mask_roles = _mask_roles(mask_lists, sp.tiles, ran[1][-1], None) if ran and sp.enabled else _NO_MASK
        roles = (*call_tensors[:3], out, lse, call_tensors[3], *(cu or (None, None)), *mask_roles)
        _RECIPES.put(recipe_key, ran and [capture(attention_fwd_kernel, ran[0], ran[1], roles,
                                                  _scalar_roles(_FWD_ROLES), tile=ran[2])])
    return narrowed(out, dv_asked), lse


def _expand_gqa(q: torch.Tensor, k: torch.Tensor, block_n: int, layout: _Layout) -> bool:
    """Sum the GQA group in registers unless that leaves the GPU too few programs to fill it.

    With few kv heads (MQA) one program per (key tile, kv head) is too little parallelism; then each
    query head writes its own fp32 partial dK/dV and torch sums the group (still deterministic).
    """
    Hkv = k.shape[-2]
    if q.shape[-2] == Hkv:
        return False
    if q.device.type != "cuda" or triton_interpreting():
        return False
    programs = layout.batch * Hkv * triton.cdiv(layout.seqlen_k, block_n)
    return programs < 2 * _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())


def walk_lengths(seqlen_k: int, causal: bool, has_left: bool, left: int, right: int, block_sparse: bool,
                 varlen: bool) -> Tuple[bool, bool, bool]:
    """(long_causal, short_walk, medium_walk) of tuning.backward_config: how far a masked backward's
    dK/dV programs walk. long_causal: causal without a window, block mask or varlen, with
    LONG_CAUSAL_KEYS keys; short_walk: no block mask, and causal with at most SHORT_CAUSAL_KEYS keys or
    a window of at most SHORT_WINDOW keys (left + right, the kernels' edges); medium_walk: the same
    with MEDIUM_CAUSAL_KEYS and MEDIUM_WINDOW, and not varlen (its lengths never become constants)."""
    long_causal = (causal and not has_left and not block_sparse and not varlen
                   and LONG_CAUSAL_KEYS[0] <= seqlen_k <= LONG_CAUSAL_KEYS[1])
    short_walk = causal and not block_sparse and (left + right <= SHORT_WINDOW if has_left
                                                  else seqlen_k <= SHORT_CAUSAL_KEYS)
    medium_walk = causal and not block_sparse and not varlen and (left + right <= MEDIUM_WINDOW if has_left
                                                                  else seqlen_k <= MEDIUM_CAUSAL_KEYS)
    return long_causal, short_walk, medium_walk


def _backward_flags(q: torch.Tensor, v: torch.Tensor, layout: _Layout, sp: _Sparse, has_left: bool, has_right: bool,
                    right: int, softcap: float, alibi_slopes: Optional[torch.Tensor], am_kind: int, dropout_p: float,
                    order: Tuple[bool, int]) -> dict:
    """The constexprs that the dQ and the dK/dV launches share (q, v: the row-aligned tensors); HAS_ALIBI
    is dQ's, the dK/dV launch sets its own (_alibi_flag)."""
    head_dim = max(q.shape[-1], v.shape[-1])
    return dict(**_head_dim_flags(q.shape[-1], v.shape[-1]), HAS_LEFT=has_left, HAS_RIGHT=has_right,
                SOFTCAP=_softcap_flag(softcap, q.dtype), HAS_ALIBI=_alibi_flag(alibi_slopes, has_right, right, head_dim, "dq"),
                VARLEN=layout.varlen, BLOCK_SPARSE=sp.flag, BLOCK_SQ=sp.block[0], BLOCK_SK=sp.block[1],
                ATTN_MASK=am_kind, DROPOUT=dropout_p > 0, DOT_PRECISION=_dot_precision(q.dtype), **_order_flags(order))


def _launch_dq(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, layout: _Layout, sp: _Sparse,
               cfg: KernelConfig, flags: dict, alibi_slopes: Optional[torch.Tensor], attn_mask_args: tuple,
               dbias: Optional[torch.Tensor], softmax_scale: float, softcap: float, left: int, right: int,
               dropout_p: float, dropout_seed: Tuple[int, int]):
    """attention_bwd_dq_kernel: writes dq and delta = rowsum(dO * O) (times 1 - p under dropout), and
    dbias where given. left / right as _mask_flags returns them; attn_mask_args: (pointer, strides)."""
    Hq, Hkv, D, Dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    B, Sq, Sk = layout.batch, layout.seqlen_q, layout.seqlen_k
    slopes, stride_alibi_b = _alibi_args(alibi_slopes, q)
    cu_q, cu_k = layout.cu(lse)
    am, am_strides = attn_mask_args
    args = (q, k, v, out, dout, lse, delta, dq, slopes, cu_q, cu_k, *sp.kv_lists, sp.tiles, am,
            dbias if dbias is not None else lse, *layout.bsh(q), *layout.bsh(k), *layout.bsh(v), *layout.bsh(out),
            *layout.bsh(dout), *layout.bsh(dq), *layout.lse_bh(lse), stride_alibi_b,
            Sq, Sk, Hq, Hq // Hkv, D, Dv, softmax_scale, softcap, left, right, *sp.scalars, *am_strides,
            *_dropout_args(dropout_p, dropout_seed))
    return _launch(attention_bwd_dq_kernel, cfg, sp.block, lambda bm, bn: (triton.cdiv(Sq, bm) * B * Hq,),
                   lambda bm, bn: sp.order(lse, "query", B, Hq, 1, bm, Sq), args,
                   dict(flags, BIAS_GRAD=dbias is not None))


def dense_dq(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, softmax_scale: float, layout: _Layout,
             left: Optional[int], right: Optional[int], softcap: float, alibi_slopes: Optional[torch.Tensor],
             attn_mask: Optional[torch.Tensor], dropout_p: float, dropout_seed: Tuple[int, int],
             dbias: Optional[torch.Tensor]) -> None:
    """The dense dQ launch alone, for the split-D backward (wide_launch.wide_backward) of head dims
    whose [BLOCK_M, D] dQ tiles fit the dense kernel (dispatch.dense_dq_heads). Writes dq, dbias
    (where given) and delta = rowsum(dO * O), unscaled as the split-D dK / dV kernels read it.
    Tensors: row-aligned, keys in range, non-empty (wide_backward's own)."""
    B, Sq, Sk = layout.batch, layout.seqlen_q, layout.seqlen_k
    Hq, Hkv = q.shape[-2], k.shape[-2]
    causal = right is not None
    sp = _sparse_args(None, lse, left, right)
    has_left, has_right, left, right = _mask_flags(left, right)
    cfg = backward_config(q.device, q.shape[-1], v.shape[-1], q.dtype, causal, softcap=softcap > 0,
                          dropout=dropout_p > 0, grouped=Hq > Hkv)
    am_kind, am, am_strides = _attn_mask_args(attn_mask, (B, Hq, Sq, Sk), lse)
    flags = _backward_flags(q, v, layout, sp, has_left, has_right, right, softcap, alibi_slopes, am_kind, dropout_p,
                            program_order(layout, causal, has_left, Hq // Hkv, False))
    _launch_dq(dout, q, k, v, out, lse, delta, dq, layout, sp, cfg.dq, flags, alibi_slopes, (am, am_strides), dbias,
               softmax_scale, softcap, left, right, dropout_p, dropout_seed)
    if dropout_p > 0:  # the dense launch stores delta * (1 - p) for its own dK/dV kernel (attention_bwd)
        delta.mul_(1.0 / (1.0 - dropout_p))


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
                       left: Optional[int] = None, right: Optional[int] = None,
                       softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                       config: Optional[BackwardConfig] = None, expand_gqa: Optional[bool] = None,
                       layout: Optional[_Layout] = None, block_mask=None,
                       attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                       dropout_seed: Tuple[int, int] = (0, 0), dbias: Optional[torch.Tensor] = None,
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv (contiguous, dtypes of q, k, v).

    dbias: a zero-filled contiguous fp32 [B, Hq, Sq, Sk] buffer (dense layout, additive attn_mask);
    the dQ launch writes the gradient of the bias into it (unvisited tiles keep their zeros).
    """
    if wide_heads(q.shape[-1], v.shape[-1]):
        from flashtile.wide_launch import wide_backward
        return wide_backward(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes, config,
                             expand_gqa, layout, block_mask, attn_mask, dropout_p, dropout_seed, dbias)
    recipe_key = None
    if config is None and expand_gqa is None and attn_mask is None and dbias is None \
            and (layout is None or layout.varlen):
        cu, lengths = _recipe_layout(layout)
        bm, mask_lists, mask_sig = _recipe_mask(block_mask, left, right)
        recipe_key = _call_key((dout, q, k, v, out, lse, *cu, *mask_lists), left, right, softmax_scale, softcap,
                               alibi_slopes, dropout_p, dropout_seed, lengths, mask_sig)
    calls = signature_calls(recipe_key, layout)
    repeated, rebuild = calls >= CONSTANT_LENGTHS_FROM_CALL, calls == CONSTANT_LENGTHS_FROM_CALL
    if recipe_key is not None:
        recipe = _RECIPES.get(recipe_key)
        # the first repeat runs the full path below, which rebuilds the recipe if it fixes the lengths
        if recipe is not MISSING and recipe is not None and not rebuild:
            dq, dk, dv, delta = backward_buffers(q, k, v, lse)
            mask_values = _mask_values(bm, mask_lists, q, k, recipe[0].tile[0], recipe[1].tile[1])
            values = (dout, q, k, v, out, lse, alibi_slopes, *(cu or (None, None)), delta, dq, dk, dv, *mask_values,
                      softmax_scale, softcap, *dropout_seed)
            with _device_ctx(q):
                for launch in recipe:
                    launch(values)
            return dq, dk, dv
    call_tensors = (dout, q, k, v, out, lse, alibi_slopes)
    d_asked, dv_asked = q.shape[-1], v.shape[-1]
    dout, q, k, v, out = (_padded(t, True) for t in (dout, q, k, v, out))  # see row_align.py
    layout = layout or _dense_layout(q, k)
    k, v = (keys_in_range(t, layout.seqlen_k, layout.varlen) for t in (k, v))  # see key_layout.py
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv, Dv = k.shape[-2], v.shape[-1]
    B, Sq, Sk = layout.batch, layout.seqlen_q, layout.seqlen_k
    dq, dk, dv, delta = backward_buffers(q, k, v, lse)
    if Sq == 0 or Sk == 0 or B == 0 or Hq == 0 or q.numel() == 0:  # nothing to launch (no heads at all too)
        return narrowed(dq.zero_(), d_asked), narrowed(dk.zero_(), d_asked), narrowed(dv.zero_(), dv_asked)
    group = Hq // Hkv
    causal = right is not None
    sp = _sparse_args(block_mask, lse, left, right)
    has_left, has_right, left, right = _mask_flags(left, right)
    long_causal, short_walk, medium_walk = walk_lengths(Sk, causal, has_left, left, right, sp.enabled, layout.varlen)
    cfg = config or backward_config(q.device, D, Dv, q.dtype, causal, block_sparse=sp.enabled,
                                    softcap=softcap > 0, partial_blocks=sp.enabled and sp.mask.element_mask is not None,
                                    long_causal=long_causal, short_walk=short_walk, dropout=dropout_p > 0,
                                    grouped=group > 1, medium_walk=medium_walk)
    constants = constant_lengths(repeated, cfg, Sq, Sk)
    am_kind, am, am_strides = _attn_mask_args(attn_mask, (B, Hq, Sq, Sk), lse)
    flags = _backward_flags(q, v, layout, sp, has_left, has_right, right, softcap, alibi_slopes, am_kind, dropout_p,
                            program_order(layout, causal, has_left, group, sp.enabled))
    slopes, stride_alibi_b = _alibi_args(alibi_slopes, q)
    cu_q, cu_k = layout.cu(lse)
    with _device_ctx(q):
        # dQ first: it also writes delta, which the dK/dV launch reads
        ran_dq = _launch_dq(dout, q, k, v, out, lse, delta, dq, layout, sp, cfg.dq, flags, alibi_slopes,
                            (am, am_strides), dbias, softmax_scale, softcap, left, right, dropout_p, dropout_seed)
        expand = _expand_gqa(q, k, cfg.dkdv.block_n, layout) if expand_gqa is None else (expand_gqa and group > 1)
        if expand:  # per-query-head fp32 partials, summed over the group below
            dk_buf = _empty((*k.shape[:-2], Hq, D), dtype=torch.float32, device=q.device)
            dv_buf = _empty((*v.shape[:-2], Hq, Dv), dtype=torch.float32, device=q.device)
            heads_per_program, n_head_programs = 1, Hq
        else:
            dk_buf, dv_buf = dk, dv
            heads_per_program, n_head_programs = group, Hkv
        args = (q, k, v, dout, lse, delta, dk_buf, dv_buf, slopes, cu_q, cu_k, *sp.q_lists, sp.tiles, am,
                *layout.bsh(q), *layout.bsh(k), *layout.bsh(v), *layout.bsh(dout), *layout.bsh(dk_buf),
                *layout.bsh(dv_buf), *layout.lse_bh(lse), stride_alibi_b,
                Sq, Sk, Hq, group, heads_per_program, n_head_programs,
                D, Dv, softmax_scale, softcap, left, right, *sp.scalars, *am_strides,
                *_dropout_args(dropout_p, dropout_seed))
        ran_dkdv = _launch(attention_bwd_dkdv_kernel, cfg.dkdv, sp.block,
                           lambda bm, bn: (triton.cdiv(Sk, bn) * B * n_head_programs,),
                           lambda bm, bn: sp.order(lse, "key", B, Hq, heads_per_program, bn, Sk), args,
                           dict(flags, SPLIT_PHASES=cfg.split_phases,
                                HAS_ALIBI=_alibi_flag(alibi_slopes, has_right, right, max(D, Dv), "dkdv"),
                                SEQLEN_Q=Sq if constants else 0, SEQLEN_K=Sk if constants else 0,
                                # aligned rows need lse [B, Hq, Sq] contiguous (delta is allocated alike, backward_buffers)
                                ALIGN_LSE=constants and cfg.aligned_rows and lse.is_contiguous()))
        if expand:
            dk.copy_(dk_buf.unflatten(-2, (Hkv, group)).sum(-2))
            dv.copy_(dv_buf.unflatten(-2, (Hkv, group)).sum(-2))
    if recipe_key is not None and (_RECIPES.get(recipe_key) is MISSING or (rebuild and constants)):
        # the expanded GQA path sums partial buffers after the launches: not a recipe (capture finds them)
        mask_roles = _NO_MASK
        if ran_dq and ran_dkdv and sp.enabled:
            mask_roles = _mask_roles(mask_lists, sp.tiles, ran_dq[1][-1], ran_dkdv[1][-1])
        roles = (*call_tensors, *(cu or (None, None)), delta, dq, dk, dv, *mask_roles)
        _RECIPES.put(recipe_key, ran_dq and ran_dkdv and [
            capture(kernel, ran[0], ran[1], roles, _scalar_roles(_BWD_ROLES), tile=ran[2])
            for kernel, ran in ((attention_bwd_dq_kernel, ran_dq), (attention_bwd_dkdv_kernel, ran_dkdv))])
    return narrowed(dq, d_asked), narrowed(dk, d_asked), narrowed(dv, dv_asked)


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                             softmax_scale: float, left=None, right=None, softcap: float = 0.0, alibi_slopes=None,
                             dropout_p: float = 0.0, dropout_seed: Tuple[int, int] = (0, 0)):
    """Packed sequences: q [total_q, Hq, D] -> out [total_q, Hq, Dv], lse fp32 [Hq, total_q].

    Dropout draws element (i, j) of sequence b from the padded [B, Hq, max_seqlen_q, max_seqlen_k] grid.
    """
    layout = _packed_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return attention_forward(q, k, v, softmax_scale, left, right, softcap, alibi_slopes, layout=layout,
                             dropout_p=dropout_p, dropout_seed=dropout_seed)


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                              max_seqlen_k: int, softmax_scale: float, left=None, right=None, softcap: float = 0.0,
                              alibi_slopes=None, dropout_p: float = 0.0, dropout_seed: Tuple[int, int] = (0, 0)):
    """Gradients of attention_varlen_forward: dq, dk, dv in the packed layouts of q, k, v."""
    layout = _packed_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return attention_backward(dout, q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes,
                              layout=layout, dropout_p=dropout_p, dropout_seed=dropout_seed)
