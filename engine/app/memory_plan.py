"""`hetpipe plan`: what fits where, before anything is loaded.

From the config alone (never the weights: a Hub id's config and index, a directory's config, a
GGUF's header after its one-time import), for each stage: its layers, the weight bytes they hold at
a bit width (`--bits 4|8|16`, or the checkpoint's own), the KV bytes at `--context` x
`--concurrency`, and the memory left. A stage's memory is what `--devices` says (or what a live
daemon reports free); RESERVE of it is kept for activations and the runtime. The split is the
planner's (`planner.py`): contiguous ranges, the slowest stage as fast as it can be, each within
its memory, its time the bytes a token reads divided by its device's read bandwidth (from a live
daemon's timing, or the DEVICES table). A plan that does not fit is refused with its shortfall and
the bit width that would fit.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..core.base_stage import MEMORY_RESERVE
from ..core.config import ModelConfig
from ..core.errors import UserError
from ..core.layer_cost import head_read_bytes, layer_cost, per_weight
from ..core.quant import QuantScheme
from ..core.tensors import itemsize
from ..compose.planner import StageCapacity, plan_layers

RESERVE = MEMORY_RESERVE  # of a stage's memory, kept for activations, the runtime and the OS (a daemon's rule too)
GROUP = 64  # the group size of a plan at 4 or 8 bits (hetpipe quantize's default)
GB = 10**9

# read bandwidth, GB/s, of named devices (their makers' figures): one decoded token reads every
# weight once, so bytes / bandwidth is a stage's floor per token
DEVICES = {
    "m1": 68, "m1-pro": 200, "m1-max": 400, "m1-ultra": 800, "m2": 100, "m2-pro": 200, "m2-max": 400,
    "m2-ultra": 800, "m3": 100, "m3-pro": 150, "m3-max": 400, "m3-ultra": 819, "m4": 120, "m4-pro": 273,
    "m4-max": 546, "rtx3090": 936, "rtx4090": 1008, "rtx5090": 1792, "a100-40gb": 1555, "a100-80gb": 2039,
    "l4": 300, "l40s": 864, "h100": 3350, "h200": 4800, "ddr4-2ch": 51, "ddr5-2ch": 90,
}


@dataclass(slots=True)
class Device:
    """One stage's machine: `NAME=BACKEND:DEVICE:MEMORY` (`mac=mlx:m2-max:64GB`); DEVICE is a name of
    the DEVICES table, or a plain one (gpu, cuda, cpu) whose bandwidth is then unknown."""

    name: str
    backend: str
    device: str
    memory: int  # bytes
    bandwidth: float | None  # bytes/s

    @classmethod
    def parse(cls, text: str) -> Device:
        m = re.fullmatch(r"([\w.-]+)=(mlx|torch):([\w.-]+):([\d.]+)\s*(GB|GiB|TB)?", text.strip())
        if not m:
            raise UserError(f"--devices entry {text!r}: expected NAME=BACKEND:DEVICE:MEMORY, like mac=mlx:m2-max:64GB")
        name, backend, device, amount, unit = m.groups()
        scale = {"GB": GB, "GiB": 1 << 30, "TB": 10**12, None: GB}[unit]
        bw = DEVICES.get(device.lower())
        return cls(name, backend, device, int(float(amount) * scale), None if bw is None else bw * GB)


@dataclass(slots=True)
class StagePlan:
    name: str
    layers: tuple[int, int]
    weight_bytes: int
    kv_bytes: int
    free_bytes: int  # memory left: memory x (1 - RESERVE) - weights - KV (negative: short)
    ms_per_token: float | None


@dataclass(slots=True)
class MemoryPlan:
    bits: int
    context: int
    concurrency: int
    stages: list[StagePlan]
    fits: bool
    predicted_tokens_per_s: float | None
    fits_at: int | None = None  # the widest bit width at which it would fit, when it does not
    shortfall: int = 0  # bytes missing on the stage worst off
    single_device: str | None = None  # the fastest device that could hold the model alone, if faster

    def to_json(self) -> dict:
        return {"stages": [{"name": s.name, "layers": list(s.layers), "weight_bytes": s.weight_bytes,
                            "kv_bytes": s.kv_bytes, "free_bytes": s.free_bytes} for s in self.stages],
                "fits": self.fits, "predicted_tokens_per_s": self.predicted_tokens_per_s, "bits": self.bits,
                "context": self.context, "concurrency": self.concurrency, "fits_at_bits": self.fits_at,
                "shortfall_bytes": self.shortfall, "faster_on_one_device": self.single_device}


def at_bits(cfg: ModelConfig, bits: int | None) -> ModelConfig:
    """The config as if quantized at `bits` (16: half-precision floats; None: as the checkpoint is)."""
    if bits is None:
        return cfg
    if bits not in (4, 8, 16):
        raise UserError("--bits must be 4, 8 or 16")
    return dataclasses.replace(cfg, quantization=None if bits == 16 else QuantScheme(bits, GROUP))


def layer_bytes(cfg: ModelConfig, layer: int, dtype: str = "bfloat16") -> int:
    return int(layer_cost(cfg, layer, dtype).held)


def kv_bytes_per_layer(cfg: ModelConfig, tokens: int, dtype: str = "bfloat16") -> int:
    """K and V of one layer: 2 x KV heads x head dim x bytes x tokens."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize(dtype) * tokens


def ends_bytes(cfg: ModelConfig, first: bool, last: bool, dtype: str = "bfloat16") -> int:
    """The embedding on the first stage; the final norm and the head on the last (the embedding
    again, when tied: the last stage needs it as its head)."""
    embed = cfg.vocab_size * cfg.hidden_size * per_weight(cfg, "model.embed_tokens", dtype)
    return int((embed if first else 0) + (head_read_bytes(cfg, dtype) if last else 0))


def plan_memory(cfg: ModelConfig, devices: list[Device], *, bits: int | None = None, context: int | None = None,
                concurrency: int = 1, measured_ms: list[float] | None = None, kv_dtype: str = "bfloat16") -> MemoryPlan:
    """The split of `cfg` over `devices` (in pipeline order), its memory per stage and its speed.
    `measured_ms`: live daemons' ms per timed layer (else bandwidths from the DEVICES table);
    `kv_dtype`: what the KV cache holds (2 bytes a value on GPUs and Metal; a CPU stage in float32, 4)."""
    if concurrency < 1:
        raise UserError("--concurrency must be at least 1")
    context = context or cfg.max_position_embeddings
    plan_cfg = at_bits(cfg, bits)
    n = cfg.num_hidden_layers
    if len(devices) > n:
        raise UserError(f"{len(devices)} devices for a model of {n} layers")
    per_layer = [layer_bytes(plan_cfg, i) + kv_bytes_per_layer(cfg, context * concurrency, kv_dtype) for i in range(n)]
    unit = max(per_layer)
    caps = []
    for i, d in enumerate(devices):
        room = d.memory * (1 - RESERVE) - ends_bytes(plan_cfg, i == 0, i == len(devices) - 1)
        read = sum(layer_cost(plan_cfg, j, "bfloat16").read for j in range(n)) / n
        ms = (measured_ms[i] if measured_ms else (1000 * read / d.bandwidth if d.bandwidth else 0.0))
        caps.append(StageCapacity(d.name, ms, max(int(room // unit), 0)))
    try:
        ranges = plan_layers(caps, n).ranges
        fits = True
    except UserError:  # does not fit: an even split shows by how much
        ranges = [(a, b) for a, b in _even(n, len(devices))]
        fits = False
    stages = []
    for i, (d, (a, b)) in enumerate(zip(devices, ranges)):
        weights = sum(layer_bytes(plan_cfg, j) for j in range(a, b + 1)) + ends_bytes(plan_cfg, i == 0,
                                                                                       i == len(devices) - 1)
        kv = (b - a + 1) * kv_bytes_per_layer(cfg, context * concurrency, kv_dtype)
        free = int(d.memory * (1 - RESERVE)) - weights - kv
        read = sum(layer_cost(plan_cfg, j, "bfloat16").read for j in range(a, b + 1)) + (
            head_read_bytes(plan_cfg, "bfloat16") if i == len(devices) - 1 else 0)
        ms = None if not d.bandwidth else 1000 * read / d.bandwidth
        if measured_ms:
            ms = measured_ms[i] * (b - a + 1)
        stages.append(StagePlan(d.name, (a, b), weights, kv, free, ms))
    fits = fits and all(s.free_bytes >= 0 for s in stages)
    times = [s.ms_per_token for s in stages]
    predicted = None if None in times else 1000 / sum(times)
    out = MemoryPlan(bits or _bits_of(cfg), context, concurrency, stages, fits, predicted)
    if not fits:
        out.shortfall = -min(s.free_bytes for s in stages)
        for b in (8, 4):
            if b < out.bits and plan_memory(cfg, devices, bits=b, context=context, concurrency=concurrency, kv_dtype=kv_dtype).fits:
                out.fits_at = b
                break
    elif predicted is not None:
        out.single_device = _faster_alone(cfg, plan_cfg, devices, context * concurrency, predicted, kv_dtype)
    return out


def _faster_alone(cfg, plan_cfg, devices, tokens, predicted, kv_dtype) -> str | None:
    """The fastest device that could hold the whole model by itself, if it beats the split."""
    total = sum(layer_bytes(plan_cfg, j) for j in range(cfg.num_hidden_layers)) + ends_bytes(plan_cfg, True, True)
    total += cfg.num_hidden_layers * kv_bytes_per_layer(cfg, tokens, kv_dtype)
    read = sum(layer_cost(plan_cfg, j, "bfloat16").read for j in range(cfg.num_hidden_layers))
    read += head_read_bytes(plan_cfg, "bfloat16")
    best = None
    for d in devices:
        if d.bandwidth and d.memory * (1 - RESERVE) >= total and d.bandwidth / read > predicted:
            if best is None or d.bandwidth > best.bandwidth:
                best = d
    return None if best is None else best.name


def _bits_of(cfg: ModelConfig) -> int:
    return cfg.quantization.bits if cfg.quantization else 16


def _even(n: int, k: int) -> list[tuple[int, int]]:
    from ..core.partition import even_split

    return even_split(n, k)


def format_plan(p: MemoryPlan) -> str:
    lines = [f"plan at {p.bits} bits, context {p.context} x {p.concurrency}:"]
    for s in p.stages:
        speed = "" if s.ms_per_token is None else f", {s.ms_per_token:.1f} ms/token"
        lines.append(f"  {s.name}: layers {s.layers[0]}-{s.layers[1]}, weights {s.weight_bytes / GB:.2f} GB, "
                     f"KV {s.kv_bytes / GB:.2f} GB, {'left' if s.free_bytes >= 0 else 'SHORT'} "
                     f"{abs(s.free_bytes) / GB:.2f} GB{speed}")
    if p.predicted_tokens_per_s is not None:
        lines.append(f"  predicted {p.predicted_tokens_per_s:.1f} tokens/s (one stream, from read bandwidth)")
    if p.single_device:
        lines.append(f"  warning: {p.single_device} alone holds the model and would be faster than this split")
    return "\n".join(lines)
