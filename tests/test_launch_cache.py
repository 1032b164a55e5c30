"""Launch plans (launch_cache.py): argument order, slot substitution, and GEMM and attention calls
that hit a plan.

On a GPU the repeated ft.gemm / flash_attn_func calls below run through KernelPlan (the first call
of each signature builds it); under the interpreter every call takes Triton's front door, so the
fakes check the plan logic itself.
"""

import dataclasses

import pytest
import torch

import flashtile as ft
from flashtile import attention_launch, gemm_launch, tuning
from flashtile.gemm import gemm_torch
from flashtile.launch_cache import KernelPlan, direct_runner, full_arguments, runtime_slots, specialization_key
from flashtile.launch_recipe import MISSING, RecipeCache, aliases, capture
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


class _FakeLauncher:
    """Triton 3.6's CudaLauncher as direct_runner reads it: flags, scratch sizes, the C launch."""
    launch_cooperative_grid, launch_pdl = False, True
    global_scratch_size = profile_scratch_size = 0

    def __init__(self):
        self.calls = []

    def launch(self, *args):
        self.calls.append(args)


class _FakeCudaCompiled(_FakeCompiled):
    packed_metadata = (4, 1, 0)

    def __init__(self):
        super().__init__()
        self.run = _FakeLauncher()


def test_direct_runner_passes_what_tritons_runner_passes(monkeypatch):
    """The C launcher's arguments in its order: grid, the plan device's current stream, function,
    cooperative / PDL flags, no scratch, packed metadata, no launch metadata and no hooks, then the
    kernel's. An installed launch hook (a profiler's) and a kernel that needs scratch memory go
    through Triton's own runner."""
    from triton import knobs

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1000 + device, raising=False)
    compiled = _FakeCudaCompiled()
    run = direct_runner(compiled, (5, 2))
    run("x", 7)
    assert compiled.run.calls == [(5, 2, 1, 1003, compiled.function, False, True, None, None, (4, 1, 0),
                                   None, None, None, "x", 7)]
    assert compiled.calls == []
    hook = lambda metadata: None
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        run("y", 8)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert compiled.calls == [((5, 2, 1), ("y", 8))] and len(compiled.run.calls) == 1
    scratch = _FakeCudaCompiled()
    scratch.run.global_scratch_size = 128
    direct_runner(scratch, (4,))("z")
    assert scratch.calls == [((4, 1, 1), ("z",))] and scratch.run.calls == []


@pytest.mark.skipif(not HAS_GPU, reason="plans are built from compiled kernels (none under the interpreter)")
def test_planned_launches_reach_a_launch_hook():
    """A profiler's launch hook sees a launch that replays a plan, and the result is still right."""
    from triton import knobs

    a, b = (torch.randn(72, 40, device=DEVICE), torch.randn(40, 56, device=DEVICE))
    ft.gemm(a, b)  # builds the plan
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # a LazyDict
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        out = ft.gemm(a, b)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert seen == ["gemm_kernel"]
    _close("hooked", out, gemm_torch(a.double(), b.double(), None, 1.0, None, torch.float64),
           _lowprec(a, b, None, 1.0, None, torch.float32), 2)


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
        attention_launch._RECIPES.clear()
        fresh = run(2)
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh)


class _RecipeKernel:
    params = [_Param("Q", False), _Param("Out", False), _Param("stride", False), _Param("BLOCK", True),
              _Param("softmax_scale", False), _Param("Dummy", False)]


def _recipe_plan(compiled):
    full = full_arguments(_RecipeKernel, ("q0", "o0", 7, 0.5, "q0"), dict(BLOCK=64))
    return KernelPlan(compiled, (3,), full, runtime_slots(_RecipeKernel))


def test_capture_replays_by_role_and_keeps_what_the_key_fixes():
    """Tensors go by role (a dummy that is a role's tensor follows that role), named scalars by role,
    the stride stays in the template."""
    compiled = _FakeCompiled()
    q, out = torch.zeros(2), torch.zeros(2)
    launch = capture(_RecipeKernel, _recipe_plan(compiled), (q, out, 7, 0.5, q), (q, out, None),
                     {"softmax_scale": 3})
    q2, out2 = torch.ones(2), torch.ones(2)
    launch((q2, out2, None, 0.25))
    (grid, args), = compiled.calls
    assert grid == (3, 1, 1) and args[0] is q2 and args[1] is out2 and args[5] is q2
    assert args[2:5] == (7, 64, 0.25)


def test_capture_refuses_a_tensor_of_no_role():
    """A tensor of no role (a copy the launcher made) gives no recipe, and the cache remembers that the
    key has none. A tensor in two roles maps to the first (the key pins the aliasing: aliases)."""
    compiled = _FakeCompiled()
    plan = _recipe_plan(compiled)
    q, out = torch.zeros(2), torch.zeros(2)
    assert capture(_RecipeKernel, plan, (q, out.clone(), 7, 0.5, q), (q, out), {}) is None
    shared = capture(_RecipeKernel, plan, (q, out, 7, 0.5, q), (q, q, out), {})
    assert [role for _, role in shared.subs] == [0, 2, 0]
    assert aliases((q, out, q)) == (0, 1, 0) and aliases((q, out)) is None
    cache = RecipeCache()
    assert cache.get("k") is MISSING
    cache.put("k", [None])
    assert cache.get("k") is None
    cache.put("k2", None)
    assert cache.get("k2") is None


_RECIPE_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window-softcap": dict(window_size=(13, 4), softcap="varies"),
    "alibi": dict(alibi_slopes="varies", causal=True),
    "dropout": dict(dropout_p=0.2),
    "gqa": dict(heads_kv=1, causal=True),  # few kv heads: per-query-head partials summed after the launch
    "q-is-k": dict(q_is_k=True),
    # a new mask each call, with a different number of partial blocks (the key holds their tile shape only)
    "block-mask": dict(block_mask="element"),
    "block-mask-causal": dict(block_mask="element", causal=True),
    # with GQA: at this size the backward writes per-query-head partials (no recipe); the forward replays
    "block-mask-full-blocks": dict(block_mask="blocks", heads_kv=2),
    # step 0: an element mask whose partial blocks the causal rule explains, so no block stays partial
    # and the kernels compile without their partial-list loops (BLOCK_SPARSE 2); steps 1 and 2 keep
    # partial blocks, with the same list shapes: another key (it holds whether the mask has partial
    # blocks), or a replay of step 0's recipe would skip them
    "block-mask-partials-appear": dict(block_mask="causal-then-element", causal=True),
}


def _random_block_mask(kind: str, g: torch.Generator, B: int, H: int, S: int, step: int):
    """A mask of 32 x 32 blocks over S x S keeping the diagonal (no fully masked row): element-wise
    random with density 0.3 + 0.2 * step, or whole blocks at random ("blocks", no partial blocks);
    "causal-then-element": the causal mask as an element mask at step 0, element-wise random after."""
    n = -(-S // 32)
    if kind == "causal-then-element" and step == 0:
        # causal, with one off-diagonal block hidden in some heads so that the lists keep a row per
        # head, as the later steps' masks do (the same list shapes: only the partial blocks differ)
        causal = torch.ones(S, S, dtype=torch.bool).tril().repeat(1, H, 1, 1)
        causal[0, 1, 64:, :32] = False
        causal[0, 2, 32:64, :32] = False
        return ft.BlockMask.from_dense(causal.to(DEVICE), block_size=32)
    if kind == "blocks":
        blocks = (torch.rand(B, H, n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
        return ft.BlockMask.from_blocks(blocks.to(DEVICE), block_size=32, seqlen_q=S, seqlen_k=S)
    dense = (torch.rand(1, H, S, S, generator=g) < 0.3 + 0.2 * step) | torch.eye(S, dtype=torch.bool)
    return ft.BlockMask.from_dense(dense.to(DEVICE), block_size=32)


def _check_replays(call, steps: int, recipes: int):
    """call(step) -> (out, lse, *grads) for `steps` calls of one signature: each equals, bit for bit,
    the same call made again after the launch caches are cleared (Triton's front door and the
    launcher's full path). On a GPU `recipes` recipes must have been made (so later calls replayed
    them); under the interpreter Triton makes no plans, so there are none and only the full path runs."""
    with ft.use_backend("triton"):
        attention_launch._RECIPES.clear()
        replayed = [call(step) for step in range(steps)]
        made = [r for r in attention_launch._RECIPES.recipes.values() if r is not None]
        if HAS_GPU:
            assert len(made) == recipes
        fresh = []
        for step in range(steps):
            attention_launch._PLANS.clear()
            attention_launch._RECIPES.clear()
            fresh.append(call(step))
    for step, (got, want) in enumerate(zip(replayed, fresh)):
        assert len(got) == len(want)
        for name, a, b in zip(("out", "lse", "d1", "d2", "d3"), got, want):
            assert torch.equal(a, b), f"step {step}: {name} differs from the full launch path"
    assert not torch.equal(replayed[-2][0], replayed[-1][0])  # new data each call


@pytest.mark.parametrize("case", list(_RECIPE_CASES), ids=list(_RECIPE_CASES))
def test_recipe_replays_are_the_full_launch(case):
    """Three forward + backward calls of one signature with new tensors and new per-call scalars
    (softmax scale, softcap, slopes' values, dropout seed) and new block masks; see _check_replays."""
    opts = dict(_RECIPE_CASES[case])
    B, S, H, D = 2, 67, 4, 64
    dtype = torch.bfloat16 if HAS_GPU else torch.float32
    hkv = opts.pop("heads_kv", H)
    q_is_k = opts.pop("q_is_k", False)

    def call(step):
        g = torch.Generator().manual_seed(100 + step)
        make = lambda h: torch.randn(B, S, h, D, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_()
        q, k, v = make(H), make(hkv), make(hkv)
        if q_is_k and step > 0:  # replays the recipe of step 0's distinct tensors with one tensor twice
            k = q
        kw = dict(opts, softmax_scale=0.1 + 0.05 * step)
        if kw.get("softcap") == "varies":
            kw["softcap"] = 2.0 + step
        if kw.get("alibi_slopes") == "varies":
            kw["alibi_slopes"] = (torch.rand(H, generator=g) * (step + 1)).to(DEVICE)
        if "block_mask" in kw:
            kw["block_mask"] = _random_block_mask(kw["block_mask"], g, B, H, S, step)
        dout = torch.randn(B, S, H, D, generator=g).to(device=DEVICE, dtype=dtype)
        torch.manual_seed(step)  # dropout's seed
        out, lse, _ = ft.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        inputs = (q, v) if k is q else (q, k, v)
        return (out, lse, *torch.autograd.grad(out, inputs, dout))

    # one recipe for the forward, one for the backward (not GQA's expanded backward: see _RECIPE_CASES);
    # q is k from step 1 on: another key (aliases), whose recipes step 2 replays; so do partial blocks
    # that appear from step 1 on
    new_key = q_is_k or opts.get("block_mask") == "causal-then-element"
    _check_replays(call, 3, 1 if hkv < H else 4 if new_key else 2)


_CONSTANT_CASES = {
    "plain": dict(),
    "causal-gqa": dict(causal=True, heads_kv=2),
    "window-softcap": dict(window_size=(9, 3), softcap=4.0),
    "block-mask": dict(block_mask="element"),
}


@pytest.mark.parametrize("shape", [(67, 45, 64), (80, 48, 128)], ids=["odd", "aligned"])
@pytest.mark.parametrize("case", list(_CONSTANT_CASES), ids=list(_CONSTANT_CASES))
def test_backward_lengths_become_constants_on_repeat(case, shape, monkeypatch):
    """From a signature's second call the dK/dV kernel gets the sequence lengths as compile-time
    constants (attention_launch.constant_lengths), here for every case's config (the tuning table turns
    them on only where measured faster). Odd lengths, so the masked tail tiles run with them too; a
    query length that is a multiple of 16 at D=128, so the aligned lse / delta loads (ALIGN_LSE in
    kernels/attention_bwd.py, asked for here in every case, as the constants are) run too.
    Every call's gradients must equal, bit for bit, the same calls with the constants never turned on;
    on a GPU the third call replays the rebuilt (constant) recipe."""
    opts = dict(_CONSTANT_CASES[case])
    B, H = 2, 4
    Sq, Sk, D = shape
    hkv = opts.pop("heads_kv", H)
    dtype = torch.bfloat16 if HAS_GPU else torch.float32
    tuned = attention_launch.backward_config
    monkeypatch.setattr(attention_launch, "backward_config",
                        lambda *a, **kw: dataclasses.replace(tuned(*a, **kw), constant_lengths=True, aligned_rows=True))

    def run():
        for state in (attention_launch._CALLS, attention_launch._CONSTANT_SHAPES):
            state.clear()
        attention_launch._RECIPES.clear()
        grads = []
        for step in range(3):
            g = torch.Generator().manual_seed(400 + step)
            make = lambda s, h: torch.randn(B, s, h, D, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_()
            q, k, v = make(Sq, H), make(Sk, hkv), make(Sk, hkv)
            kw = dict(opts)
            if "block_mask" in kw:
                n_q, n_k = -(-Sq // 32), -(-Sk // 32)
                dense = (torch.rand(1, H, Sq, Sk, generator=g) < 0.6) | (torch.arange(Sk) < 3)
                kw["block_mask"] = ft.BlockMask.from_dense(dense.to(DEVICE), block_size=32)
                assert kw["block_mask"].num_blocks == (n_q, n_k)
            out = ft.flash_attn_func(q, k, v, **kw)
            grads.append(torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g).to(DEVICE, dtype)))
            if step == 0:
                assert not attention_launch._CONSTANT_SHAPES
        return grads, set(attention_launch._CONSTANT_SHAPES), len([r for r in attention_launch._RECIPES.recipes.values() if r])

    with ft.use_backend("triton"):
        with_constants, shapes, recipes = run()
        assert shapes == {(Sq, Sk)}  # the backward's lengths, from its second call
        if HAS_GPU:  # the dK/dV launch compiled with the lengths (its plans' constexprs hold them)
            plans = attention_launch._PLANS[attention_launch.attention_bwd_dkdv_kernel].plans
            assert any(("SEQLEN_Q", Sq) in key[3] and ("SEQLEN_K", Sk) in key[3] for key in plans)
            if hkv == H:  # (GQA at this size writes per-query-head partials: no backward recipe)
                assert recipes == 2
        monkeypatch.setattr(attention_launch, "CONSTANT_LENGTHS_FROM_CALL", 10**9)
        without, no_shapes, _ = run()
        assert not no_shapes
    for step, (a, b) in enumerate(zip(with_constants, without)):
        for name, x, y in zip(("dq", "dk", "dv"), a, b):
            assert torch.equal(x, y), f"call {step}: {name} differs with the lengths as constants"


def test_constant_lengths_follow_the_config_and_the_shape_budget(monkeypatch):
    """Constants need a repeated signature and a config that asks for them; after MAX_CONSTANT_SHAPES
    length pairs, new pairs keep the run-time lengths (a loop with changing lengths stops compiling) while
    the pairs already compiled keep theirs."""
    monkeypatch.setattr(attention_launch, "_CONSTANT_SHAPES", set())
    monkeypatch.setattr(attention_launch, "MAX_CONSTANT_SHAPES", 3)
    tile = tuning.KernelConfig(64, 64, 4, 2)
    asks = tuning.BackwardConfig(tile, tile, constant_lengths=True)
    plain = tuning.BackwardConfig(tile, tile)
    assert not attention_launch.constant_lengths(True, plain, 100, 100)
    assert not attention_launch.constant_lengths(False, asks, 100, 100)
    assert [attention_launch.constant_lengths(True, asks, s, 7) for s in (1, 2, 3, 4)] == [True, True, True, False]
    assert attention_launch.constant_lengths(True, asks, 2, 7)
    assert attention_launch._CONSTANT_SHAPES == {(1, 7), (2, 7), (3, 7)}


def test_constant_lengths_only_where_the_tuning_table_measured_them(monkeypatch):
    """tuning.dkdv_constant_lengths on an H200 (sm_90): the configs measured faster take the lengths
    as constants, the ones measured slower and the unmeasured ones (fp32, D=256, block masks at D=64,
    no GPU) do not."""
    from flashtile.tuning import backward_config
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr("flashtile.tuning._arch", lambda device: (9, 0))
    bf16 = lambda *a, **kw: backward_config(gpu, 128, 128, torch.bfloat16, *a, **kw).constant_lengths
    assert bf16(False) and bf16(False, softcap=True) and bf16(True, short_walk=True)
    assert bf16(True, softcap=True) and bf16(True, long_causal=True, grouped=True)
    assert bf16(False, block_sparse=True) and bf16(True, block_sparse=True, partial_blocks=True)
    assert not bf16(True)  # 64x128 w8: causal beyond 1024 keys, windows
    assert bf16(True, long_causal=True)  # split phases (with the aligned lse / delta rows they bring)
    # dropout (since its keep mask needs no layout conversion in the dK/dV loop): every config, causal
    # on 64x64 w4 tiles in one loop (one 128-column chunk) or 32x64 w4 (D = 96: 64 + 32 columns)
    assert bf16(False, dropout=True) and bf16(True, dropout=True) and bf16(True, long_causal=True, dropout=True)
    assert bf16(False, dropout=True, block_sparse=True)
    causal_dropout = backward_config(gpu, 128, 128, torch.bfloat16, True, long_causal=True, dropout=True)
    assert (causal_dropout.dkdv.block_m, causal_dropout.dkdv.block_n, causal_dropout.dkdv.num_warps) == (64, 64, 4)
    assert not causal_dropout.split_phases
    d96 = backward_config(gpu, 96, 96, torch.bfloat16, True, long_causal=True, dropout=True)
    assert (d96.dkdv.block_m, d96.dkdv.block_n, d96.dkdv.num_warps) == (32, 64, 4) and d96.constant_lengths
    # D <= 64: non-causal calls on the plain 32x128 w4 tiles and dropout (on 64x64 w4 tiles); causal
    # calls and block masks do not
    d64 = lambda *a, **kw: backward_config(gpu, 64, 64, torch.bfloat16, *a, **kw)
    assert d64(False).constant_lengths and d64(False, softcap=True).constant_lengths
    assert d64(True, dropout=True).constant_lengths and not d64(True).constant_lengths
    assert (d64(False, dropout=True).dkdv.block_m, d64(False, dropout=True).dkdv.block_n) == (64, 64)
    assert not d64(False, block_sparse=True).constant_lengths
    assert not backward_config(gpu, 128, 128, torch.float32, False).constant_lengths
    assert not backward_config(gpu, 256, 256, torch.bfloat16, False).constant_lengths
    # with the constants, lse / delta as aligned rows (tuning.dkdv_aligned_rows): not at D <= 64 or on
    # block masks without partial blocks, where that measured slower; dropout gains since its row keys
    aligned = lambda *a, **kw: backward_config(gpu, 128, 128, torch.bfloat16, *a, **kw).aligned_rows
    assert aligned(False) and aligned(True, long_causal=True) and aligned(True, block_sparse=True, partial_blocks=True)
    assert not aligned(True)  # no constants there
    assert not aligned(False, block_sparse=True) and aligned(False, dropout=True) and aligned(True, dropout=True)
    assert not d64(False).aligned_rows and d64(False).constant_lengths
    monkeypatch.setattr("flashtile.tuning._arch", lambda device: None)
    assert not backward_config(torch.device("cpu"), 128, 128, torch.bfloat16, False).constant_lengths


@pytest.mark.skipif(not HAS_GPU, reason="the replayed GQA backward needs enough kv-head programs for a GPU")
def test_block_mask_recipe_replays_with_gqa_summed_in_registers():
    """GQA with a block mask at a size where dK/dV sums each kv head's group in registers: the
    backward's recipe rebuilds the key-tile program order over the group (heads_per_program > 1) for
    each call's new mask. Two recipes (forward and backward) must exist, so the test fails if this
    size ever takes the expanded path, which makes no backward recipe."""
    B, S, H, Hkv, D = 4, 4096, 8, 4, 64

    def call(step):
        g = torch.Generator().manual_seed(300 + step)
        make = lambda h: torch.randn(B, S, h, D, generator=g).to(device=DEVICE, dtype=torch.bfloat16).requires_grad_()
        q, k, v = make(H), make(Hkv), make(Hkv)
        n = S // 128
        blocks = (torch.rand(B, H, n, n, generator=g) < 0.3) | torch.eye(n, dtype=torch.bool)
        mask = ft.BlockMask.from_blocks(blocks.to(DEVICE), block_size=128, seqlen_q=S, seqlen_k=S)
        dout = torch.randn(B, S, H, D, generator=g).to(device=DEVICE, dtype=torch.bfloat16)
        out, lse, _ = ft.flash_attn_func(q, k, v, causal=True, block_mask=mask, softmax_scale=0.1 + 0.02 * step,
                                         return_attn_probs=True)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    _check_replays(call, 3, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_recipe_replays_take_each_calls_cu_seqlens(causal):
    """Packed calls with the same total, batch and max lengths share a signature, but their sequence
    boundaries differ: a replayed recipe must read the new cu_seqlens (and new tensors, scale, seed).
    One cu_seqlens for queries and keys, as self-attention passes them (two roles, one tensor)."""
    H, D = 3, 64
    dtype = torch.bfloat16 if HAS_GPU else torch.float32
    lengths = ([30, 17, 53], [53, 40, 7], [1, 53, 46])  # total 100, max 53 each time

    def call(step):
        g = torch.Generator().manual_seed(200 + step)
        cu = torch.tensor([0, *torch.tensor(lengths[step]).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        make = lambda: torch.randn(100, H, D, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_()
        q, k, v = make(), make(), make()
        dout = torch.randn(100, H, D, generator=g).to(device=DEVICE, dtype=dtype)
        torch.manual_seed(step)
        out, lse, _ = ft.flash_attn_varlen_func(q, k, v, cu, cu, 53, 53, dropout_p=0.1 * (step % 2),
                                                softmax_scale=0.2 + 0.01 * step, causal=causal,
                                                return_attn_probs=True)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    # steps 0 and 2 (no dropout) share one forward and one backward recipe, step 1 (dropout) its own pair
    _check_replays(call, 3, 4)
