"""Results documents: JSON on disk, merging several runs, and the markdown table.

A results document is plain JSON so BENCHMARKS.md can always be rebuilt from files:

    {
      "format": "flashtile-bench/1",
      "suite": {name, description, x, group, subject, ratio_peers},
      "runs": [{date, device, torch, triton, cudnn, python, ...}, ...],
      "results": [{"case": Case.to_dict(), "cells": {provider: cell}}, ...]
    }

A cell is {"status", "median_ms", "tflops", "reason", "check", "reference", "date"} with status
"ok" (validated and timed), "unchecked" (timed, but no reference ran), "wrong" (failed validation,
never timed), "error" (raised: unsupported, out of memory, compile error) or "skipped" (the suite
chose not to run it). Only "ok" and "unchecked" carry a speed. A cell whose provider solves another
problem than the case (the variants suite's flashtile_dense) also records the "flops" its TFLOP/s
use, and names the reference it was checked against (e.g. "torch_ref (dense)").

A suite layout may name a "baseline" provider (the subject on the dense problem): it is left out of
"vs best" and gets the columns "vs <baseline_label>" and "time / dense"; "notes" add header lines,
"targets" add a Targets section (goal met or not per mode).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

FORMAT = "flashtile-bench/1"
TIMED = ("ok", "unchecked")
MODE_ORDER = ("fwd", "fwd_bwd")


# ----------------------------------------------------------------------------------------------
# Documents


def new_document(suite_layout: Mapping[str, Any]) -> dict[str, Any]:
    """An empty results document for a suite (see :meth:`Suite.layout`)."""
    return {"format": FORMAT, "suite": dict(suite_layout), "runs": [], "results": []}


def add_cells(doc: dict[str, Any], case: Mapping[str, Any], cells: Mapping[str, Mapping[str, Any]]) -> None:
    """Record cells for a case (a Case.to_dict()); a new cell replaces the same provider's old one.

    Merging per cell lets a rerun of one provider (say, flashtile after a kernel fix) update its
    numbers while keeping the peers' numbers from an earlier run.
    """
    for entry in doc["results"]:
        if entry["case"]["key"] == case["key"]:
            entry["case"] = _merge_case(entry["case"], case)
            entry["cells"].update({p: dict(c) for p, c in cells.items()})
            return
    doc["results"].append({"case": dict(case), "cells": {p: dict(c) for p, c in cells.items()}})


def _merge_case(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the union of providers (old order first) so merged runs show every column."""
    merged = dict(new)
    providers = list(old.get("providers", []))
    providers += [p for p in new.get("providers", []) if p not in providers]
    merged["providers"] = providers
    merged["skip"] = {**old.get("skip", {}), **new.get("skip", {})}
    return merged


def merge_documents(docs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge documents of one suite; later documents win cell by cell."""
    docs = list(docs)
    if not docs:
        raise ValueError("nothing to merge")
    names = {d["suite"]["name"] for d in docs}
    if len(names) != 1:
        raise ValueError(f"cannot merge results of different suites: {sorted(names)}")
    out = new_document(docs[-1]["suite"])
    for d in docs:
        _check_format(d)
        out["runs"].extend(r for r in d.get("runs", []) if r not in out["runs"])
        for entry in d["results"]:
            add_cells(out, entry["case"], entry["cells"])
    return out


def _check_format(doc: Mapping[str, Any]) -> None:
    if doc.get("format") != FORMAT:
        raise ValueError(f"not a flashtile benchmark results file (format {doc.get('format')!r})")


def _json_safe(x: Any) -> Any:
    """JSON has no inf/NaN: write them as strings rather than emit invalid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def save_json(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file + rename), so a run killed mid-write keeps the last good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results document written by :func:`save_json`."""
    doc = json.loads(Path(path).read_text())
    _check_format(doc)
    return doc


# ----------------------------------------------------------------------------------------------
# Markdown


def _speed(cell: Mapping[str, Any] | None) -> float | None:
    """TFLOP/s of a cell that may be quoted (validated or, failing a reference, unchecked)."""
    if cell and cell.get("status") in TIMED and isinstance(cell.get("tflops"), (int, float)):
        return float(cell["tflops"])
    return None


def format_cell(cell: Mapping[str, Any] | None) -> str:
    """TFLOP/s with one decimal; "-" did not run; "wrong" failed validation; "?" not validated."""
    if cell is None:
        return ""
    status = cell.get("status")
    if status == "wrong":
        return "wrong"
    speed = _speed(cell)
    if speed is None:
        return "-"
    return f"{speed:.1f}" + ("?" if status == "unchecked" else "")


def _providers(doc: Mapping[str, Any]) -> list[str]:
    """Every provider of the suite in first-seen order, the subject first (then its baseline)."""
    seen: list[str] = []
    for entry in doc["results"]:
        for p in list(entry["case"]["providers"]) + list(entry["cells"]):
            if p not in seen:
                seen.append(p)
    for p in reversed([doc["suite"].get("subject"), doc["suite"].get("baseline")]):
        if p in seen:
            seen.remove(p)
            seen.insert(0, p)
    return seen


def _baseline(doc: Mapping[str, Any]) -> str | None:
    """The suite's baseline provider (the subject on the dense problem), if it has one."""
    return doc["suite"].get("baseline") or None


def baseline_columns(doc: Mapping[str, Any]) -> list[str]:
    """Names of the baseline ratio columns ("vs flashtile dense", "time / dense"), or none."""
    base = _baseline(doc)
    if not base:
        return []
    return [f"vs {doc['suite'].get('baseline_label') or base}", "time / dense"]


def _ms(cell: Mapping[str, Any] | None) -> float | None:
    """Median time of a cell that has a speed."""
    if _speed(cell) is not None and isinstance(cell.get("median_ms"), (int, float)) and cell["median_ms"] > 0:  # type: ignore[union-attr]
        return float(cell["median_ms"])  # type: ignore[index]
    return None


def _ratio_peers(doc: Mapping[str, Any]) -> list[str]:
    """The suite's ratio peers that actually appear in the results (a filtered run may lack some)."""
    present = _providers(doc)
    return [p for p in doc["suite"].get("ratio_peers", []) if p in present]


def _sort_key(entry: Mapping[str, Any], columns: list[str]) -> tuple[Any, ...]:
    labels = entry["case"]["labels"]
    # Numbers sort numerically, "no" before "yes"; mixed types fall back to strings.
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in (labels.get(c) for c in columns))


def ratio_rows(doc: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, str]:
    """The ratio cells of one row: subject / each ratio peer, and subject / best peer (named)."""
    suite = doc["suite"]
    subject = suite.get("subject", "flashtile")
    cells = entry["cells"]
    mine = _speed(cells.get(subject))
    out: dict[str, str] = {}
    base = _baseline(doc)
    if base:
        vs_dense, time_dense = baseline_columns(doc)
        theirs = _speed(cells.get(base))
        out[vs_dense] = f"{mine / theirs:.2f}" if mine and theirs else "-"
        t_mine, t_base = _ms(cells.get(subject)), _ms(cells.get(base))
        out[time_dense] = f"{t_mine / t_base:.2f}" if t_mine and t_base else "-"
    for peer in _ratio_peers(doc):
        theirs = _speed(cells.get(peer))
        out[f"vs {peer}"] = f"{mine / theirs:.2f}" if mine and theirs else "-"
    # The baseline is the subject itself on an easier problem, not a peer.
    peers = {p: _speed(c) for p, c in cells.items() if p not in (subject, base)}
    peers = {p: s for p, s in peers.items() if s}
    if mine and peers:
        best = max(peers, key=lambda p: peers[p])
        out["vs best"] = f"{mine / peers[best]:.2f} ({best})"
    else:
        out["vs best"] = "-"
    return out


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def render_header(doc: Mapping[str, Any]) -> str:
    """Suite, date, GPU and software versions of the runs behind the numbers, and how to read them."""
    suite = doc["suite"]
    lines = [f"## flashtile benchmark: {suite['name']}", "", suite.get("description", ""), ""]
    runs = doc.get("runs", [])
    envs: list[str] = []
    for r in runs:
        env = (
            f"{r.get('device', '?')}"
            + (f" ({r['capability']})" if r.get("capability") else "")
            + f"; torch {r.get('torch', '?')} (CUDA {r.get('cuda') or '-'}), triton {r.get('triton', '?')}, "
            + f"cuDNN {r.get('cudnn') or '-'}, Python {r.get('python', '?')}, flashtile {r.get('flashtile', '?')}"
        )
        if env not in envs:
            envs.append(env)
    dates = sorted(r.get("date", "?") for r in runs)
    if dates:
        span = dates[0] if len(dates) == 1 else f"{dates[0]} .. {dates[-1]} ({len(dates)} runs)"
        lines.append(f"- date: {span}")
    for env in envs:
        lines.append(f"- machine: {env}")
    timing = sorted({(r.get("warmup_ms"), r.get("rep_ms"), r.get("rounds", 1)) for r in runs if r.get("rep_ms")},
                    key=str)
    if timing:
        t = ", ".join(f"warmup {w} ms / rep {p} ms" + (f", median of {n} interleaved rounds" if n > 1 else "")
                      for w, p, n in timing)
        lines.append(f"- timing: triton.testing.do_bench median ({t}), after warm-up and compilation")
    lines += [
        "- TFLOP/s = FLOPs / median time; forward FLOPs 4*B*H*Sq*Sk*D (halved for causal), "
        "forward+backward 3.5 x forward",
        "- cells: TFLOP/s; `-` did not run (reason under Notes); `wrong` failed validation against the "
        "reference provider (never timed); `?` timed without a reference to validate against",
        f"- ratios: {suite.get('subject', 'flashtile')} TFLOP/s / peer TFLOP/s (> 1: {suite.get('subject', 'flashtile')} is faster)",
    ]
    lines += list(suite.get("notes", []))
    lines.append("")
    return "\n".join(lines)


def render_table(doc: Mapping[str, Any], mode: str) -> str:
    """One markdown table for one mode: label columns, mode, providers, ratios."""
    entries = [e for e in doc["results"] if e["case"]["mode"] == mode]
    if not entries:
        return ""
    columns = list(entries[0]["case"]["labels"])
    providers = _providers(doc)
    ratio_cols = baseline_columns(doc) + [f"vs {p}" for p in _ratio_peers(doc)] + ["vs best"]
    header = columns + ["mode"] + providers + ratio_cols
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best_ratios: list[float] = []
    for entry in sorted(entries, key=lambda e: _sort_key(e, columns)):
        labels = entry["case"]["labels"]
        ratios = ratio_rows(doc, entry)
        if ratios["vs best"] != "-":
            best_ratios.append(float(ratios["vs best"].split()[0]))
        row = [str(labels.get(c, "")) for c in columns] + [mode]
        row += [format_cell(entry["cells"].get(p)) for p in providers]
        row += [ratios.get(c, "-") for c in ratio_cols]
        lines.append("| " + " | ".join(row) + " |")
    g = _geomean(best_ratios)
    if g is not None:
        lines += ["", f"Geometric mean of {doc['suite'].get('subject', 'flashtile')} / best peer over "
                  f"{len(best_ratios)} rows: {g:.2f}"]
    return "\n".join(lines) + "\n"


def render_notes(doc: Mapping[str, Any], max_cases: int = 3) -> str:
    """Why cells are "-" or "wrong": each distinct (provider, reason) once, with example cases."""
    seen: dict[tuple[str, str], list[str]] = {}
    for entry in doc["results"]:
        case = entry["case"]
        name = " ".join(f"{k}={v}" for k, v in case["labels"].items()) + f" {case['mode']}"
        for p, cell in entry["cells"].items():
            if cell.get("status") in ("ok",):
                continue
            reason = (cell.get("reason") or cell.get("status") or "?").splitlines()[0][:240]
            seen.setdefault((p, f"{cell.get('status')}: {reason}"), []).append(name)
    if not seen:
        return ""
    lines = ["### Notes", ""]
    for (p, reason), names in sorted(seen.items()):
        shown = "; ".join(names[:max_cases]) + (f"; +{len(names) - max_cases} more" if len(names) > max_cases else "")
        lines.append(f"- {p}, {reason} ({shown})")
    return "\n".join(lines) + "\n"


_METRICS = {"time_vs_dense": "time / dense", "vs_best": "vs best"}


def _metric_column(doc: Mapping[str, Any], metric: str) -> str:
    if metric == "vs_dense":
        cols = baseline_columns(doc)
        return cols[0] if cols else "vs dense"
    return _METRICS.get(metric, metric)


def render_targets(doc: Mapping[str, Any]) -> str:
    """The suite's targets (e.g. block-sparse time at 25% density <= 0.35x dense), met or not, per row."""
    targets = doc["suite"].get("targets") or []
    lines: list[str] = []
    for t in targets:
        column = _metric_column(doc, t.get("metric", ""))
        rows = []
        for entry in doc["results"]:
            labels = entry["case"]["labels"]
            if any(str(labels.get(k)) != str(v) for k, v in t.get("match", {}).items()):
                continue
            value = ratio_rows(doc, entry).get(column, "-")
            if value == "-":
                verdict = "not measured"
            else:
                x = float(value.split()[0])
                ok = (t.get("max") is None or x <= t["max"]) and (t.get("min") is None or x >= t["min"])
                verdict = f"{x:.2f}, {'met' if ok else 'not met'}"
            rows.append((entry["case"]["mode"], verdict))
        rows.sort(key=lambda r: (MODE_ORDER + (r[0],)).index(r[0]))
        found = "; ".join(f"{m}: {v}" for m, v in rows) if rows else "no matching rows"
        lines.append(f"- {t.get('text', column)}: {found}")
    if not lines:
        return ""
    return "### Targets\n\n" + "\n".join(lines) + "\n"


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The whole report: header, one table per mode, targets, notes."""
    parts = [render_header(doc)]
    modes = sorted({e["case"]["mode"] for e in doc["results"]}, key=lambda m: (MODE_ORDER + (m,)).index(m))
    for mode in modes:
        parts.append(f"### {mode}\n")
        parts.append(render_table(doc, mode))
    targets = render_targets(doc)
    if targets:
        parts.append(targets)
    notes = render_notes(doc)
    if notes:
        parts.append(notes)
    return "\n".join(parts)


def render_json_file(path: str | os.PathLike[str]) -> str:
    """Rebuild the markdown report from a saved results JSON (never hand-edit the numbers)."""
    return render_markdown(load_json(path))


# ----------------------------------------------------------------------------------------------
# All outputs


def write_report(
    doc: Mapping[str, Any], out_dir: str | os.PathLike[str], *, plots: bool = True
) -> dict[str, Any]:
    """Write <suite>.json, <suite>.md and (optionally) <suite>_<mode>.png; return the paths and text."""
    out = Path(out_dir)
    name = doc["suite"]["name"]
    json_path = save_json(doc, out / f"{name}.json")
    text = render_markdown(doc)
    md_path = out / f"{name}.md"
    md_path.write_text(text)
    pngs: list[Path] = []
    if plots:
        try:
            from .plots import render_plots

            pngs = render_plots(doc, out)
        except Exception as exc:  # a plotting problem must not cost the measured numbers
            print(f"warning: plots not written: {type(exc).__name__}: {exc}", file=sys.stderr)
    return {"json": json_path, "markdown": md_path, "png": pngs, "text": text}
