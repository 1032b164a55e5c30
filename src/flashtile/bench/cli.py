"""``python -m flashtile bench``: pick a suite, filter it, run it (or list it), write the report."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Sequence

from .suites import MODES, SUITES, Case, Suite, filter_cases

EPILOG = """\
examples:
  python -m flashtile bench --suite standard --dry-run
  python -m flashtile bench --suite standard --headdims 64 --modes fwd --max-minutes 8
  python -m flashtile bench --suite wide --causal no
  python -m flashtile bench --suite variants --variants window softcap --max-minutes 6 --resume
  python -m flashtile bench --from-json a/standard.json b/standard.json --out bench_results

Results merge cell by cell into <out>/<suite>.json (use --fresh to start over), so a suite can be
split over several runs with the filters; --resume skips cases already measured there.
"""


def _ints(values: Sequence[str] | None, flag: str) -> list[int] | None:
    """Accept "512 1024" and "512,1024" alike."""
    if values is None:
        return None
    try:
        return [int(x) for v in values for x in v.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected integers, got {' '.join(values)!r}") from None


def _words(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The bench argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog="python -m flashtile bench",
        description="Benchmark flashtile against torch SDPA backends and FlexAttention (needs CUDA).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", choices=sorted(SUITES), default="standard", help="case list (default: standard)")
    p.add_argument("--seqlens", nargs="+", metavar="S", help="only these sequence lengths")
    p.add_argument("--headdims", nargs="+", metavar="D", help="only these head dims")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="causal cases to run")
    p.add_argument("--modes", nargs="+", metavar="MODE", help=f"only these modes ({', '.join(MODES)})")
    p.add_argument("--providers", nargs="+", metavar="NAME", help="only these providers (references still run, untimed, for validation)")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="variants suite: only these variants (window, softcap, alibi, dropout, gqa, varlen, block_sparse)")
    p.add_argument("--out", default="bench_results", help="output directory (default: bench_results)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up time per cell (default 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time per cell (default 100)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every provider of a case this many times, interleaved; cells keep the median (default 1)")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    p.add_argument("--max-minutes", type=float, help="start no new case after this many minutes (partial results are kept)")
    p.add_argument("--resume", action="store_true", help="skip cases already complete in <out>/<suite>.json")
    p.add_argument("--fresh", action="store_true", help="ignore an existing <out>/<suite>.json instead of merging into it")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--from-json", nargs="+", metavar="FILE", help="merge saved results and write the report (no GPU needed)")
    return p


def select_cases(args: argparse.Namespace) -> tuple[Suite, list[Case]]:
    """The suite's cases after --quick and the filters; validates mode and provider names."""
    from .peers import PROVIDERS

    suite = SUITES[args.suite]
    modes = _words(args.modes)
    if modes is not None and (bad := sorted(set(modes) - set(MODES))):
        raise SystemExit(f"--modes: unknown {bad}; expected {', '.join(MODES)}")
    providers = _words(args.providers)
    if providers is not None and (bad := sorted(set(providers) - set(PROVIDERS))):
        raise SystemExit(f"--providers: unknown {bad}; known: {', '.join(PROVIDERS)}")
    built = suite.build(args.quick)
    variants = _words(getattr(args, "variants", None))
    if variants is not None:
        known = sorted({str(c.shape["variant"]) for c in built if "variant" in c.shape})
        if not known:
            raise SystemExit(f"--variants: suite {suite.name} has no variants (try --suite variants)")
        if bad := sorted(set(variants) - set(known)):
            raise SystemExit(f"--variants: unknown {bad}; suite {suite.name} has {', '.join(known)}")
    cases = filter_cases(
        built,
        seqlens=_ints(args.seqlens, "--seqlens"),
        headdims=_ints(args.headdims, "--headdims"),
        causal=args.causal,
        modes=modes,
        providers=providers,
        variants=variants,
    )
    return suite, cases


def print_cases(suite: Suite, cases: Sequence[Case]) -> None:
    """The --dry-run listing: one line per case, then the count."""
    print(f"suite {suite.name}: {suite.description}")
    for i, c in enumerate(cases, 1):
        s = c.shape
        # Sizes the name (the labels) does not already show.
        dims = " ".join(f"{k}={s[k]}" for k in ("B", "H") if k in s and k not in c.labels)
        if "Hkv" in s and s["Hkv"] != s.get("H"):
            dims = f"{dims} Hkv={s['Hkv']}".strip()
        skip = f"  skip: {', '.join(c.skip)}" if c.skip else ""
        print(f"{i:4d}. {c.name:<34} {dims:<12} {c.flops / 1e12:8.3f} TFLOP  "
              f"providers: {', '.join(c.providers)}{skip}")
    print(f"{len(cases)} cases")


def _from_json(files: Sequence[str], out_dir: Path, plots: bool) -> int:
    from . import report

    try:
        doc = report.merge_documents(report.load_json(f) for f in files)
    except (OSError, ValueError, KeyError) as exc:
        print(f"--from-json: {exc}", file=sys.stderr)
        return 2
    written = report.write_report(doc, out_dir, plots=plots)
    print(written["text"])
    print(f"wrote {written['json']}, {written['markdown']}" + "".join(f", {p}" for p in written["png"]), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m flashtile bench``; returns the exit code.

    0: done (cells that failed are recorded as data); 1: stopped early; 2: usage error or no CUDA.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage errors
        return int(exc.code or 0)
    out_dir = Path(args.out)
    if args.from_json:
        return _from_json(args.from_json, out_dir, plots=not args.no_plots)
    try:
        suite, cases = select_cases(args)
    except SystemExit as exc:
        print(exc.code, file=sys.stderr)
        return 2
    if not cases:
        print("no cases match the filters (try --dry-run without filters)", file=sys.stderr)
        return 2
    if args.dry_run:
        print_cases(suite, cases)
        return 0

    import torch

    if not torch.cuda.is_available():
        print(
            "python -m flashtile bench needs a CUDA GPU (torch.cuda.is_available() is False).\n"
            "Use --dry-run to list the cases, or --from-json to rebuild a report from saved results.",
            file=sys.stderr,
        )
        return 2

    from . import report
    from .runner import RunOptions, run_suite
    from ..info import collect_info

    env = collect_info()
    env.update(
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        argv=list(sys.argv[1:] if argv is None else argv),
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        rounds=args.rounds,
    )
    opts = RunOptions(
        out_dir=out_dir,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        seed=args.seed,
        max_minutes=args.max_minutes,
        resume=args.resume,
        fresh=args.fresh,
        plots=not args.no_plots,
        rounds=max(1, args.rounds),
    )
    print(f"{len(cases)} cases of suite {suite.name} on {env.get('device')}; results in {out_dir}", file=sys.stderr)
    doc, code = run_suite(suite, cases, opts, env)
    written = report.write_report(doc, out_dir, plots=opts.plots)
    print(written["text"])
    print(f"wrote {written['json']}, {written['markdown']}" + "".join(f", {p}" for p in written["png"]), file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
