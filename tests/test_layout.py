"""Boundaries of the design: imports run one way; engine imports neither framework; a stage reads
only its layers."""

import ast
import subprocess
import sys
from pathlib import Path

from engine.core.config import ModelConfig
from engine.core.weights import checkpoint_files, load_stage_tensors


def test_engine_imports_neither_mlx_nor_torch():
    code = ("import sys, pkgutil, importlib, engine, transport; "
            "[importlib.import_module(m.name) for p in (engine, transport) "
            " for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch', 'matplotlib')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


ROOT = Path(__file__).resolve().parent.parent
# layer -> the layers it may import (besides itself). The contract imports nothing of ours; serving,
# backends and transport import the contract; `engine.compose` (specs, planner, loading a stage in
# process) builds on the contract alone; the Python API composes serving, transport and compose;
# the application (CLI, server, benchmarks) builds on the API. Nothing imports the application.
MAY_IMPORT = {
    "engine.core": set(),
    "engine.serving": {"engine.core"},
    "backends": {"engine.core"},
    "transport": {"engine.core"},
    "engine.compose": {"engine.core"},
    "engine.api": {"engine.core", "engine.serving", "engine.compose", "transport"},
    "engine.app": {"engine.core", "engine.serving", "engine.compose", "engine.api", "backends", "transport"},
}


def _layer(module: str) -> str:
    return next(k for k in sorted(MAY_IMPORT, key=len, reverse=True) if module == k or module.startswith(k + "."))


def import_graph() -> dict[str, set[str]]:
    """module -> our modules it imports, from every import statement (inside functions too)."""
    mods = {}
    for pkg in ("engine", "backends", "transport"):
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):
                    deps.add(t)
        graph[name] = deps
    return graph


def test_imports_run_one_way_without_cycles():
    graph = import_graph()
    breaks = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
              if _layer(d) != _layer(m) and _layer(d) not in MAY_IMPORT[_layer(m)]]
    assert not breaks, breaks
    # no cycles: a topological order exists (Kahn's algorithm)
    indegree = {m: 0 for m in graph}
    for deps in graph.values():
        for d in deps:
            indegree[d] += 1
    ready = [m for m, n in indegree.items() if n == 0]
    seen = 0
    while ready:
        m = ready.pop()
        seen += 1
        for d in graph[m]:
            indegree[d] -= 1
            if indegree[d] == 0:
                ready.append(d)
    assert seen == len(graph), sorted(m for m, n in indegree.items() if n > 0)


def test_a_half_stage_reads_about_half_the_weights(real_model):
    cfg = ModelConfig.load(real_model)
    every = load_stage_tensors(real_model, cfg, 0, 29)
    first = load_stage_tensors(real_model, cfg, 0, 14)
    second = load_stage_tensors(real_model, cfg, 15, 29)
    size = lambda ts: sum(t.data.nbytes for t in ts.values())  # noqa: E731
    layer_bytes = size(every) - size({"e": every["model.embed_tokens.weight"], "n": every["model.norm.weight"]})
    layers = lambda ts: {int(n.split(".")[2]) for n in ts if n.startswith("model.layers.")}  # noqa: E731
    assert layers(first) == set(range(15)) and layers(second) == set(range(15, 30))
    # each holds half of the layers plus the embedding (tied: the last stage's head is the embedding)
    emb = every["model.embed_tokens.weight"].data.nbytes
    assert abs(size(first) - emb - layer_bytes / 2) < 0.01 * layer_bytes
    assert "model.embed_tokens.weight" in second and "model.norm.weight" in second


def test_sharded_checkpoint_reads_only_the_needed_shards(tiny_dirs):
    files = checkpoint_files(tiny_dirs["sharded"])
    assert len(set(files.values())) > 1
    cfg = ModelConfig.load(tiny_dirs["sharded"])
    names = set(load_stage_tensors(tiny_dirs["sharded"], cfg, 1, 2))
    assert names and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)


def test_no_function_passes_60_lines():
    """Small pieces: every function in engine/, backends/ and transport/ fits a screen."""
    long = []
    for pkg in ("engine", "backends", "transport"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 60:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_readme_is_a_manual():
    """The README is the manual, at most 300 lines; design, benchmarks and models have their own
    documents under docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    for doc in ("design.md", "benchmarks.md", "models.md"):
        assert (ROOT / "docs" / doc).is_file(), doc
