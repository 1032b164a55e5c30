"""flashtile's benchmark harness: suites (cases), peers (providers), runner, report.

Importing this package needs no GPU; only running cases does. Entry point:
``python -m flashtile bench`` (see :func:`flashtile.bench.cli.main`).
"""

from .suites import SUITES, Case, Suite, attention_flops, filter_cases, tflops

__all__ = ["SUITES", "Case", "Suite", "attention_flops", "filter_cases", "tflops"]
