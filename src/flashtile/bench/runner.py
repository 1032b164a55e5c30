"""Run cases: validate every provider against a reference, then time it; record, never abort.

Per case: make the seeded inputs once; run the reference candidates in order until one gives
finite outputs; then, per provider, build its own inputs, check its outputs against the reference
(a mismatch is recorded as "wrong" and never timed), warm up, and take do_bench's median. Any
exception (unsupported shape, out of memory, compile error) becomes an "error" cell with the
reason. Results are saved after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import datetime as _dt
import gc
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import report
from .peers import Prepared, get_provider, make_inputs
from .suites import Case, Suite, tflops
from .timing import median_ms, warm_up
from .validate import all_finite, compare


@dataclass
class RunOptions:
    """How to time and where to write."""

    out_dir: Path
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0
    max_minutes: float | None = None
    resume: bool = False
    fresh: bool = False
    plots: bool = True
    device: str = "cuda"  # tests run the whole flow on "cpu" with a fake timer
    # Timing rounds per case: round 1 validates and times every provider, rounds 2.. time them again
    # in the same order, and a cell keeps the median over rounds. The H200's clock drifts under
    # minutes of full load; interleaving spreads that drift over all providers of a case instead of
    # charging it to whichever runs last.
    rounds: int = 1


class DeviceLost(RuntimeError):
    """The CUDA context is unusable (e.g. an illegal memory access): later cells would all fail."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _reason(exc: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """One line: the exception, plus torch's warnings (SDPA explains refusals only in warnings)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}"[:300]
    notes = []
    for w in caught:
        line = str(w.message).strip().splitlines()[0][:160] if str(w.message).strip() else ""
        if line and line not in notes:
            notes.append(line)
    if notes:
        text += " [warnings: " + " | ".join(notes[:3]) + "]"
    return text


def _release() -> None:
    """Drop a provider's tensors before the next one allocates."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_device(device: torch.device) -> None:
    """Raise DeviceLost when the CUDA context no longer works after an error."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as exc:  # sticky CUDA errors surface here
        raise DeviceLost(_reason(exc)) from exc


def inputs_device(inputs: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(inputs.values())).device


def _cell(status: str, **fields: Any) -> dict[str, Any]:
    cell: dict[str, Any] = {"status": status, "median_ms": None, "tflops": None, "date": _now()}
    cell.update(fields)
    return cell


def run_provider(
    name: str,
    case: Case,
    inputs: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor] | None,
    reference_name: str | None,
    opts: RunOptions,
    *,
    timed: bool,
    candidate: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Validate (and if ``timed``, time) one provider on one case.

    When ``candidate`` is true and there is no reference yet, this provider's finite outputs
    become the reference and are returned as the second element.
    """
    caught: list[warnings.WarningMessage] = []
    prepared: Prepared | None = None
    try:
        with warnings.catch_warnings(record=True) as caught_now:
            warnings.simplefilter("always")
            caught = caught_now
            prepared = get_provider(name).build(case, inputs)
            with prepared.context():
                return _validate_and_time(name, case, prepared, reference, reference_name, opts,
                                          timed=timed, candidate=candidate)
    except DeviceLost:
        raise
    except Exception as exc:
        # Only the text is kept: the exception's traceback pins the provider's tensors until the
        # except block ends, so memory is released in `finally`, after it.
        reason = _reason(exc, caught)
    finally:
        prepared = None
        _release()
    _check_device(inputs_device(inputs))
    return _cell("error", reason=reason), None


def _validate_and_time(
    name: str,
    case: Case,
    prepared: Prepared,
    reference: Mapping[str, torch.Tensor] | None,
    reference_name: str | None,
    opts: RunOptions,
    *,
    timed: bool,
    candidate: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """The body of :func:`run_provider`, inside the provider's context."""
    result = prepared.result()  # first call: compiles, autotunes
    _sync(next(iter(result.values())).device)
    check: dict[str, Any] | None = None
    kept: dict[str, torch.Tensor] | None = None
    if prepared.reference is not None:
        # This provider computes another problem than the case (e.g. flashtile_dense): it brings
        # the reference of that problem, and never serves as the case's reference.
        own_name = prepared.reference_name or f"{name}'s reference"
        own = prepared.reference()
        ok, check = compare(result, own)
        del own
        if not ok:
            return _cell("wrong", reason=f"differs from {own_name}", check=check, reference=own_name), None
        status, ref_used = "ok", own_name
    elif reference is None:
        if not all_finite(result):
            return _cell("wrong", reason="non-finite output (NaN/inf)"), None
        if candidate:
            kept, status, ref_used = result, "ok", name
        else:
            status, ref_used = "unchecked", None
    else:
        ok, check = compare(result, reference)
        if not ok:
            return _cell("wrong", reason=f"differs from {reference_name}", check=check,
                         reference=reference_name), None
        status, ref_used = "ok", reference_name
    del result  # free the comparison copy before timing
    if not timed:
        return _cell(status, reference=ref_used), kept
    warm_up(prepared.fn)
    ms = median_ms(prepared.fn, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms,
                   grad_to_none=prepared.grad_to_none)
    reason = None if status == "ok" else "no reference provider ran on this case"
    flops = case.flops_for(name)
    extra = {"flops": flops} if flops != case.flops else {}
    return _cell(status, median_ms=ms, tflops=tflops(flops, ms), reason=reason,
                 check=check, reference=ref_used, **extra), kept


def run_case(case: Case, opts: RunOptions, progress: Any = None) -> dict[str, dict[str, Any]]:
    """All cells of one case: references first (to validate the rest), then the other providers."""
    device = torch.device(opts.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cells: dict[str, dict[str, Any]] = {}
    inputs = make_inputs(case, device, opts.seed)
    reference: dict[str, torch.Tensor] | None = None
    reference_name: str | None = None
    tried: list[str] = []
    try:
        order = [p for p in case.references] + [p for p in case.providers if p not in case.references]
        for name in order:
            timed = name in case.providers
            candidate = name in case.references
            if not timed and (reference is not None or not candidate):
                continue  # an untimed reference is only needed while there is none
            if name in case.skip:
                if timed:
                    cells[name] = _cell("skipped", reason=case.skip[name])
                    _tick(progress)
                continue
            if progress is not None:
                progress.set_postfix_str(f"{case.name} | {name}", refresh=False)
            t0 = time.monotonic()
            cell, ref = run_provider(name, case, inputs, reference, reference_name, opts,
                                     timed=timed, candidate=candidate and reference is None)
            # Wall time of the whole cell (compile, validation, timing): what splitting runs needs.
            cell["seconds"] = round(time.monotonic() - t0, 2)
            if ref is not None:
                reference, reference_name = ref, name
            elif candidate and reference is None:
                tried.append(f"{name}: {cell.get('reason') or cell['status']}")
            if timed:
                cells[name] = cell
                _tick(progress)
        if reference is None and tried:
            for cell in cells.values():
                if cell["status"] == "unchecked":
                    cell["reason"] = "no reference ran (" + "; ".join(tried)[:300] + ")"
        del reference
        _release()
        for _ in range(1, opts.rounds):
            for name, cell in cells.items():
                if cell.get("median_ms") is not None:
                    cell.setdefault("round_ms", [cell["median_ms"]]).append(_time_again(name, case, inputs, opts))
        for name, cell in cells.items():
            if "round_ms" in cell:
                done = sorted(ms for ms in cell["round_ms"] if ms is not None)
                cell["median_ms"] = done[len(done) // 2]
                cell["tflops"] = tflops(case.flops_for(name), cell["median_ms"])
        return cells
    finally:
        del inputs
        _release()


def _time_again(name: str, case: Case, inputs: Mapping[str, torch.Tensor], opts: RunOptions) -> float | None:
    """One more timing of a provider that already passed validation on this case (None if it fails now)."""
    prepared: Prepared | None = None
    try:
        prepared = get_provider(name).build(case, inputs)
        with prepared.context():
            warm_up(prepared.fn)
            return median_ms(prepared.fn, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms,
                             grad_to_none=prepared.grad_to_none)
    except DeviceLost:
        raise
    except Exception:
        return None
    finally:
        prepared = None
        _release()


def _tick(progress: Any) -> None:
    if progress is not None:
        progress.update(1)


def _summary(case: Case, cells: Mapping[str, Mapping[str, Any]], seconds: float) -> str:
    parts = [f"{p} {report.format_cell(cells.get(p)) or '.'}" for p in case.providers]
    return f"{case.name}: " + " | ".join(parts) + f"  ({seconds:.0f} s)"


def _done(doc: Mapping[str, Any], case: Case) -> bool:
    """True when every provider of the case already has a cell in ``doc`` (for --resume)."""
    for entry in doc["results"]:
        if entry["case"]["key"] == case.key:
            return all(p in entry["cells"] for p in case.providers)
    return False


def run_suite(suite: Suite, cases: Sequence[Case], opts: RunOptions, env: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Run ``cases``, merging into <out>/<suite>.json; returns (document, exit code).

    Exit code 0 when the run finished (failed cells are data, not failures), 1 when it stopped
    early (device lost or --max-minutes reached).
    """
    from tqdm import tqdm

    json_path = Path(opts.out_dir) / f"{suite.name}.json"
    doc = report.new_document(suite.layout())
    if json_path.exists() and not opts.fresh:
        try:
            doc = report.merge_documents([report.load_json(json_path)])
            doc["suite"] = suite.layout()
        except (ValueError, KeyError, OSError) as exc:
            print(f"warning: ignoring unreadable {json_path}: {exc}", file=sys.stderr)
    doc["runs"].append(dict(env))

    todo = [c for c in cases if not (opts.resume and _done(doc, c))]
    if len(todo) < len(cases):
        print(f"--resume: {len(cases) - len(todo)} cases already in {json_path}, {len(todo)} to run", file=sys.stderr)
    start = time.monotonic()
    code = 0
    total = sum(len(c.providers) for c in todo)
    # A non-terminal (log file, remote run) gets a line every 30 s instead of carriage returns.
    tty = sys.stderr.isatty()
    with tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True,
              mininterval=0.5 if tty else 30.0) as bar:
        for i, case in enumerate(todo):
            if opts.max_minutes is not None and time.monotonic() - start > 60.0 * opts.max_minutes:
                left = todo[i:]
                bar.write(f"--max-minutes {opts.max_minutes} reached; {len(left)} cases not run "
                          f"(rerun with --resume and the same --out to continue):")
                for c in left:
                    bar.write(f"  {c.name}")
                code = 1
                break
            t0 = time.monotonic()
            try:
                cells = run_case(case, opts, bar)
            except DeviceLost as exc:
                bar.write(f"CUDA context lost during {case.name}: {exc}\n"
                          "stopping; results so far are saved. Rerun the rest in a new process "
                          "(--resume), leaving out the provider or case that crashed.")
                code = 1
                break
            report.add_cells(doc, case.to_dict(), cells)
            report.save_json(doc, json_path)
            bar.write(_summary(case, cells, time.monotonic() - t0))
    return doc, code
