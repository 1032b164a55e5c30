"""GEMM with a fused epilogue: C = activation(alpha * (A @ B) + bias), fp32 accumulation.

Shapes (per batch index b of the launcher's flattened batch):
  A [M, K], B [K, N], C [M, N]; bias broadcast to [M, N] through its strides (0 = broadcast).

One persistent kernel: the launched programs walk the (batch, tile_m, tile_n) tiles, grouped by
GROUP_M rows of tiles so neighbouring programs share A and B tiles in L2.

Each operand arrives either as a Triton tensor descriptor (TMA on Hopper) or as a plain pointer
with strides; the *_MODE flags say which, so any layout runs without a copy:
  A_MODE  0: pointer, any strides          B_MODE  0: pointer, any strides
          1: descriptor of A [.., M, K]            1: descriptor of B [.., K, N]
          2: descriptor of A^T [.., K, M]          2: descriptor of B^T [.., N, K]
             (a transposed view, `x.mT`)              (nn.Linear's weight.mT)
BATCHED_A / BATCHED_B / BATCHED_C: the descriptor has a leading batch dim (rank 3); an operand
shared by every batch index gets a rank-2 descriptor (its batch stride is 0).
The launcher (gemm_launch.py) decides the modes; this file only computes.
"""

import triton
import triton.language as tl

from flashtile.kernels.common import tanh

# Activation codes (gemm_launch.ACTIVATIONS maps names to these).
ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_GELU = tl.constexpr(2)
ACT_GELU_TANH = tl.constexpr(3)
ACT_SILU = tl.constexpr(4)

# Bias layouts (gemm_launch picks one from the bias strides): a vector needs one load per tile row
# or column instead of a [BLOCK_M, BLOCK_N] tile of 64-bit addresses.
BIAS_NONE = tl.constexpr(0)
BIAS_ROW = tl.constexpr(1)  # one value per output column (bias [N]; stride_xm == 0)
BIAS_COL = tl.constexpr(2)  # one value per output row (bias [M, 1]; stride_xn == 0)
BIAS_FULL = tl.constexpr(3)  # any other broadcast of [M, N]


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(batch index, tile row, tile column) of linear tile id ``tile``, GROUP_M tile rows per group."""
    per_batch = num_pid_m * num_pid_n
    bid = tile // per_batch
    t = tile % per_batch
    width = GROUP_M * num_pid_n
    first_m = (t // width) * GROUP_M
    rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (t % rows)
    pid_n = (t % width) // rows
    return bid, pid_m, pid_n


@triton.jit
def _load_tile(X, bid, off_r, off_c, R, C, stride_b, stride_r, stride_c,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr, BATCHED: tl.constexpr):
    """The [BLOCK_R, BLOCK_C] tile at (off_r, off_c) of matrix ``bid`` of X [.., R, C]; zeros outside.

    MODE 1: X is a descriptor of [.., R, C]; 2: a descriptor of the transpose [.., C, R]; 0: a pointer.
    A tile is (rows M, cols K), a B tile (rows K, cols N).
    """
    if MODE == 1:
        if BATCHED:
            x = X.load([bid, off_r, off_c]).reshape(BLOCK_R, BLOCK_C)
        else:
            x = X.load([off_r, off_c])
    elif MODE == 2:
        if BATCHED:
            x = X.load([bid, off_c, off_r]).reshape(BLOCK_C, BLOCK_R).T
        else:
            x = X.load([off_c, off_r]).T
    else:
        offs_r = off_r + tl.arange(0, BLOCK_R)
        offs_c = off_c + tl.arange(0, BLOCK_C)
        # int64 offsets: a strided view can reach past 2^31 elements even when R * C does not
        ptrs = (X + bid.to(tl.int64) * stride_b + offs_r.to(tl.int64)[:, None] * stride_r
                + offs_c.to(tl.int64)[None, :] * stride_c)
        x = tl.load(ptrs, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)
    return x


@triton.jit
def _reciprocal(x, PTX: tl.constexpr):
    """1 / x; with PTX, the GPU's rcp.approx (one MUFU instruction, 1 ulp; x >= 1 here) instead of the
    IEEE division's six with its range checks. The interpreter cannot run inline PTX."""
    if PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _gelu(x, PTX: tl.constexpr):
    """x * Phi(x), Phi the normal CDF, without branches: Phi(x) = 1 - h for x >= 0 and h for x < 0, with
    h = erfc(|x| / sqrt(2)) / 2 = t * P(t) * exp(-x^2 / 2), t = 1 / (1 + p |x| / sqrt(2)) (Abramowitz &
    Stegun 7.1.26, |error| <= 1.5e-7; P's coefficients halved). h gives Phi's negative tail directly,
    without 1 + erf(x)'s cancellation.

    About 16 instructions with PTX: libdevice's erff branches per element and costs about 40, and the
    epilogue, which does not overlap the next tile's main loop, pays for each one. x = -inf gives NaN
    as torch does (-inf * 0); NaN stays NaN."""
    z = tl.abs(x) * 0.7071067811865476  # |x| / sqrt(2)
    t = _reciprocal(1.0 + 0.3275911 * z, PTX)
    h = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))))
    h = h * tl.math.exp2(z * z * -1.4426950408889634)  # exp(-z^2)
    return x * tl.where(x < 0.0, h, 1.0 - h)


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr, PTX: tl.constexpr):
    """The fused activation on the fp32 pre-activation tile (torch's definitions)."""
    if ACTIVATION == ACT_RELU:
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == ACT_GELU:
        x = _gelu(x, PTX)
    elif ACTIVATION == ACT_GELU_TANH:
        x = 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))  # sqrt(2 / pi)
    elif ACTIVATION == ACT_SILU:
        x = x / (1.0 + tl.exp(-x))
    return x


@triton.jit
def _add_bias(acc, Bias, bid, off_m, off_n, M, N, stride_xb, stride_xm, stride_xn, BIAS: tl.constexpr):
    """acc + bias[off_m : off_m + rows, off_n : off_n + cols] of matrix bid, in fp32 (a vector load when
    the bias broadcasts along rows or columns)."""
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    bias_base = Bias + bid.to(tl.int64) * stride_xb
    if BIAS == BIAS_ROW:
        bias = tl.load(bias_base + offs_n.to(tl.int64) * stride_xn, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    elif BIAS == BIAS_COL:
        bias = tl.load(bias_base + offs_m.to(tl.int64) * stride_xm, mask=offs_m < M, other=0.0)
        acc = acc + bias.to(tl.float32)[:, None]
    elif BIAS == BIAS_FULL:
        bias = tl.load(bias_base + offs_m.to(tl.int64)[:, None] * stride_xm + offs_n.to(tl.int64)[None, :] * stride_xn,
                       mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        acc = acc + bias.to(tl.float32)
    return acc


@triton.jit
def gemm_kernel(
    A, B, C, Bias, Pre,
    M, N, K, batch,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_xb, stride_xm, stride_xn,
    alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, C_TMA: tl.constexpr,
    BATCHED_A: tl.constexpr, BATCHED_B: tl.constexpr, BATCHED_C: tl.constexpr,
    BIAS: tl.constexpr, ALPHA_ONE: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FLATTEN: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr, PTX: tl.constexpr,
):
    """C[b] = act(alpha * A[b] @ B[b] + bias[b]); Pre[b] (contiguous like C) = the pre-activation.

    C is a descriptor of [batch, M, N] / [M, N] when C_TMA, else a pointer with strides stride_c*.
    Bias and Pre are pointers (Pre only read when STORE_PRE, Bias only when BIAS != BIAS_NONE).
    ALPHA_ONE (the launcher's alpha == 1): no scaling, and (unless FLATTEN) a bias
    vector (BIAS_ROW / BIAS_COL) starts the accumulator, so its loads and adds run before the main
    loop, while the first TMA loads are in flight, instead of in the epilogue (a full bias tile's
    64-bit addresses would stay live through the loop).
    PTX: running on an NVIDIA GPU, not the interpreter (inline PTX allowed).
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = batch * num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    # no warp specialisation: triton 3.6's sm_90 pass transforms only 4-warp loops, fails on TMA stores
    # and hung at run time with pointer stores (docs/perf_notes.md, session 8)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        bid, pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # not with FLATTEN (the pipeliner then waits for every MMA and stops prefetching: half the speed)
        BIAS_IN_ACC: tl.constexpr = ALPHA_ONE and not FLATTEN and (BIAS == BIAS_ROW or BIAS == BIAS_COL)
        if BIAS_IN_ACC:
            acc = _add_bias(acc, Bias, bid, off_m, off_n, M, N, stride_xb, stride_xm, stride_xn, BIAS)
        for kt in range(k_tiles):
            off_k = kt * BLOCK_K
            a = _load_tile(A, bid, off_m, off_k, M, K, stride_ab, stride_am, stride_ak, BLOCK_M, BLOCK_K,
                           A_MODE, BATCHED_A)
            b = _load_tile(B, bid, off_k, off_n, K, N, stride_bb, stride_bk, stride_bn, BLOCK_K, BLOCK_N,
                           B_MODE, BATCHED_B)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        # epilogue, on the whole tile or (EPILOGUE_SPLIT == 2) on its two column halves: each half's
        # activation temporaries die at its store, so gelu's do not push the 128 x 256 accumulator
        # into spills (ptxas: 255 registers and spills whole, none in halves; 4 slices were no faster)
        EPILOGUE_BIAS: tl.constexpr = BIAS_NONE if BIAS_IN_ACC else BIAS
        if EPILOGUE_SPLIT == 2:
            lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _epilogue(lo, C, Bias, Pre, bid, off_m, off_n, M, N, stride_cb, stride_cm, stride_cn,
                      stride_xb, stride_xm, stride_xn, alpha, C_TMA, BATCHED_C, EPILOGUE_BIAS, ALPHA_ONE,
                      ACTIVATION, STORE_PRE, PTX)
            _epilogue(hi, C, Bias, Pre, bid, off_m, off_n + BLOCK_N // 2, M, N, stride_cb, stride_cm, stride_cn,
                      stride_xb, stride_xm, stride_xn, alpha, C_TMA, BATCHED_C, EPILOGUE_BIAS, ALPHA_ONE,
                      ACTIVATION, STORE_PRE, PTX)
        else:
            _epilogue(acc, C, Bias, Pre, bid, off_m, off_n, M, N, stride_cb, stride_cm, stride_cn,
                      stride_xb, stride_xm, stride_xn, alpha, C_TMA, BATCHED_C, EPILOGUE_BIAS, ALPHA_ONE,
                      ACTIVATION, STORE_PRE, PTX)


@triton.jit
def _epilogue(acc, C, Bias, Pre, bid, off_m, off_n, M, N, stride_cb, stride_cm, stride_cn,
              stride_xb, stride_xm, stride_xn, alpha,
              C_TMA: tl.constexpr, BATCHED_C: tl.constexpr, BIAS: tl.constexpr, ALPHA_ONE: tl.constexpr,
              ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, PTX: tl.constexpr):
    """Scale, bias, (pre-activation,) activation and one rounding to C's dtype, for the accumulator
    tile acc = (A @ B)[off_m : off_m + rows, off_n : off_n + cols] of matrix bid."""
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    if not ALPHA_ONE:
        acc = acc * alpha
    acc = _add_bias(acc, Bias, bid, off_m, off_n, M, N, stride_xb, stride_xm, stride_xn, BIAS)
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PRE:
        # Pre is allocated contiguous [batch, M, N]: its strides are (M * N, N, 1)
        pre_ptrs = (Pre + bid.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N
                    + offs_n.to(tl.int64)[None, :])
        tl.store(pre_ptrs, acc.to(Pre.dtype.element_ty), mask=inside)
    acc = _activate(acc, ACTIVATION, PTX)
    if C_TMA:
        if BATCHED_C:
            C.store([bid, off_m, off_n], acc.to(C.dtype).reshape(1, BM, BN))
        else:
            C.store([off_m, off_n], acc.to(C.dtype))
    else:
        c_ptrs = (C + bid.to(tl.int64) * stride_cb + offs_m.to(tl.int64)[:, None] * stride_cm
                  + offs_n.to(tl.int64)[None, :] * stride_cn)
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=inside)
