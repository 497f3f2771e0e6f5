"""hetpipe's own CPU kernels (`kernels/*.cpp`): compiled on first use, cached, loaded into torch.

They register CPU implementations of `hetpipe::` ops that the model defines with a plain-torch
fallback, so the stage runs the same without them. One variant per instruction set, the first
this CPU has: AVX512-BF16 and VNNI (`_mm512_dpbf16_ps`, `vpdpbusd`; Intel Sapphire Rapids and
later, AMD Zen 4), else
AVX2 with FMA (bf16 widened to fp32; AMD Zen 2/3, Intel Haswell and later); HETPIPE_KERNELS=avx2
picks the second where both run. None on other CPUs, without a C++ compiler, or with
HETPIPE_NATIVE=0. The build (~10 s) happens once per torch version
and kernel version, under a file lock so that stage daemons starting together build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.paths import hetpipe_home

KERNEL_DIR = Path(__file__).parent / "kernels"


@dataclass(frozen=True)
class Variant:
    name: str  # what a stage reports when it runs (`TorchStage.kernels`)
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags it needs
    sources: tuple[Path, ...]
    cflags: tuple[str, ...]


VARIANTS = (
    Variant("avx512-bf16 small matmul, fused norm and decode attention, quantized matmul",
            ("avx512f", "avx512_bf16", "avx512_vnni", "avx512vl", "avx512bw", "f16c"),
            (KERNEL_DIR / "small_matmul.cpp", KERNEL_DIR / "layer_ops.cpp", KERNEL_DIR / "quant_matmul.cpp",
             KERNEL_DIR / "quant_rows8.cpp"),
            ("-O3", "-mavx512f", "-mavx512bf16", "-mavx512vnni", "-mavx512vl", "-mavx512bw", "-mfma", "-mf16c",
             "-fopenmp", "-fno-math-errno")),
    Variant("avx2 small matmul, fused norm and decode attention, quantized matmul", ("avx2", "fma", "f16c"),
            (KERNEL_DIR / "small_matmul_avx2.cpp", KERNEL_DIR / "layer_ops.cpp", KERNEL_DIR / "quant_matmul.cpp",
             KERNEL_DIR / "quant_rows8.cpp"),
            ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fno-math-errno")),
)

_loaded: tuple[Variant | None, str] | None = None  # None: not tried yet; else (what runs, why not)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def variant() -> Variant | None:
    """The kernels this CPU can run, best first, or those HETPIPE_KERNELS names (`avx2` on an
    AVX512 CPU: the Zen 3 code checked here); None if none."""
    flags, wanted = cpu_flags(), os.environ.get("HETPIPE_KERNELS", "")
    return next((v for v in VARIANTS if set(v.cpu_flags) <= flags and v.name.startswith(wanted)), None)


def lacks_half_gemm() -> bool:
    """An x86 CPU without bf16 arithmetic (AVX512-BF16 or AMX), where oneDNN's bf16/fp16 GEMM is slow."""
    return platform.machine() == "x86_64" and not {"avx512_bf16", "amx_bf16"} & cpu_flags()


def unsupported() -> str | None:
    """Why no kernels can run here, or None."""
    if os.environ.get("HETPIPE_NATIVE", "1") == "0":
        return "HETPIPE_NATIVE=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "not an x86-64 Linux machine"
    if variant() is None:
        return "the CPU has neither AVX512-BF16 nor AVX2 with FMA"
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
        why = unsupported()
        v = None if why else variant()
        why = why or _build(v)
        _loaded = (None if why else v, why)
    return _loaded[1] or None


def running() -> str:
    """The name of the kernels loaded in this process ('' if none): what a stage reports."""
    return _loaded[0].name if _loaded and _loaded[0] else ""


def build_dir(v: Variant | None = None) -> Path:
    """One directory per torch version and per version of the sources and flags, so a build there
    is always a first build (and says so) and never one of torch's renamed rebuilds."""
    v = v or variant()
    digest = hashlib.sha256(repr(v.cflags).encode())
    for src in (*v.sources, *sorted(KERNEL_DIR.glob("*.h"))):
        digest.update(src.read_bytes())
    return hetpipe_home() / "kernels" / f"torch-{torch.__version__}-{digest.hexdigest()[:12]}"


def _build(v: Variant) -> str:
    from torch.utils import cpp_extension

    try:
        out = build_dir(v)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "hetpipe.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released if this process dies, unlike torch's own lock
            (out / "lock").unlink(missing_ok=True)  # file, which a build killed midway leaves forever
            if not any(out.glob("*.so")):
                print(f"hetpipe: building the {v.name} kernels (once per torch and kernel version, ~10 s)",
                      file=sys.stderr)
            cpp_extension.load("hetpipe_kernels", [str(s) for s in v.sources], extra_cflags=list(v.cflags),
                               build_directory=str(out), is_python_module=False)
    except Exception as e:  # an unwritable cache, a compiler error...: torch's own kernels always work
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"hetpipe: the CPU kernels did not build ({why}); torch's own run instead", file=sys.stderr)
        return f"build failed: {why}"
    return ""
