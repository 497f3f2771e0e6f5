"""`pip install hetpipe` with no extras is a coordinator: a fresh venv holds neither torch nor mlx
(nor matplotlib), and drives an MLX and a torch stage daemon to the same tokens as in-process stages."""

import json
import subprocess
import venv
from pathlib import Path

import pytest

from engine.api import Generator, local_pipeline
from engine.app.procs import start_stage, stop_stages

ROOT = Path(__file__).resolve().parent.parent

COORDINATOR = """
import importlib.util, json, sys
from engine.api import Generator, connect_pipeline
absent = [m for m in ("torch", "mlx", "matplotlib") if importlib.util.find_spec(m) is not None]
with Generator(sys.argv[1], connect_pipeline(sys.argv[1], sys.argv[2], log=lambda m: None)) as gen:
    res = gen.generate("Name three colours.", chat=True, max_tokens=8, ignore_eos=True)
loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "mlx")]
where = __import__("engine").__file__
print(json.dumps({"installed": absent, "loaded": loaded, "tokens": res.token_ids, "file": where}))
"""


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
    d = tmp_path_factory.mktemp("coordinator") / "venv"
    venv.create(d, with_pip=True)
    r = subprocess.run([str(d / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        str(ROOT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return d


def test_a_base_install_drives_mlx_and_torch_daemons(base_venv, real_model, tmp_path):
    procs = [start_stage(backend, real_model) for backend in ("mlx", "torch")]
    try:
        spec = f"{procs[0][1]}=0-14,{procs[1][1]}=15-29"
        r = subprocess.run([str(base_venv / "bin" / "python"), "-c", COORDINATOR, str(real_model), spec],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)  # not the source tree
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        stop_stages([p for p, _ in procs])
    assert out["installed"] == [] and out["loaded"] == []
    assert str(base_venv) in out["file"]  # the installed package, not this checkout
    with Generator(real_model, local_pipeline(real_model, "mlx:0-14,torch:15-29")) as gen:
        want = gen.generate("Name three colours.", chat=True, max_tokens=8, ignore_eos=True).token_ids
    assert out["tokens"] == want
