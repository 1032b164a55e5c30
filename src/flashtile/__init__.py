"""flashtile: FlashAttention-class attention kernels in Triton, with a tiled PyTorch path for CPU."""

from flashtile.api import flash_attn_func, scaled_dot_product_attention
from flashtile.errors import UnsupportedError
from flashtile.masks import BlockMask
from flashtile.dispatch import use_backend
from flashtile.gemm import gemm
from flashtile.varlen import flash_attn_varlen_func

try:
    from importlib.metadata import version as _version

    __version__ = _version("flashtile")
except Exception:  # not installed (running from a source tree)
    __version__ = "0+unknown"

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "scaled_dot_product_attention",
    "use_backend",
    "gemm",
    "BlockMask",
    "UnsupportedError",
    "__version__",
]
