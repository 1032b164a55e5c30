"""Launch plans (launch_cache.py): argument order, slot substitution, and GEMM and attention calls
that hit a plan.

On a GPU the repeated ft.gemm / flash_attn_func calls below run through KernelPlan (the first call
of each signature builds it); under the interpreter every call takes Triton's front door, so the
fakes check the plan logic itself.
"""

import pytest
import torch

import flashtile as ft
from flashtile import attention_launch, gemm_launch
from flashtile.gemm import gemm_torch
from flashtile.launch_cache import KernelPlan, full_arguments, specialization_key
from conftest import DEVICE, HAS_GPU
from test_attention import check_against_oracle
from test_gemm import _close, _lowprec


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _FakeKernel:
    params = [_Param("X", False), _Param("BLOCK", True), _Param("n", False), _Param("FLAG", True)]


class _FakeCompiled:
    function = object()

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args: self.calls.append((grid, args))


def test_full_arguments_interleaves_constexprs_in_parameter_order():
    assert full_arguments(_FakeKernel, ("x", 7), dict(BLOCK=64, FLAG=True)) == ["x", 64, 7, True]


def test_plan_swaps_only_its_slots():
    compiled = _FakeCompiled()
    plan = KernelPlan(compiled, (5,), ["x", 64, 7, True], [(0, None), (2, lambda v: v * 10)])
    plan.launch("y", 3)
    plan.launch("z", 4)
    assert compiled.calls == [((5, 1, 1), ("y", 64, 30, True)), ((5, 1, 1), ("z", 64, 40, True))]
    assert plan.args == [None, 64, None, True]  # the template is not modified and holds no slot value


def test_alpha_sits_where_the_plan_swaps_it():
    a = torch.randn(40, 24, device=DEVICE)
    b = torch.randn(24, 16, device=DEVICE)
    out = torch.empty(40, 16, device=DEVICE)
    _, args, _ = gemm_launch.launch_args(gemm_launch._mat2(a, 40, 24), gemm_launch._mat2(b, 24, 16),
                                         gemm_launch._mat2(out, 40, 16), None, None, 0.25, 0, None)
    assert args[gemm_launch.ALPHA_ARG] == 0.25 and isinstance(args[gemm_launch.ALPHA_ARG], float)
    assert args[3] is out and args[4] is out  # no bias, no pre-activation: out stands in


def _misaligned(rows, cols, dtype):
    """A [rows, cols] tensor whose data pointer is 2 bytes off a 16-byte boundary."""
    flat = torch.randn(rows * cols + 8, device=DEVICE).to(dtype)
    return flat[1:1 + rows * cols].view(rows, cols)


def test_repeated_calls_with_one_signature_use_fresh_data():
    """Same shapes and strides, new tensors, alpha and bias each call; aligned and misaligned pointers
    (a different key: TMA descriptors against pointer loads) alternate. alpha == 1 compiles another
    kernel (ALPHA_ONE: the bias vector starts the accumulator), so alpha goes 1 -> 0.5 -> 1 -> 2.5 on
    each key: a plan of one replayed for the other would be wrong."""
    dtype = torch.float16 if not HAS_GPU else torch.bfloat16
    M, N, K = (300, 264, 136) if HAS_GPU else (40, 24, 32)
    with ft.use_backend("triton"):
        for step, alpha in enumerate((1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 2.5, 2.5)):
            a = _misaligned(M, K, dtype) if step % 2 else torch.randn(M, K, device=DEVICE).to(dtype)
            b = torch.randn(K, N, device=DEVICE).to(dtype)
            bias = torch.randn(N, device=DEVICE).to(dtype)
            out = ft.gemm(a, b, bias, alpha=alpha, activation="relu")
            ref = gemm_torch(a.double(), b.double(), bias.double(), alpha, "relu", torch.float64)
            _close(f"step {step}", out, ref, _lowprec(a, b, bias, alpha, "relu", dtype), 2)  # test_gemm's rule


def test_specialization_key_separates_what_triton_compiles_apart():
    """One key per Triton specialisation: ints by width, == 1 and divisibility by 16 (not by value),
    tensors by dtype and 16-byte alignment, floats never; bools and None as themselves."""
    key = lambda *a: specialization_key(a)
    assert key(3) == key(5) != key(1) and key(32) == key(48) != key(40)
    assert key(2**31) != key(2**31 - 17) and key(2**63) != key(2**62 + 1)
    assert key(0.5) == key(2.0) and key(True) != key(1) and key(True) != key(False) and key(None) != key(0)
    x = torch.randn(64)
    assert key(x) == key(torch.randn(8)) != key(x[1:]) and key(x[4:]) == key(x) != key(x.half())


def _qkv(seed, B=2, S=77, H=3, D=40, dtype=torch.float32, heads_first=False):
    """q, k, v [B, S, H, D]; heads_first: q is a view of [B, H, S, D] storage (other strides)."""
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(B, S, H, D, generator=g).to(device=DEVICE, dtype=dtype)
    q = make()
    if heads_first:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    return [t.requires_grad_() for t in (q, make(), make())]


@pytest.mark.parametrize("causal", [False, True])
def test_repeated_attention_steps_use_fresh_data(causal):
    """Forward + backward four times on one shape with new tensors, a new softmax scale and, every
    other step, q's strides of heads-first storage. D=64: the rows reach the kernels without
    row_align's copy, and both layouts' strides are multiples of 16, so they share one plan key and
    the replayed plan must take the new strides. Each step matches the oracle."""
    dtype = torch.bfloat16 if HAS_GPU else torch.float32
    with ft.use_backend("triton"):
        for step, scale in enumerate((0.2, 0.2, 0.35, 0.35)):
            q, k, v = _qkv(step, D=64, dtype=dtype, heads_first=step % 2 == 1)
            check_against_oracle(q, k, v, softmax_scale=scale, causal=causal)


def test_repeated_dropout_calls_draw_each_calls_seed():
    """Dropout seeds change every call while the key stays: a replayed plan must pass the new seed.
    The second seed's result equals a launch through Triton's front door with that seed, exactly."""
    q, k, v = (t.detach() for t in _qkv(7, dtype=torch.float16 if HAS_GPU else torch.float32))
    run = lambda seed: (torch.manual_seed(seed), ft.flash_attn_func(q, k, v, dropout_p=0.3, causal=True))[1]
    with ft.use_backend("triton"):
        first, second = run(1), run(2)
        attention_launch._PLANS.clear()
        fresh = run(2)
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh)
