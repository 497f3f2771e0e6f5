"""The backend registry, and building one in-process stage of a backend by name.

Backends are imported here only, by name (`importlib`), so the rest of the engine never imports
mlx or torch, and a coordinator that drives stage daemons never loads either.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..core.base_stage import BaseStage
from ..core.config import ModelConfig
from ..core.errors import UserError
from ..core.partition import check_range
from ..core.shapes import ShapeModel
from ..core.tensors import AUTO, check_dtype
from ..core.weights import checkpoint_dtype
from . import allocator, hub

BACKENDS = {"mlx": "backends.mlx_stage", "torch": "backends.torch_stage"}
# torch must load before MLX's OpenBLAS preload (backends/mlx_stage/blas.py): loaded after it,
# torch's BLAS calls resolve to OpenBLAS instead of its MKL and decode at half speed (measured).
IMPORT_ORDER = ("torch", "mlx")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


def import_backends(names) -> None:
    """Import the backends a process will use, in the order that keeps each on its own BLAS."""
    for name in IMPORT_ORDER:
        if name in names:
            try:
                importlib.import_module(BACKENDS[name])
            except ImportError as e:
                raise UserError(f"backend {name!r} is not available here: {e} "
                                f"(install hetpipe[{name}])") from None


def load_stage(backend: str, model_dir: str | Path, first: int, last: int, *, device: str | None = None,
               dtype: str = "auto", threads: int | None = None, kv_tokens: int | None = None,
               compile: bool = False, max_seqs: int | None = None, max_call_tokens: int | None = None) -> BaseStage:
    """Build, warm up and budget an in-process stage of `backend` holding layers [first, last].

    torch runs fastest on the thread that loads it: load a stage on the thread that will run it.
    """
    check_backend(backend)
    shape = isinstance(model_dir, ShapeModel)  # random weights at a big model's widths, made in memory
    cfg = model_dir.config if shape else ModelConfig.load(model_dir)
    check_range(first, last, cfg.num_hidden_layers)
    if not shape:
        hub.ensure_layers(model_dir, first, last)  # a Hub snapshot fetches the weight files it lacks
    dtype = resolve_dtype(backend, model_dir, dtype, device)
    module = importlib.import_module(BACKENDS[backend])
    stage = module.create_stage(model_dir if shape else str(model_dir), cfg, first, last, device=device, dtype=dtype,
                                threads=threads, compile=compile)
    allocator.release_free_memory()  # the loading's scratch (unfused copies of weights) back to the OS
    stage.set_kv_budget(kv_tokens)
    stage.max_seqs, stage.max_call_tokens = max_seqs, max_call_tokens
    return stage


def resolve_dtype(backend: str, model_dir: str | Path, dtype: str, device: str | None) -> str:
    """The dtype a stage of `backend` computes in: `dtype`, or for "auto" the backend's choice for
    this device and the checkpoint's own dtype, bf16 for a quantized one (each backend's
    `auto_dtype` states its rule)."""
    check_dtype(dtype, allow_auto=True)
    import_backends({backend})
    if dtype != AUTO:
        return dtype
    # a quantized checkpoint's weights are not float32 whatever its norms are: it counts as half
    # precision (its decode products run on 8-bit activations where the torch kernels run)
    half = isinstance(model_dir, ShapeModel) or ModelConfig.load(model_dir).quantization is not None
    checkpoint = "bfloat16" if half else checkpoint_dtype(model_dir)
    return importlib.import_module(BACKENDS[backend]).auto_dtype(device, checkpoint)


def available_backends() -> list[str]:
    """Backends importable in this environment (each tried in a process of its own)."""
    import subprocess
    import sys

    return [name for name, module in BACKENDS.items()
            if subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0]
