"""`hetpipe bench backends`: what each backend delivers on one layer range.

For every backend importable here and each dtype, the same layer range is loaded in a process of
its own (so each keeps its own BLAS and threads) and timed: prefill tokens/s for one prompt,
decode tokens/s for one stream, ms per layer per decoded token, and the memory floor (the weight
bytes a decode step reads against the read bandwidth the stage measures on its device).
Writes backends.json, backends.md and backends.png under the output directory.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ...core.config import ModelConfig
from ...core.layer_cost import head_read_bytes, layer_cost
from ...core.partition import check_range
from ...core.shapes import ShapeModel
from ...compose import allocator
from ...compose.stages import available_backends
from .report import pyplot


def decode_weight_bytes(cfg: ModelConfig, first: int, last: int, dtype: str) -> int:
    """Weight bytes one decode step reads on layers [first, last]: every projection and norm (of a MoE
    layer, the router and top-k experts only), and the head on the last stage (the embedding is a
    lookup of one row: not counted)."""
    total = sum(layer_cost(cfg, i, dtype).read for i in range(first, last + 1))
    if last == cfg.num_hidden_layers - 1:
        total += head_read_bytes(cfg, dtype)
    return int(total)


def quantized_copy(model_dir: str, bits: int, group_size: int) -> str:
    """`model_dir` quantized at bits/group (made once with `hetpipe quantize`, kept beside it)."""
    from ..fetch import models_home
    from ..quantize import quantize_dir

    out = models_home() / "quantized" / f"{Path(model_dir).resolve().name}-q{bits}g{group_size}"
    if not (out / "config.json").is_file():
        quantize_dir(model_dir, out, bits, group_size, progress=False)
    return str(out)


def scheme_name(cfg: ModelConfig) -> str:
    q = cfg.quantization
    return "float" if q is None else f"{q.bits}-bit g{q.group_size}"


def time_stage(backend: str, model: str, first: int, last: int, dtype: str, prompt_len: int, tokens: int) -> dict:
    """Prefill and decode one sequence through one in-process stage; medians of three. `model`: a
    directory, or a `ShapeModel`'s spec (random weights made here)."""
    from ...core.sampling import SamplingParams
    from ...core.stage import SeqChunk, StageBatch
    from ...core.tensors import TypedArray
    from ...compose.stages import load_stage

    source = ShapeModel.parse(model) if model.startswith("shape:") else model
    cfg = source.config if isinstance(source, ShapeModel) else ModelConfig.load(model)
    stage = load_stage(backend, source, first, last, dtype=dtype)
    sampling = SamplingParams() if stage.info.is_last else None
    rng = np.random.default_rng(0)

    def batch(sid, offset, n):
        ids = rng.integers(0, cfg.vocab_size, n).astype(np.int32)
        hidden = None if stage.info.is_first else TypedArray.from_float32(
            rng.standard_normal((n, cfg.hidden_size)).astype(np.float32), dtype)
        return StageBatch([SeqChunk(sid, offset, ids, sampling)], hidden)

    prefill, decode = [], []
    for run in range(3):
        t = time.perf_counter()
        stage.forward(batch(run, 0, prompt_len))
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(tokens):
            stage.forward(batch(run, prompt_len + i, 1))
        decode.append((time.perf_counter() - t) / tokens)
        stage.release([run])
    step = statistics.median(decode)
    weights = decode_weight_bytes(cfg, first, last, dtype)
    bandwidth = stage.read_bandwidth()
    return {"backend": backend, "device": stage.info.device, "dtype": dtype, "layers": [first, last],
            "model": str(source) if isinstance(source, ShapeModel) else model,
            "weights": scheme_name(cfg), "bits": cfg.quantization.bits if cfg.quantization else None,
            "group_size": cfg.quantization.group_size if cfg.quantization else None,
            "prefill_tokens_per_s": prompt_len / statistics.median(prefill),
            "decode_tokens_per_s": 1 / step, "ms_per_layer": step * 1000 / (last - first + 1),
            # the memory floor: one stream reads every weight once per token, so it can go no faster
            # than the device's read bandwidth over those bytes
            "weight_bytes_per_token": weights, "weights_gb_per_s": weights / step / 1e9,
            "memory_read_gb_per_s": bandwidth / 1e9 if bandwidth else None,
            "floor_tokens_per_s": bandwidth / weights if bandwidth else None,
            "of_floor": weights / step / bandwidth if bandwidth else None,
            "prompt_len": prompt_len, "decode_tokens": tokens, "allocator": allocator.in_use(),
            "kernels": stage.kernels or "framework"}


def run_backends(model_dir: str | None, layers: tuple[int, int] | None, dtypes: list[str], prompt_len: int,
                 tokens: int, log=print, quant: tuple[tuple[int, int], ...] = (), shape: str | None = None,
                 shape_layers: int = 2, backends: list[str] | None = None) -> list[dict]:
    """Each backend x dtype on `model_dir`, then on its quantized copies at each (bits, group); with
    `shape`, on that many layers (and the head) of random weights at a big model's widths instead."""
    if shape is not None:
        models = [ShapeModel(shape, shape_layers)] + [ShapeModel(shape, shape_layers, b, g) for b, g in quant]
        dirs, (first, last) = [m.spec for m in models], (0, shape_layers - 1)
    else:
        cfg = ModelConfig.load(model_dir)
        first, last = layers or (0, cfg.num_hidden_layers - 1)
        check_range(first, last, cfg.num_hidden_layers)
        dirs = [model_dir] + ([quantized_copy(model_dir, b, g) for b, g in quant] if cfg.quantization is None else [])
    rows = []
    for backend, d, dtype in ((b, d, t) for d in dirs for b in backends or available_backends() for t in dtypes):
        args = [backend, d, str(first), str(last), dtype, str(prompt_len), str(tokens)]
        r = subprocess.run([sys.executable, "-m", "engine.app.bench.backends", *args],
                           capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            log(f"{backend} {dtype}: failed: {tail}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        x = rows[-1]
        log(f"{backend} {x['device']} {dtype} {x['weights']}: prefill {x['prefill_tokens_per_s']:.0f} tokens/s, decode "
            f"{x['decode_tokens_per_s']:.1f} tokens/s, {x['ms_per_layer']:.2f} ms/layer, "
            f"weights read at {x['weights_gb_per_s']:.1f} GB/s{_floor(x)}")
    return rows


def _floor(x: dict) -> str:
    if x["floor_tokens_per_s"] is None:
        return ""
    return (f" of {x['memory_read_gb_per_s']:.1f} GB/s measured ({x['of_floor']:.0%} of the memory floor, "
            f"{x['floor_tokens_per_s']:.0f} tokens/s)")


def backends_table(rows: list[dict]) -> str:
    lines = ["| model | backend | device | dtype | weights | layers | prefill tokens/s | decode tokens/s "
             "| ms per layer (decode) "
             "| weight MB per token | weights read GB/s | memory read GB/s | memory floor tokens/s | of floor | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        floor = (f"{x['memory_read_gb_per_s']:.1f} | {x['floor_tokens_per_s']:.0f} | {x['of_floor']:.0%}"
                 if x["floor_tokens_per_s"] else "- | - | -")
        lines.append(f"| {Path(x.get('model', '-')).name} | {x['backend']} | {x['device']} | {x['dtype']} | "
                     f"{x['weights']} | "
                     f"{x['layers'][0]}-{x['layers'][1]} | {x['prefill_tokens_per_s']:.0f} | "
                     f"{x['decode_tokens_per_s']:.1f} | {x['ms_per_layer']:.2f} | {x['weight_bytes_per_token'] / 1e6:.1f} | "
                     f"{x['weights_gb_per_s']:.1f} | {floor} | {x['kernels']} |")
    return "\n".join(lines) + "\n"


def backends_plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    names = [f"{x['backend']}\n{x['device']} {x['dtype']}" for x in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s (one stream)"),
                           (axes[1], "prefill_tokens_per_s", "prefill tokens/s")):
        ax.bar(names, [x[key] for x in rows], color="tab:blue")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # a worker: python -m engine.app.bench.backends BACKEND MODEL FIRST LAST DTYPE LEN TOKENS
    _, backend, model, first, last, dtype, prompt_len, tokens = sys.argv
    print(json.dumps(time_stage(backend, model, int(first), int(last), dtype, int(prompt_len), int(tokens))))
