"""Launch a Triton kernel with the largest config that fits this GPU.

The config tables (tuning.py, gemm_launch.py) are measured on an H200. Triton compiles a config and
only then finds that it needs more shared memory (or registers) than the GPU in hand has, and raises
OutOfResources before launching anything. The three launchers (attention, wide heads, GEMM) each
know how to step down (fewer pipeline stages, narrower tiles); this is their one retry loop.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from triton.runtime.errors import OutOfResources

Config = TypeVar("Config")


def launch_fitting(launch: Callable[[Config], object], config: Config,
                   smaller: Callable[[Config], Optional[Config]]) -> Config:
    """launch(config); while Triton raises OutOfResources, launch(smaller(config)) instead.

    Returns the config that launched. When smaller() returns None (nothing smaller to try), the last
    OutOfResources propagates: a kernel that cannot fit is an error, never a silent skip.
    """
    while True:
        try:
            launch(config)
            return config
        except OutOfResources:
            next_config = smaller(config)
            if next_config is None:
                raise
            config = next_config
