"""hetpipe's own CPU kernels (`kernels/*.cpp`): compiled on first use, cached, loaded into torch.

They register CPU implementations of `hetpipe::` ops that the model defines with a plain-torch
fallback, so the stage runs the same without them: on a CPU without AVX512-BF16, without a C++
compiler, or with HETPIPE_NATIVE=0. The build (~10 s) happens once per torch version and kernel version,
under a file lock so that stage daemons starting together build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from engine.core.paths import hetpipe_home

SOURCES = [Path(__file__).parent / "kernels" / "small_matmul.cpp"]
FLAGS = ["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"]
KERNELS = "avx512-bf16 small matmul"  # what a stage reports when they run

_loaded: str | None = None  # None: not tried yet; "" loaded; else why not


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unsupported() -> str | None:
    """Why the kernels cannot run here, or None."""
    if os.environ.get("HETPIPE_NATIVE", "1") == "0":
        return "HETPIPE_NATIVE=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "not an x86-64 Linux machine"
    if "avx512_bf16" not in cpu_flags():
        return "the CPU lacks AVX512-BF16"
    if not shutil.which(os.environ.get("CXX", "c++")):
        return "no C++ compiler (c++) on PATH"
    if not shutil.which("ninja"):
        try:
            import ninja  # the pip package: torch builds extensions with it
        except ImportError:
            return "ninja is not installed"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


def load() -> str | None:
    """Build (the first time) and load the kernels; None once they run, else why they do not."""
    global _loaded
    if _loaded is None:
        _loaded = unsupported() or _build()
    return _loaded or None


def build_dir() -> Path:
    """One directory per torch version and per version of the sources and flags, so a build there
    is always a first build (and says so) and never one of torch's renamed rebuilds."""
    digest = hashlib.sha256(repr(FLAGS).encode())
    for src in SOURCES:
        digest.update(src.read_bytes())
    return hetpipe_home() / "kernels" / f"torch-{torch.__version__}-{digest.hexdigest()[:12]}"


def _build() -> str:
    from torch.utils import cpp_extension

    try:
        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "hetpipe.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released if this process dies, unlike torch's own lock
            (out / "lock").unlink(missing_ok=True)  # file, which a build killed midway leaves forever
            if not any(out.glob("*.so")):
                print("hetpipe: building the AVX512-BF16 kernels (once per torch and kernel version, ~10 s)",
                      file=sys.stderr)
            cpp_extension.load("hetpipe_kernels", [str(s) for s in SOURCES], extra_cflags=FLAGS,
                               build_directory=str(out), is_python_module=False)
    except Exception as e:  # an unwritable cache, a compiler error...: torch's own kernels always work
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"hetpipe: the CPU kernels did not build ({why}); torch's own run instead", file=sys.stderr)
        return f"build failed: {why}"
    return ""
