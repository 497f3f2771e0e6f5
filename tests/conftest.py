import fcntl
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine.app import threads  # noqa: E402

# the short spin-waits `hetpipe` sets for itself and its daemons, before torch or MLX load here:
# in-process stages then share the cores with the daemons a test starts, as `hetpipe` does
threads.apply()

from tiny import VARIANTS, make_tiny  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist (`-n 2`), a test marked `alone` runs, fixtures and all, while no other
    worker runs one: it bounds a time (a stall, an answer "at once") that a neighbour's load would
    stretch. Every other test holds the run's lock shared, so workers otherwise run side by side."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    base = Path(tempfile.gettempdir()) / f"hetpipe-tests-{run}"
    with open(f"{base}.lock", "a") as lock, open(f"{base}.turn", "a") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)  # a turnstile: a test waiting to run alone lets none start meanwhile
        fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH)
        fcntl.flock(turn, fcntl.LOCK_UN)
        yield


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """variant name -> directory of a tiny random checkpoint saved by transformers."""
    base = tmp_path_factory.mktemp("tiny")
    dirs = {v: make_tiny(base / v, v) for v in VARIANTS}
    dirs["sharded"] = make_tiny(base / "sharded", "llama", shard=True)
    return dirs


@pytest.fixture(scope="session")
def real_model():
    """The fetched SmolLM2 directory (`hetpipe fetch smollm2`); CI must have it."""
    from engine.app.fetch import default_model_dir, is_imported

    d = Path(os.environ.get("HETPIPE_MODEL_DIR") or default_model_dir())
    if not is_imported(d):
        msg = f"real model not fetched at {d}: run `hetpipe fetch smollm2`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d
