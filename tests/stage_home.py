"""A stage daemon's own $HETPIPE_HOME for a test (a machine of its own: its own weights store),
sharing the compiled kernels of the usual one so it does not build them again."""

from pathlib import Path

from engine.core.paths import hetpipe_home


def stage_home(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    kernels = hetpipe_home() / "kernels"
    if kernels.is_dir() and not (home / "kernels").exists():
        (home / "kernels").symlink_to(kernels)
    return home


def held_tensors(home: Path) -> set[str]:
    """The tensors a daemon's weights store holds, by its index."""
    import json

    index = next(home.glob("weights/*/model.safetensors.index.json"))
    return set(json.loads(index.read_text())["weight_map"])
