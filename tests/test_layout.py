"""Boundaries of the design: engine imports neither framework; a stage reads only its layers."""

import subprocess
import sys

from engine.config import ModelConfig
from engine.weights import checkpoint_files, load_stage_tensors


def test_engine_imports_neither_mlx_nor_torch():
    code = ("import sys, engine.cli, engine.generate, engine.pipeline, engine.stage, engine.fetch, "
            "engine.gguf_import, engine.tokenizer, engine.sampling, transport; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


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
