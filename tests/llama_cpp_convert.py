"""llama.cpp's own `convert_hf_to_gguf.py`, from the llama-cpp-python source package on PyPI: the
reference writer of every GGUF family hetpipe imports.

The first call downloads the source package (about 75 MB) and keeps only the converter, its
`conversion/` package and its `gguf-py` (about 1 MB) under ~/.cache/hetpipe; later calls reuse them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's vendored llama.cpp
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_dir() -> Path:
    home = Path(os.environ.get("HETPIPE_HOME") or Path.home() / ".cache" / "hetpipe")
    out = home / f"llama.cpp-convert-{VERSION}"
    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        part = Path(tmp) / "part"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(_KEEP)]
            tar.extractall(part, members=members, filter="data")
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(str(part / prefix), out)
    return out


_DRIVER = """
import sys
import convert_hf_to_gguf as c
jobs = sys.argv[1:]
for src, out, kind in zip(jobs[::3], jobs[1::3], jobs[2::3]):
    sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", kind, "--outfile", out]
    c.main()
"""


def convert(jobs: list[tuple[Path, Path, str]]) -> None:
    """Convert each (Hugging Face directory, GGUF path, outtype: f32, q8_0, ...) in one process."""
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv), str(conv / "gguf-py")])}
    args = [str(x) for job in jobs for x in job]
    r = subprocess.run([sys.executable, "-c", _DRIVER, *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama.cpp's converter failed:\n{r.stderr[-3000:]}")


if __name__ == "__main__":  # setup.sh fetches it with the model, so the tests find it in place
    print(converter_dir())
