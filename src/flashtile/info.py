"""Environment report: versions, device, and which flashtile backend would run.

``python -m flashtile info`` prints :func:`format_info`; the benchmark stores :func:`collect_info`
with every result so numbers always travel with the machine and software that produced them.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Any


def _version(module: str) -> str | None:
    """A module's __version__, or None when it is missing or fails to import."""
    try:
        mod = __import__(module)
    except Exception:  # a broken optional install must not break `info`
        return None
    return str(getattr(mod, "__version__", "unknown"))


def flashtile_version() -> str:
    """The installed distribution's version; "0+unknown" when running from a bare source tree."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("flashtile")
    except (ImportError, PackageNotFoundError):
        return "0+unknown"


def _cudnn_version(torch: Any) -> str | None:
    """cuDNN's version as "9.19.0" (torch reports 91900), or None without cuDNN."""
    try:
        v = torch.backends.cudnn.version()
    except Exception:
        return None
    if not v:
        return None
    major, rest = divmod(int(v), 10000) if v >= 10000 else divmod(int(v), 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def _backend_for(device_type: str) -> str:
    """The backend flashtile would run for tensors on ``device_type``, or why it cannot."""
    import torch

    from flashtile.dispatch import resolve_backend

    try:
        return resolve_backend(torch.device(device_type))
    except Exception as exc:  # e.g. FLASHTILE_BACKEND=triton with CPU tensors and no interpreter
        return f"error: {exc}"


def _gluon_wide_forward(torch) -> str:
    """Whether the Gluon wide forward (kernels/attention_wide_gluon.py) can run here, or why not."""
    from flashtile.dispatch import GLUON_FORWARD_MAX_HEAD_DIM, GLUON_FORWARD_MIN_HEAD_DIM

    if not torch.cuda.is_available():
        return "no (needs an sm_90 GPU)"
    major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
    if (major, minor) != (9, 0):
        return f"no (needs sm_90, this GPU is sm_{major}{minor})"
    try:
        importlib.import_module("triton.experimental.gluon")
    except ImportError as exc:
        return f"no ({exc})"
    return (f"yes: 16-bit head dims {GLUON_FORWARD_MIN_HEAD_DIM}..{GLUON_FORWARD_MAX_HEAD_DIM} (Dqk and Dv), "
            f"plain / causal / GQA")


def collect_info() -> dict[str, Any]:
    """Versions, device and backend selection, as a flat JSON-ready dict."""
    import torch

    info: dict[str, Any] = {
        "flashtile": flashtile_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(torch),
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        major, minor = torch.cuda.get_device_capability(idx)
        info.update(
            device=torch.cuda.get_device_name(idx),
            capability=f"sm_{major}{minor}",
            device_count=torch.cuda.device_count(),
            device_memory_gb=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
        )
    else:
        info.update(
            device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            capability=None,
            device_count=0,
        )
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    try:
        from flashtile.dispatch import backend_setting

        info["backend_setting"] = backend_setting()
    except Exception as exc:  # an invalid FLASHTILE_BACKEND is worth showing, not crashing on
        info["backend_setting"] = f"error: {exc}"
    info["backend_cuda"] = _backend_for("cuda") + ("" if torch.cuda.is_available() else " (no CUDA device here)")
    info["backend_cpu"] = _backend_for("cpu")
    info["gluon_wide_forward"] = _gluon_wide_forward(torch)
    return info


_LABELS = {
    "flashtile": "flashtile",
    "python": "Python",
    "platform": "platform",
    "torch": "torch",
    "triton": "triton",
    "numpy": "numpy",
    "cuda": "CUDA (torch build)",
    "cudnn": "cuDNN",
    "device": "device",
    "capability": "compute capability",
    "device_count": "devices",
    "device_memory_gb": "device memory (GiB)",
    "sm_count": "SMs",
    "triton_interpret": "TRITON_INTERPRET",
    "backend_setting": "backend setting",
    "backend_cuda": "backend for CUDA tensors",
    "backend_cpu": "backend for CPU tensors",
    "gluon_wide_forward": "Gluon wide forward",
}


def format_info(info: dict[str, Any] | None = None) -> str:
    """:func:`collect_info` as aligned "label: value" lines."""
    info = collect_info() if info is None else info
    width = max(len(v) for v in _LABELS.values())
    lines = []
    for key, label in _LABELS.items():
        if key in info:
            value = info[key]
            lines.append(f"{label:<{width}} : {'-' if value in (None, '') else value}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(format_info() + "\n")
