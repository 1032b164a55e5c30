"""Command line: ``python -m flashtile {info,verify,bench}`` (also the ``flashtile`` script).

  info     versions, device, and which backend runs CUDA / CPU tensors
  verify   check the kernels against the reference on this machine (exit code 0 = all passed)
  bench    benchmark against torch SDPA backends and FlexAttention (``bench --help``)

Each subcommand imports what it needs only when it runs, so ``info`` works even when the
kernels or the benchmark's optional dependencies do not import.
"""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from flashtile.info import format_info

    print(format_info())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from flashtile.verify import run_verify

    return int(run_verify(backends=args.backend, quick=args.quick) or 0)


def build_parser() -> argparse.ArgumentParser:
    """Parser for info and verify; bench parses its own arguments (see flashtile.bench.cli)."""
    parser = argparse.ArgumentParser(
        prog="python -m flashtile",
        description="flashtile: FlashAttention-class attention kernels in Triton.",
        epilog="python -m flashtile bench --help  shows the benchmark's options",
    )
    sub = parser.add_subparsers(dest="command", metavar="{info,verify,bench}")
    sub.required = True
    info = sub.add_parser("info", help="versions, device and backend selection")
    info.set_defaults(func=_info)
    verify = sub.add_parser("verify", help="check the kernels against the reference on this machine")
    verify.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="backend to verify (repeatable; default: the ones this machine can run)",
    )
    verify.add_argument("--quick", action="store_true", help="fewer shapes")
    verify.set_defaults(func=_verify)
    # Listed for --help only: main() forwards `bench ...` before argparse sees it, so bench's own
    # options (which argparse.REMAINDER would mangle) reach flashtile.bench.cli untouched.
    sub.add_parser("bench", help="benchmark against torch SDPA and FlexAttention", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from flashtile.bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error
        return int(exc.code or 0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
