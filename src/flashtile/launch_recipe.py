"""Launch recipes: the whole launch sequence of one attention call signature, replayed without the launcher.

A launch plan (launch_cache.py) skips Triton's binder, but the launcher's own Python still runs on
every call: row alignment and key-layout checks, the config table, the flags, the argument tuple and
the plan's specialisation key. For a short training step that is about a third of the host time, and
the GPU waits for it (docs/perf_notes.md, sessions 10 and 12). A recipe is what is left once all of
that is decided: per kernel launch, the compiled kernel's runner, its full argument list with every
value that the call signature fixes (strides, sizes, flags, constexprs), and the positions that take
this call's tensors and scalars.

The launcher keys a recipe on everything its decisions read: shapes, strides, dtypes, device, the
16-byte alignment of each input pointer, the mask edges, which features are on, dropout's p, and the
tf32 setting, and which roles share one tensor (cu_seqlens_q is cu_seqlens_k in self-attention). It
builds a recipe only from a launch that ran on the call's own tensors (no alignment or layout copy in
between), so that replaying it with new tensors in the same roles is the launch the launcher would
have made.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from flashtile.launch_cache import MAX_PLANS, KernelPlan


class RecipeLaunch:
    """One kernel launch of a recipe: runner(*args) with args[pos] = values[role] for each (pos, role)."""

    __slots__ = ("runner", "template", "subs", "tile")

    def __init__(self, runner, template: List[Any], subs: Sequence[Tuple[int, int]], tile: Any = None):
        self.runner = runner
        self.template = template
        self.subs = tuple(subs)
        self.tile = tile  # what the launcher needs to rebuild a role's value (attention: the tiles that ran)

    def __call__(self, values: Sequence[Any]) -> None:
        args = self.template.copy()
        for pos, role in self.subs:
            args[pos] = values[role]
        self.runner(*args)


def capture(kernel, plan: KernelPlan, runtime_args: Sequence[Any], roles: Sequence[Any],
            scalar_roles: Dict[str, int], tile: Any = None) -> Optional[RecipeLaunch]:
    """The recipe launch of one planned launch, or None when it cannot be replayed by role.

    runtime_args: the values passed to plan.launch (one per plan slot); roles: the call's tensors by
    role index (None for an absent optional tensor); scalar_roles: kernel parameter name -> role index
    of the per-call scalars (softmax scale, softcap, dropout seeds). Any other non-tensor value is fixed
    by the recipe's key and kept in the template; a tensor must be one of the roles. A tensor in several
    roles maps to the first: the key pins which roles share a tensor (aliases), so every call that
    replays the recipe passes one tensor in those roles too. tile: kept on the launch for the caller
    (RecipeLaunch.tile)."""
    template = list(plan.args)
    subs = []
    for (pos, wrap), value in zip(plan.slots, runtime_args):
        if wrap is not None:
            return None
        name = kernel.params[pos].name
        if name in scalar_roles:
            subs.append((pos, scalar_roles[name]))
        elif isinstance(value, torch.Tensor):
            role = next((i for i, t in enumerate(roles) if t is value), None)
            if role is None:  # a copy or a buffer the launcher made: not replayable by role
                return None
            subs.append((pos, role))
        else:
            template[pos] = value
    return RecipeLaunch(plan.runner, template, subs, tile)


MISSING = object()  # RecipeCache.get of a key never seen


class RecipeCache:
    """Recipes by call-signature key. A key whose call cannot be replayed maps to None (the launcher
    then runs its full path without trying to build a recipe again)."""

    def __init__(self):
        self.recipes: Dict[Hashable, Optional[Tuple[RecipeLaunch, ...]]] = {}

    def get(self, key: Hashable):
        """The recipe (a tuple of launches), None (not replayable), or MISSING."""
        return self.recipes.get(key, MISSING)

    def put(self, key: Hashable, launches: Optional[Sequence[Optional[RecipeLaunch]]]) -> None:
        if len(self.recipes) >= MAX_PLANS:
            self.recipes.clear()
        ok = launches is not None and all(x is not None for x in launches)
        self.recipes[key] = tuple(launches) if ok else None

    def clear(self) -> None:
        self.recipes.clear()


def aliases(tensors) -> object:
    """Which of the call's tensors are one object, for a recipe's key: None when all are distinct (the
    usual case, one set build), else each position's first position holding the same object."""
    if len({id(t) for t in tensors}) == len(tensors):
        return None
    return tuple(next(j for j, u in enumerate(tensors) if u is t) for t in tensors)
