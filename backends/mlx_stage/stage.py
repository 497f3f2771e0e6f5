"""The MLX stage: a `Stage` whose layers run in mlx.core (Metal GPU on a Mac, CPU elsewhere)."""

from __future__ import annotations

import importlib
import sys
import time

import mlx.core as mx
import numpy as np

from engine.core.base_stage import PROBE_BYTES, BaseStage, Layout
from engine.core.config import ModelConfig, rope_inv_freq
from engine.core.errors import UserError
from engine.core.stage import SeqChunk, StageInfo
from engine.core.quant import QuantTensor
from engine.core.tensors import TypedArray
from engine.core.weights import load_stage_tensors

from . import blas
from .cache import PagedKV

MLX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def to_mlx(a, dtype: mx.Dtype) -> mx.array:
    """A typed numpy array to an mx.array of `dtype`; bfloat16 words are viewed, not converted."""
    if a.dtype == "bfloat16":
        return mx.array(np.ascontiguousarray(a.data)).view(mx.bfloat16).astype(dtype)
    return mx.array(np.ascontiguousarray(a.data)).astype(dtype)


def to_hidden(x: mx.array, dtype: str) -> TypedArray:
    if x.dtype == mx.bfloat16:
        return TypedArray(np.array(x.view(mx.uint16)), dtype)
    return TypedArray(np.array(x), dtype)


class MLXStage(BaseStage):
    def __init__(self, model_dir, cfg: ModelConfig, first: int, last: int, device: str, dtype: str):
        super().__init__(StageInfo("mlx", device, dtype, first, last, cfg.num_hidden_layers), cfg)
        self.dtype = MLX_DTYPES[dtype]
        raw = load_stage_tensors(model_dir, cfg, first, last)
        # quantized weights stay QuantTensors: the model loads their codes as they are (quant.py)
        weights = {name: t if isinstance(t, QuantTensor) else to_mlx(t, self.dtype) for name, t in raw.items()}
        # mx.fast.rope takes periods (1 / inverse frequency); gemma3's windowed layers have their own
        freqs = {local: mx.array(1.0 / rope_inv_freq(cfg, local)) for local in (False, True)
                 if local is False or cfg.local_rope_theta is not None}
        model_cls = importlib.import_module(f"{__package__}.models.{cfg.family}").StageModel
        self.model = model_cls(cfg, weights, first, last, freqs)
        # everything evaluated here, so the stage may run on another thread (MLX streams are per thread)
        mx.eval(self.model.parameters(), list(freqs.values()))
        self.windows = cfg.windows(first, last)
        self.kv = PagedKV(last - first + 1, cfg.num_key_value_heads, cfg.head_dim, self.dtype)
        self.blocks = self.kv.blocks

    def free_memory(self) -> int:
        if self.info.device == "gpu":  # unified memory: what Metal recommends, less what MLX holds
            info = mx.device_info()
            return max(0, int(info.get("max_recommended_working_set_size", 0)) - mx.get_active_memory())
        return super().free_memory()

    def total_memory(self) -> int:
        if self.info.device == "gpu":
            return int(mx.device_info().get("max_recommended_working_set_size", 0)) or super().total_memory()
        return super().total_memory()

    def read_bandwidth(self) -> float:
        """Timed as one row times a 256 MiB matrix (what decode does), not as a sum: MLX's CPU
        reductions run on one thread, while BLAS spreads a matrix-vector product over the cores."""
        n = int((PROBE_BYTES // 4) ** 0.5)
        a, v = mx.ones((n, n), dtype=mx.float32), mx.ones((1, n), dtype=mx.float32)
        mx.eval(a, v)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            mx.eval(v @ a)
            best = min(best, time.perf_counter() - t)
        return n * n * 4 / best

    def close(self) -> None:
        """Free every sequence and the layers; call it on the thread that ran the stage, so the
        compiled graphs MLX keeps for that thread go now (see `models/llama.py`)."""
        super().close()
        self.model = None

    def _compute(self, seqs: list[SeqChunk], hidden: TypedArray | None):
        lay = Layout.of(seqs)
        if hidden is None:
            x = mx.array(np.concatenate([s.token_ids for s in seqs]).astype(np.int32))
        else:
            x = to_mlx(hidden, self.dtype)
        plans = self.kv.plan([s.seq_id for s in seqs], lay.starts, lay.lengths, lay.offsets, self.windows)
        out = self.model(x, mx.array(lay.positions.astype(np.int32)), plans, self.kv, mx.array(lay.sample_rows))
        mx.eval(out, *self.kv.arrays())
        if self.info.is_last:
            return np.array(out)
        return to_hidden(out, self.info.dtype)


def auto_dtype(device: str | None, checkpoint: str) -> str:
    """`--dtype auto` on MLX: the checkpoint's own dtype on Metal (which computes bf16 and fp16
    natively), float32 on the CPU backend (its half-precision matmuls are slower than float32's)."""
    device = device or ("gpu" if mx.metal.is_available() else "cpu")
    return checkpoint if device == "gpu" else "float32"


def create_stage(model_dir, cfg: ModelConfig, first: int, last: int, *, device=None, dtype="float32",
                 threads=None, compile: bool = False) -> MLXStage:
    """`compile` is accepted for symmetry: the MLX model compiles its MLP always (`mx.compile`)."""
    device = device or ("gpu" if mx.metal.is_available() else "cpu")
    if device not in ("gpu", "cpu"):
        raise UserError(f"mlx device must be gpu or cpu, not {device!r}")
    if device == "gpu" and not mx.metal.is_available():
        raise UserError("mlx device 'gpu' needs Metal, which this machine lacks; use device 'cpu'")
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    if threads and device == "cpu" and not blas.set_threads(threads):
        print("hetpipe: a thread count has no effect on MLX without OpenBLAS", file=sys.stderr)
    if device == "cpu" and sys.platform.startswith("linux") and blas.loaded is None:
        print("hetpipe: OpenBLAS not found; MLX CPU matmuls use the slow reference BLAS "
              "(apt-get install libopenblas0-pthread)", file=sys.stderr)
    stage = MLXStage(model_dir, cfg, first, last, device, dtype)
    stage.warmup()
    return stage
