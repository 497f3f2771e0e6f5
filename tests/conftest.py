import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import VARIANTS, make_tiny  # noqa: E402


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
