"""Launcher of the Triton GEMM: batch geometry, operand modes (TMA or pointers), config, launch.

Input contract (gemm.py validates it): a [..., M, K] and b [..., K, N] of one dtype, batch dims that
broadcast, any strides; bias None or broadcastable to the output [*batch, M, N]. The output (and the
optional pre-activation kept for the backward) is allocated contiguous [*batch, M, N].

No copies: broadcast batch dims become stride-0 views, batch dims are merged where the strides
allow, and a batch that a shared B multiplies is folded into M (one big GEMM instead of many).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from flashtile.dispatch import triton_interpreting
from flashtile.kernels.gemm import gemm_kernel
from flashtile.launch_cache import PlanCache
from flashtile.launch_fit import launch_fitting

ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One kernel configuration (tile sizes, pipelining, schedule)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    persistent: bool = True  # at most one program per SM, looping over tiles
    flatten: bool = False  # tl.range(flatten=True): pipeline across tile boundaries
    tma: bool = True  # load A and B through tensor descriptors where the layout allows
    tma_store: bool = True  # store C through a descriptor (else pointer stores)
    epilogue_split: int = 1  # 2: the epilogue runs on the tile's two column halves (fewer live registers)


# The interpreter executes every op through numpy: one small config, pointers and descriptors alike.
_INTERPRETER = GemmConfig(32, 32, 32, 4, 1, group_m=4)

# What scripts/tune_gemm.py measures on the H200 (name -> config); the table below picks from these.
SWEEP_16BIT = {
    "p128x256": GemmConfig(128, 256, 64, 8, 3),
    "p128x256_flat": GemmConfig(128, 256, 64, 8, 3, flatten=True),
    "p128x256_g16": GemmConfig(128, 256, 64, 8, 3, group_m=16),
    "p128x256_e2": GemmConfig(128, 256, 64, 8, 3, epilogue_split=2),
    "p128x256_e2g16": GemmConfig(128, 256, 64, 8, 3, group_m=16, epilogue_split=2),
    "p128x256_e2_flat": GemmConfig(128, 256, 64, 8, 3, epilogue_split=2, flatten=True),
    "p128x256_e2g16_flat": GemmConfig(128, 256, 64, 8, 3, group_m=16, epilogue_split=2, flatten=True),
    "p128x256_e2g8_flat_s4": GemmConfig(128, 256, 64, 8, 4, epilogue_split=2, flatten=True),
    "p128x256_ptrstore": GemmConfig(128, 256, 64, 8, 3, tma_store=False),
    "n128x256": GemmConfig(128, 256, 64, 8, 3, persistent=False),
    "p256x128": GemmConfig(256, 128, 64, 8, 3),
    "p128x128": GemmConfig(128, 128, 64, 8, 4),
    "p128x128_flat": GemmConfig(128, 128, 64, 8, 4, flatten=True),
    "p128x128_w4": GemmConfig(128, 128, 64, 4, 4),
    "n128x128": GemmConfig(128, 128, 64, 8, 4, persistent=False),
    # one program per tile, 128 x 128 (ptxas: 163 registers with gelu, so one 256-thread program per SM;
    # a 128-register cap for two per SM ran at 0.7-0.8x cuBLAS, session 6)
    "n128x128_s3ptr": GemmConfig(128, 128, 64, 8, 3, persistent=False, tma_store=False),
    "n128x64": GemmConfig(128, 64, 64, 4, 4, persistent=False),
    "n64x128": GemmConfig(64, 128, 64, 4, 4, persistent=False),
    "n64x64": GemmConfig(64, 64, 64, 4, 4, persistent=False),
}
SWEEP_FP32 = {
    "ieee64x64": GemmConfig(64, 64, 32, 4, 3),
    "ieee128x64": GemmConfig(128, 64, 32, 8, 3),
    "ieee128x128": GemmConfig(128, 128, 32, 8, 3),
    # pointer loads: a descriptor's tile of a transposed operand (nn.Linear's weight.mT) is read
    # column-wise by the CUDA-core dot, 4x slower (H200, 4096^3 NT: 5.1 against 21.4 TFLOP/s)
    "ieee128x128_ptr": GemmConfig(128, 128, 32, 8, 3, tma=False),
    "tf32_128x128": GemmConfig(128, 128, 32, 8, 3),
}


def gemm_config(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int,
                precision: str, activation: bool = False) -> GemmConfig:
    """The config for one (batch-folded) problem; fixed table, no autotuning (see BENCHMARKS.md)."""
    if device.type != "cuda" or triton_interpreting():
        return _INTERPRETER
    arch = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return select_config(arch, dtype == torch.float32, precision, m, n, k, activation)


def select_config(arch: Tuple[int, int], fp32: bool, precision: str, m: int, n: int, k: int,
                  activation: bool = False) -> GemmConfig:
    """The table: by architecture, element type and problem size (H200 measurements, BENCHMARKS.md)."""
    if fp32 and precision == "ieee":  # CUDA-core FMAs, no tensor cores
        # H200, 4096^3 (TFLOP/s; cuBLAS SGEMM 51): 64x64 with descriptors NN 35.8, NT 9.3; 128x128 with
        # pointers NN 42.3, NT 21.4. Below 2048^2 outputs 128x128 tiles leave SMs idle (1000^3: 14.4
        # against 31.8 for 64x64)
        return SWEEP_FP32["ieee128x128_ptr" if m * n >= 2048 * 2048 else "ieee64x64"]
    if arch[0] < 9:  # Ampere and older: no TMA, less shared memory
        return GemmConfig(128, 128, 32, 8, 3, tma=False)
    if fp32:  # tf32: 4-byte elements, half the K tile
        return SWEEP_FP32["tf32_128x128"]
    if m * n <= 256 * 256 or min(m, n) <= 64:
        return SWEEP_16BIT["n64x64"]
    if m * n <= 1024 * 1024:
        return SWEEP_16BIT["p128x128"]
    if activation and m * n <= 2048 * 2048:
        # up to one wave of 128 x 256 tiles: 128 x 128 programs, one per tile (twice the programs, so
        # the last wave is less empty and epilogues start at different times); 2048^3 bias + gelu:
        # 1.08x addmm + gelu against 1.02x (H200, scripts/tune_gemm.py --rounds 3)
        return SWEEP_16BIT["n128x128_s3ptr"]
    # H200 sweep (scripts/tune_gemm.py --rounds 3; 2048^3 .. 16384x14336x4096): plain GEMM flattens the
    # tile loop, so the next tile's first loads overlap this tile's epilogue, with 4 stages and C
    # stored in two halves: 0.94-1.02x cuBLAS, against 0.87-0.99x for the unflattened 3-stage kernel
    # grouping 16 tile rows. With an activation, the unflattened kernel with C in two halves gives
    # 1.01-1.13x addmm + gelu, and the flattened ones were within the run-to-run noise (+-3%) of it
    return SWEEP_16BIT["p128x256_e2" if activation else "p128x256_e2g8_flat_s4"]


def shipped_configs() -> List[Tuple[str, GemmConfig, bool]]:
    """(kind, config, activation) for every config select_config returns on Hopper: kind is "16bit",
    "fp32" or "tf32", activation whether the config runs with one (and then with the pre-activation
    store, the one that needs the most shared memory)."""
    sizes = [1, 16, 64, 65, 256, 257, 512, 1024, 1025, 2048, 4096, 8192, 16384]
    out: List[Tuple[str, GemmConfig, bool]] = []
    for kind, fp32, precision in (("16bit", False, "ieee"), ("fp32", True, "ieee"), ("tf32", True, "tf32")):
        for m in sizes:
            for n in sizes:
                for activation in (False, True):
                    cfg = select_config((9, 0), fp32, precision, m, n, 4096, activation)
                    if (kind, cfg, activation) not in out:
                        out.append((kind, cfg, activation))
    return out


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are fp32-exact unless torch allows tf32 for matmuls (design.md)."""
    if dtype == torch.float32 and not triton_interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------------------------
# Batch geometry


def _merge_batch(tensors: Sequence[torch.Tensor], nbatch: int) -> List[torch.Tensor]:
    """Views of ``tensors`` (same leading ``nbatch`` sizes) with adjacent batch dims merged where every
    tensor's strides allow it, size-1 dims dropped; at least one batch dim is kept."""
    shape = list(tensors[0].shape[:nbatch])
    strides = [list(t.stride()[:nbatch]) for t in tensors]
    keep = [i for i, s in enumerate(shape) if s != 1]
    shape = [shape[i] for i in keep]
    strides = [[st[i] for i in keep] for st in strides]
    i = len(shape) - 2
    while i >= 0:
        if all(st[i] == st[i + 1] * shape[i + 1] for st in strides):
            shape[i] *= shape[i + 1]
            del shape[i + 1]
            for st in strides:
                st[i] = st[i + 1]
                del st[i + 1]
        i -= 1
    if not shape:
        shape, strides = [1], [[0] for _ in tensors]
    return [t.as_strided(shape + list(t.shape[nbatch:]), st + list(t.stride()[nbatch:]))
            for t, st in zip(tensors, strides)]


class _Mat(NamedTuple):
    """One matrix operand as the kernel sees it: a tensor (base pointer) and [batch, rows, cols] sizes
    and strides (batch stride 0: shared by every batch index). Plain tuples, not tensor views, keep
    the host time of a call low."""

    t: torch.Tensor
    batch: int
    rows: int
    cols: int
    sb: int
    sr: int
    sc: int


def _mat(v: torch.Tensor) -> _Mat:
    """A 3-d view as a _Mat."""
    return _Mat(v, *v.shape, *v.stride())


def _mat2(t: torch.Tensor, rows: int, cols: int) -> _Mat:
    """A tensor of at most 2 dims broadcast to [1, rows, cols] (size-1 and missing dims: stride 0)."""
    sizes = (1,) * (2 - t.dim()) + tuple(t.shape)
    strides = (0,) * (2 - t.dim()) + tuple(t.stride())
    return _Mat(t, 1, rows, cols, 0, strides[0] if sizes[0] > 1 else 0, strides[1] if sizes[1] > 1 else 0)


def _fold_into_m(a: _Mat, c: _Mat, bias: Optional[_Mat]) -> bool:
    """True when a [Bt, M, K], c [Bt, M, N] and bias [Bt, M, N] are [Bt*M, .] matrices."""
    return all(x.sb == a.rows * x.sr for x in ((a, c) if bias is None else (a, c, bias)))


def _folded(x: _Mat) -> _Mat:
    return x._replace(batch=1, rows=x.batch * x.rows, sb=0)


# ----------------------------------------------------------------------------------------------
# Operand modes


def _aligned(t: torch.Tensor, strides: Sequence[int]) -> bool:
    """TMA's rule: 16-byte aligned base and strides; a stride-0 (broadcast) dim needs pointers."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s > 0 and (s * size) % 16 == 0 for s in strides)


def _descriptor(t: torch.Tensor, shape: List[int], strides: List[int], block: List[int]):
    """A host-side TMA descriptor. _operand has checked what TensorDescriptor's constructor checks
    (alignment, unit last stride, power-of-two block), so it is filled without re-checking: the
    checks cost more host time than the rest of a small GEMM's launch."""
    d = TensorDescriptor.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.padding = t, shape, strides, block, "zero"
    return d


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


def _operand(x: _Mat, batched: bool, block: Tuple[int, int], use_tma: bool):
    """(kernel argument, mode) for tiles of ``block`` = (rows, cols) of operand ``x``.

    mode 1: descriptor of [.., R, C] (C contiguous); 2: descriptor of the transpose [.., C, R]
    (R contiguous); 0: the tensor itself (pointer with strides). TMA needs 16-byte aligned base and
    strides (except the contiguous one); anything else runs through pointers.
    """
    if not use_tma or x.rows == 0 or x.cols == 0:
        return x.t, 0
    t = x.t
    lead = [x.sb] if batched else []
    dims = [x.batch] if batched else []
    box = [1] if batched else []
    if x.sc == 1 or x.cols == 1:  # a single column reads no inner stride
        if _aligned(t, lead + [x.sr]):
            return _descriptor(t, dims + [x.rows, x.cols], lead + [x.sr, 1], box + list(block)), 1
    if x.sr == 1 or x.rows == 1:  # a transposed view
        if _aligned(t, lead + [x.sc]):
            return _descriptor(t, dims + [x.cols, x.rows], lead + [x.sc, 1], box + [block[1], block[0]]), 2
    return t, 0


# ----------------------------------------------------------------------------------------------
# Launch


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it with NaN to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def gemm_forward(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], alpha: float,
                 activation: Optional[str], out_dtype: torch.dtype, store_pre: bool = False,
                 config: Optional[GemmConfig] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out = act(alpha * a @ b + bias) as a new contiguous [*batch, M, N] tensor of ``out_dtype``,
    and, with ``store_pre``, the pre-activation alpha * a @ b + bias in the same layout (else None)."""
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    act = ACTIVATIONS[activation]
    want_pre = store_pre and activation is not None
    if a.dim() == 2 and b.dim() == 2 and (bias is None or bias.dim() <= 2):
        # the common case, without views: one launch
        out = _empty((M, N), out_dtype, a.device)
        pre = _empty((M, N), out_dtype, a.device) if want_pre else None
        if out.numel():
            # everything launch_args decides from, so one key means one grid, one set of operand modes
            # and one Triton specialisation (out and pre are fresh allocations: always 16-byte aligned)
            key = (a.shape, a.stride(), b.shape, b.stride(), a.dtype, out_dtype, act, want_pre, config,
                   a.data_ptr() % 16, b.data_ptr() % 16, a.device.index, dot_precision(a.dtype),
                   None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.data_ptr() % 16),
                   alpha == 1.0)  # ALPHA_ONE
            plan = _PLANS.get(key)
            with _device_ctx(a):
                if plan is not None:
                    plan.launch(a, b, out, out if bias is None else bias, out if pre is None else pre, float(alpha))
                else:
                    grid, args, meta = launch_args(_mat2(a, M, K), _mat2(b, K, N), _mat2(out, M, N),
                                                   _mat2(bias, M, N) if bias is not None else None,
                                                   _mat2(pre, M, N) if pre is not None else None, alpha, act, config)
                    launch_fitting(lambda m: _PLANS.launch_and_plan(key, grid, args, m, _plan_slots(args)), meta,
                                   _fewer_stages)
        return out, pre
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = _empty((*batch, M, N), out_dtype, a.device)
    pre = _empty(out.shape, out_dtype, a.device) if want_pre else None
    if out.numel() == 0:
        return out, pre
    nb = len(batch)
    # 3-d views [*, M, K] etc. with one leading batch dim; broadcast dims get stride 0
    views = [a.expand(*batch, M, K), b.expand(*batch, K, N), out]
    views.append(bias.expand(*batch, M, N) if bias is not None else None)
    views.append(pre)
    present = [v for v in views if v is not None]
    if nb == 0:
        present = [v.unsqueeze(0) for v in present]
        nb = 1
    merged = iter(_merge_batch(present, nb))
    views = [next(merged) if v is not None else None for v in views]
    with _device_ctx(a):
        for idx in _outer_indices(views[0].shape[:-3]):
            va, vb, vc, vx, vp = (_mat(v[idx]) if v is not None else None for v in views)
            _launch(va, vb, vc, vx, vp, alpha, act, config)
    return out, pre


def _outer_indices(shape: Sequence[int]):
    """Every index of the batch dims that could not be merged (usually none: one launch)."""
    if not shape:
        yield ()
        return
    import itertools
    yield from itertools.product(*(range(s) for s in shape))


def _device_ctx(t: torch.Tensor):
    """Launch on the tensors' GPU (a no-op when it is the current one already)."""
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_PLANS = PlanCache(gemm_kernel)
ALPHA_ARG = 21  # position of alpha in launch_args' positional arguments


def _plan_slots(args: Sequence) -> list:
    """The arguments of a 2-d launch that change between calls with one key: the A, B and C operands
    (tensors, or TMA descriptors rebuilt on the new tensor with the plan's shape and block), the bias
    and pre-activation pointers (out when absent) and alpha."""
    def wrap(arg):
        if isinstance(arg, torch.Tensor):
            return None
        return functools.partial(_descriptor, shape=arg.shape, strides=arg.strides, block=arg.block_shape)
    return [(0, wrap(args[0])), (1, wrap(args[1])), (2, wrap(args[2])), (3, None), (4, None), (ALPHA_ARG, None)]


def _bias_kind(bias: Optional[_Mat]) -> int:
    """kernels/gemm.py's BIAS_* code for the bias layout: a vector when it broadcasts along rows/columns."""
    if bias is None:
        return 0
    if bias.sr == 0:
        return 1  # one value per output column: [N], [1, N]
    if bias.sc == 0:
        return 2  # one value per output row: [M, 1]
    return 3


def _launch(a: _Mat, b: _Mat, c: _Mat, bias: Optional[_Mat], pre: Optional[_Mat], alpha: float, act: int,
            config: Optional[GemmConfig]) -> None:
    """One launch: a [Bt, M, K], b [Bt, K, N], c and pre [Bt, M, N] (contiguous), bias [Bt, M, N]."""
    grid, args, meta = launch_args(a, b, c, bias, pre, alpha, act, config)
    launch_fitting(lambda m: gemm_kernel[grid](*args, **m), meta, _fewer_stages)


def _fewer_stages(meta: dict) -> Optional[dict]:
    """The launch with one pipeline stage fewer (down to 2): the 4-stage plain config fills the
    H200's 227 KB with A and B stages alone, and a full [M, N] bias tile or a transposed operand adds
    a few KB, which Triton reports as OutOfResources."""
    return dict(meta, num_stages=meta["num_stages"] - 1) if meta["num_stages"] > 2 else None


def launch_args(a: _Mat, b: _Mat, c: _Mat, bias: Optional[_Mat], pre: Optional[_Mat], alpha: float, act: int,
                config: Optional[GemmConfig]):
    """(grid, positional args, keyword args) of gemm_kernel for one launch (see _launch)."""
    if b.sb == 0 and a.batch > 1 and _fold_into_m(a, c, bias):
        # a shared B: the batch is more rows of one GEMM
        a, c = _folded(a), _folded(c)
        b = b._replace(batch=1)
        bias = _folded(bias) if bias is not None else None
        pre = _folded(pre) if pre is not None else None
    bt, M, K, N = a.batch, a.rows, a.cols, b.cols
    dtype, device = a.t.dtype, a.t.device
    precision = dot_precision(dtype)
    cfg = config or gemm_config(device, dtype, M, N, K, precision, act != 0)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    batched_a, batched_b, batched_c = a.sb != 0 and bt > 1, b.sb != 0 and bt > 1, bt > 1
    a_arg, a_mode = _operand(a, batched_a, (bm, bk), cfg.tma)
    b_arg, b_mode = _operand(b, batched_b, (bk, bn), cfg.tma)
    c_arg, c_mode = _operand(c, batched_c, (bm, bn // cfg.epilogue_split), cfg.tma and cfg.tma_store)
    if c_mode == 2:  # c is contiguous; mode 2 only happens for N == 1: store through pointers
        c_arg, c_mode = c.t, 0
    tiles = bt * _cdiv(M, bm) * _cdiv(N, bn)
    programs = tiles
    if cfg.persistent and device.type == "cuda":
        programs = min(tiles, _sm_count(device.index if device.index is not None else torch.cuda.current_device()))
    x = bias if bias is not None else _Mat(c.t, 0, 0, 0, 0, 0, 0)
    args = (a_arg, b_arg, c_arg, x.t, pre.t if pre is not None else c.t,
            M, N, K, bt,
            a.sb, a.sr, a.sc,
            b.sb, b.sr, b.sc,
            c.sb, c.sr, c.sc,
            x.sb, x.sr, x.sc,
            float(alpha))
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
                A_MODE=a_mode, B_MODE=b_mode, C_TMA=c_mode == 1,
                BATCHED_A=batched_a, BATCHED_B=batched_b, BATCHED_C=batched_c,
                BIAS=_bias_kind(bias), ALPHA_ONE=alpha == 1.0, ACTIVATION=act,
                STORE_PRE=pre is not None, DOT_PRECISION=precision, FLATTEN=cfg.flatten,
                EPILOGUE_SPLIT=cfg.epilogue_split,
                PTX=device.type == "cuda" and not triton_interpreting(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (programs,), args, meta
