"""On Linux, make MLX's CPU matmuls use OpenBLAS instead of the reference BLAS its wheel bundles.

The `mlx[cpu]` wheel links a bundled reference `libblas`, an order of magnitude slower than
OpenBLAS for fp32 GEMM. Loading OpenBLAS with RTLD_GLOBAL before mlx is imported makes `cblas_sgemm` resolve to
it. This must run before the first `import mlx`. macOS uses Accelerate and needs none of this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: str | None = None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally if it can be found; returns its path, or None."""
    global loaded
    if loaded or not sys.platform.startswith("linux") or os.environ.get("HETPIPE_NO_OPENBLAS"):
        return loaded
    if "mlx.core" in sys.modules:
        return None  # too late: mlx already bound its BLAS
    paths = [os.environ.get("HETPIPE_OPENBLAS"), *CANDIDATES, ctypes.util.find_library("openblas")]
    for path in filter(None, paths):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        return path
    return None


def set_threads(n: int) -> bool:
    """Limit OpenBLAS's worker threads (MLX's CPU matmuls); False when OpenBLAS is not in use."""
    if not loaded:
        return False
    ctypes.CDLL(loaded).openblas_set_num_threads(int(n))
    return True
