"""Benchmark outputs: NAME.json, NAME.md (a Markdown table) and NAME.png (matplotlib, imported only here)."""

from __future__ import annotations

import json
from pathlib import Path


def write_outputs(out: Path, name: str, data, table: str, plot) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(data, indent=1))
    paths[1].write_text(table)
    plot(data, paths[2])
    return paths


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
