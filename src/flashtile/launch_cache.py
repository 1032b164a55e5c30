"""Launch plans: a compiled Triton kernel bound to one argument signature, relaunched without the binder.

``kernel[grid](*args, **meta)`` spends about 25 us of host time per launch on an H200 host (Triton's
binder specialises every argument, builds a cache key and looks the kernel up), against about 11 us
for calling the compiled kernel directly. For a 2048^3 GEMM (28 us on the GPU) that host time is the
whole difference to cuBLAS. A launcher that knows which of its arguments can change between calls
with the same key (tensors, descriptors, float scalars) builds a plan on the first call and only
swaps those arguments afterwards.

The key is the launcher's job and must pin down everything Triton specialises on: the dtype and the
16-byte alignment of every pointer, every integer argument's value (or at least whether it is 1,
divisible by 16, or beyond 32 bits), and every constexpr. The GEMM launcher keys on the exact
integers; the attention launcher on specialization_key of every argument, so that a new dropout
seed or softmax scale replays the plan with the new value instead of making a new one.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

MAX_PLANS = 512  # per launcher; a workload with ever-changing shapes starts over instead of growing


class KernelPlan:
    """One compiled kernel, its grid and its full argument list with replaceable slots.

    ``slots``: (position, wrap) per argument that changes between calls, in the order launch() takes
    them; wrap is None (pass the value as is) or a function of the value (e.g. building a TMA
    descriptor of a new tensor with the plan's shape and block).
    """

    __slots__ = ("runner", "args", "slots")

    def __init__(self, compiled, grid: Tuple[int, ...], args: List[Any],
                 slots: Sequence[Tuple[int, Optional[Callable[[Any], Any]]]]):
        self.runner = direct_runner(compiled, grid)
        self.slots = tuple(slots)
        # every launch fills the slots: the template must not keep the first call's tensors alive
        filled = {pos for pos, _ in self.slots}
        self.args = [None if i in filled else a for i, a in enumerate(args)]

    def launch(self, *values) -> None:
        args = self.args.copy()
        for (pos, wrap), value in zip(self.slots, values):
            args[pos] = value if wrap is None else wrap(value)
        self.runner(*args)


def _hooks_idle(runtime) -> bool:
    """Whether no launch hook is installed: Triton 3.6 keeps them as HookChain objects (never None),
    empty unless a profiler such as proton adds one."""
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def direct_runner(compiled, grid: Tuple[int, ...]) -> Callable[..., None]:
    """``compiled[grid]`` without its per-launch lookups: the same C launch with the same arguments.

    Triton's runner finds the current device and its stream, builds launch metadata for the launch
    hooks (a dict per launch, since Triton 3.6's hook chains are never None), checks the scratch
    allocators and has the C launcher call two empty hook chains. A plan knows its device (its key
    pins it, and every launch runs under that device's context), so this runner only reads that
    device's current stream and calls the C launcher. It falls back to Triton's runner for a kernel
    that needs scratch memory and whenever a launch hook is installed (profilers see every launch)."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    runner = compiled[grid]  # also loads the kernel
    try:
        from triton import knobs

        launcher = compiled.run
        runtime = knobs.runtime
        c_launch = launcher.launch
        fixed = (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                 compiled.packed_metadata, None, None, None)  # the C launcher's order after grid and stream
        needs_scratch = launcher.global_scratch_size > 0 or launcher.profile_scratch_size > 0
        raw_stream = torch._C._cuda_getCurrentRawStream
        device = torch.cuda.current_device()
    except Exception:  # not Triton 3.6's CUDA launcher (a fake, another version): the public runner
        return runner
    if needs_scratch:
        return runner

    def launch(*args) -> None:
        if not _hooks_idle(runtime):
            runner(*args)
            return
        c_launch(*grid, raw_stream(device), *fixed, *args)

    return launch


class PlanCache:
    """Plans of one kernel by launcher-defined key."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.plans: Dict[Hashable, KernelPlan] = {}

    def get(self, key: Hashable) -> Optional[KernelPlan]:
        return self.plans.get(key)

    def launch_and_plan(self, key: Hashable, grid: Tuple[int, ...], args: Sequence[Any], meta: Dict[str, Any],
                        slots: Optional[Sequence[Tuple[int, Optional[Callable[[Any], Any]]]]] = None) -> None:
        """Launch through Triton's front door; keep a plan when Triton hands back a compiled kernel
        (it does not under the interpreter, which then always takes this path).

        slots None: every positional argument is replaceable (runtime_slots; the key then pins their
        specialisation, as specialization_key does)."""
        compiled = self.kernel[grid](*args, **meta)
        if not hasattr(compiled, "function") or not hasattr(compiled, "__getitem__"):
            return
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
        if slots is None:
            slots = runtime_slots(self.kernel)
        self.plans[key] = KernelPlan(compiled, grid, full_arguments(self.kernel, args, meta), slots)


def specialization_key(args: Sequence[Any]) -> Tuple[Any, ...]:
    """What Triton's binder specialises a kernel on, per positional argument, so that one key means one
    compiled kernel whatever the values: a tensor's dtype and 16-byte alignment; an int's width
    (i32 / i64 / u64), whether it is 1 (a constant then) and whether 16 divides it; a float's type
    (floats are never specialised); any other value (None, bool, str) as itself."""
    key = []
    for a in args:
        kind = type(a)
        if kind is int:
            key.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63))
        elif kind is float:
            key.append(float)
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            key.append((kind, a))
    return tuple(key)


def runtime_slots(kernel) -> List[Tuple[int, None]]:
    """Slots for every non-constexpr parameter of ``kernel``, in order: a plan whose key is
    specialization_key of all positional arguments can replace each of them."""
    return [(i, None) for i, p in enumerate(kernel.params) if not p.is_constexpr]


def full_arguments(kernel, args: Sequence[Any], meta: Dict[str, Any]) -> List[Any]:
    """Every parameter of ``kernel`` in order (constexprs included), as the compiled kernel takes them."""
    positional = iter(args)
    out = []
    for p in kernel.params:
        out.append(meta[p.name] if p.is_constexpr else next(positional))
    return out
