"""`hetpipe selftest`: passes on this machine against transformers and against the stored
reference (as where transformers is not installed), and a broken kernel fails it."""

import subprocess
import sys

from engine.app import selftest


def test_selftest_passes_here_against_transformers():
    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "selftest", "--backend", "torch"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == 9 and not any(line.startswith("FAIL") for line in lines)
    assert "against transformers" in r.stdout and "read-bandwidth floor" in r.stdout


def test_selftest_passes_against_the_stored_reference_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from engine.app.cli import main\n"
            "sys.exit(main(['selftest', '--backend', 'torch']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "against the stored reference" in r.stdout and "FAIL" not in r.stdout


def test_a_broken_kernel_fails_it(monkeypatch):
    """The MLP of the torch model off by 2%: every model check fails, and the run says so."""
    from backends.torch_stage.models import llama

    forward = llama.MLP.forward
    monkeypatch.setattr(llama.MLP, "forward", lambda self, x: forward(self, x) * 1.02)
    lines = []
    checks = selftest.run_selftest(["torch"], "cpu", log=lines.append)
    failed = [c.name for c in checks if not c.ok]
    assert any("tiny with cache" in n for n in failed) and any("smollm2" in n for n in failed)
    assert lines[-1].startswith(f"{len(checks) - len(failed)} of {len(checks)} checks passed")
