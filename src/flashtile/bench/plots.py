"""PNG plots of a results document: per mode, one subplot per group, TFLOP/s against x (or, for
suites whose layout says plot="bars", one group of bars per case).

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it
works headless and never disturbs a caller's own matplotlib state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from .report import MODE_ORDER, _providers, _speed


def _group_title(group: tuple[Any, ...], keys: list[str]) -> str:
    return " ".join(f"{k}={v}" for k, v in zip(keys, group)) or "all"


def _natural(group: tuple[Any, ...]) -> tuple[Any, ...]:
    """Numbers numerically (64 before 128), other labels as text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in group)


def _log2_axis(xs: list[float]) -> bool:
    """Powers of two spanning more than 4x read best on a log2 axis (S = 512 .. 16384)."""
    pos = [x for x in xs if x > 0]
    if len(pos) < 2 or max(pos) / min(pos) <= 4:
        return False
    return all(abs(math.log2(x) - round(math.log2(x))) < 1e-9 for x in pos)


def render_plots(doc: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write <suite>_<mode>.png for each mode present; return the paths."""
    if doc["suite"].get("plot") == "bars":
        return render_bars(doc, out_dir)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suite = doc["suite"]
    xkey, gkeys = suite["x"], list(suite.get("group", []))
    providers = _providers(doc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    modes = sorted({e["case"]["mode"] for e in doc["results"]}, key=lambda m: (MODE_ORDER + (m,)).index(m))
    for mode in modes:
        entries = [e for e in doc["results"] if e["case"]["mode"] == mode]
        groups = sorted({tuple(e["case"]["labels"].get(k) for k in gkeys) for e in entries}, key=_natural)
        # Columns follow the last group key (e.g. causal no / yes) when it has few values.
        last = {g[-1] for g in groups} if gkeys else set()
        ncols = len(last) if 1 <= len(last) <= 4 else min(3, len(groups))
        ncols = max(1, ncols)
        nrows = math.ceil(len(groups) / ncols)
        fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i, group in enumerate(groups):
            ax = axes[i // ncols][i % ncols]
            members = [e for e in entries if tuple(e["case"]["labels"].get(k) for k in gkeys) == group]
            xs_all = sorted({float(e["case"]["labels"][xkey]) for e in members})
            for idx, p in enumerate(providers):
                pts = sorted(
                    (float(e["case"]["labels"][xkey]), _speed(e["cells"].get(p)))
                    for e in members
                    if _speed(e["cells"].get(p)) is not None
                )
                if pts:
                    # A fixed colour per provider, so a missing line never recolours the others.
                    width = 2.5 if p == suite.get("subject") else 1.2
                    style = {"linewidth": width, "color": f"C{idx % 10}"}
                    marker = {"marker": "o"} if len(xs_all) <= 24 else {"marker": ".", "markersize": 3}
                    ax.plot([x for x, _ in pts], [y for _, y in pts], label=p, **marker, **style)
            if _log2_axis(xs_all):
                ax.set_xscale("log", base=2)
            if len(xs_all) <= 16:  # one labelled tick per measured x; a sweep keeps matplotlib's ticks
                ax.minorticks_off()
                ax.set_xticks(xs_all)
                ax.set_xticklabels([f"{x:g}" for x in xs_all], rotation=45 if len(xs_all) > 6 else 0)
            ax.set_title(_group_title(group, gkeys))
            ax.set_xlabel(xkey)
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        for j in range(len(groups), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        fig.suptitle(f"flashtile {suite['name']} suite, {mode}")
        path = out / f"{suite['name']}_{mode}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _tick(labels: Mapping[str, Any], keys: list[str]) -> str:
    """One bar group's label: values on their own lines, yes/no flags as "name=yes"."""
    return "\n".join(f"{k}={labels.get(k)}" if labels.get(k) in ("yes", "no") else str(labels.get(k)) for k in keys)


def render_bars(doc: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Per mode, one group of bars per case (TFLOP/s of each provider), for suites whose cases are
    not points on a numeric axis (the variants suite). Bars are labelled by the suite's group labels
    and x; a provider without a speed on a case has no bar there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suite = doc["suite"]
    group = list(suite.get("group", []))
    keys = group[:1] + [suite["x"]] + group[1:]  # e.g. variant, setting, causal
    providers = _providers(doc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    modes = sorted({e["case"]["mode"] for e in doc["results"]}, key=lambda m: (MODE_ORDER + (m,)).index(m))
    for mode in modes:
        entries = sorted((e for e in doc["results"] if e["case"]["mode"] == mode),
                         key=lambda e: _natural(tuple(e["case"]["labels"].get(k) for k in keys)))
        shown = [p for p in providers if any(_speed(e["cells"].get(p)) is not None for e in entries)]
        n = max(1, len(shown))
        width = 0.8 / n
        fig = Figure(figsize=(max(8.0, 1.1 * len(entries) + 2.0), 5.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for idx, p in enumerate(providers):
            if p not in shown:
                continue
            pos = shown.index(p)
            xs, ys = [], []
            for i, e in enumerate(entries):
                speed = _speed(e["cells"].get(p))
                if speed is not None:
                    xs.append(i - 0.4 + width * (pos + 0.5))
                    ys.append(speed)
            # A fixed colour per provider (its index among all providers), as in the line plots.
            edge = "black" if p == suite.get("subject") else "none"
            ax.bar(xs, ys, width, label=p, color=f"C{idx % 10}", edgecolor=edge)
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([_tick(e["case"]["labels"], keys) for e in entries], fontsize="small")
        ax.set_ylabel("TFLOP/s (visible work)")
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars vary in height
        fig.suptitle(f"flashtile {suite['name']} suite, {mode}")
        path = out / f"{suite['name']}_{mode}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
