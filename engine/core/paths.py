"""Where hetpipe keeps what it fetches and builds (models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def hetpipe_home() -> Path:
    """$HETPIPE_HOME, else $XDG_CACHE_HOME/hetpipe, else ~/.cache/hetpipe."""
    return Path(os.environ.get("HETPIPE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hetpipe"))
