"""Quantized weights, framework-neutral: MLX's affine scheme and its on-disk layout.

A weight (N, K) is held as codes q in [0, 2^bits) with one scale and one bias per group of
`group_size` along the input axis K:

    w[n, k] = scales[n, k // group_size] * q[n, k] + biases[n, k // group_size]

On disk (and in `QuantTensor.codes`) the codes are packed into uint32 words (N, K * bits / 32),
as one little-endian bit stream per row, least significant bit first: the layout `mx.quantize`
writes, so a directory of these loads in mlx-lm. Each backend re-lays the codes for its own
kernels when it loads them (`backends/*/quant.py`).

The config block, as mlx-lm writes it (mirrored as `quantization_config`):
    "quantization": {"group_size": 64, "bits": 4, "<module path>": {"group_size": .., "bits": ..} | false}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .tensors import TypedArray

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def check_scheme(bits: int, group_size: int, where: str = "quantization") -> None:
    if bits not in BITS:
        raise UserError(f"{where}: bits {bits!r} is not one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"{where}: group_size {group_size!r} is not one of {', '.join(map(str, GROUP_SIZES))}")


@dataclass(frozen=True, slots=True)
class QuantTensor:
    codes: np.ndarray  # uint32 (N, K * bits / 32)
    scales: TypedArray  # (N, K / group_size)
    biases: TypedArray  # (N, K / group_size)
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.scales.data.shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.data.nbytes + self.biases.data.nbytes

    def unpack(self) -> np.ndarray:
        """The codes, one uint8 per weight: (N, K)."""
        return unpack(self.codes, self.bits, self.shape[1])

    def float_parts(self) -> tuple[np.ndarray, np.ndarray]:
        return self.scales.to_float32(), self.biases.to_float32()

    def dequantize(self) -> np.ndarray:
        """float32 (N, K): the weight the codes stand for, computed in float32."""
        n, k = self.shape
        s, b = self.float_parts()
        q = self.unpack().reshape(n, k // self.group_size, self.group_size).astype(np.float32)
        return (s[..., None] * q + b[..., None]).reshape(n, k)

    def rows(self, index: np.ndarray) -> QuantTensor:
        """The rows `index` (output channels), e.g. un-permuted: groups run along K, so rows move whole."""
        return QuantTensor(self.codes[index], TypedArray(self.scales.data[index], self.scales.dtype),
                           TypedArray(self.biases.data[index], self.biases.dtype), self.bits, self.group_size)


def concat_rows(ws: list) -> QuantTensor | None:
    """The rows of several QuantTensors of one scheme stacked as one (fused q/k/v, gate/up), else None."""
    if not all(isinstance(w, QuantTensor) for w in ws):
        return None
    first = ws[0]
    if any((w.bits, w.group_size, w.shape[1], w.scales.dtype, w.biases.dtype)
           != (first.bits, first.group_size, first.shape[1], first.scales.dtype, first.biases.dtype) for w in ws):
        return None
    if len(ws) == 1:
        return first
    cat = lambda parts: np.concatenate(parts, axis=0)  # noqa: E731
    return QuantTensor(cat([w.codes for w in ws]), TypedArray(cat([w.scales.data for w in ws]), first.scales.dtype),
                       TypedArray(cat([w.biases.data for w in ws]), first.biases.dtype), first.bits, first.group_size)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (N, K) -> uint32 words (N, K * bits / 32), LSB first."""
    n, k = q.shape
    if (k * bits) % 32:
        raise UserError(f"a row of {k} weights at {bits} bits does not fill whole 32-bit words")
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if bits == 8:
        packed = q
    elif bits == 4:
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
    elif bits == 2:
        packed = q[:, 0::4] | (q[:, 1::4] << 2) | (q[:, 2::4] << 4) | (q[:, 3::4] << 6)
    else:  # 3, 5, 6: a plain bit stream
        stream = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits].reshape(n, k * bits)
        packed = np.packbits(stream, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").reshape(n, k * bits // 32)


def unpack(codes: np.ndarray, bits: int, k: int) -> np.ndarray:
    """uint32 words (N, K * bits / 32) -> uint8 codes (N, K)."""
    n = codes.shape[0]
    b = np.ascontiguousarray(codes).view(np.uint8).reshape(n, -1)
    if bits == 8:
        return b[:, :k].copy()
    if bits in (2, 4):
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)[None, None, :]
        return ((b[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(n, -1)[:, :k].astype(np.uint8)
    stream = np.unpackbits(b, axis=-1, bitorder="little")[:, : k * bits].reshape(n, k, bits)
    return np.packbits(stream, axis=-1, bitorder="little")[..., 0]


def from_codes(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> QuantTensor:
    """A QuantTensor from uint8 codes (N, K) and float scales and biases (N, K / group): held in
    float16 where both are exactly float16 (GGUF's Q4_0, Q4_1, Q5_x and Q8_0 store d and m so), else
    float32."""
    s, b = np.ascontiguousarray(scales, np.float32), np.ascontiguousarray(biases, np.float32)
    if _exact_half(s) and _exact_half(b):
        return QuantTensor(pack(q, bits), TypedArray(s.astype(np.float16), "float16"),
                           TypedArray(b.astype(np.float16), "float16"), bits, group_size)
    return QuantTensor(pack(q, bits), TypedArray(s, "float32"), TypedArray(b, "float32"), bits, group_size)


def _exact_half(a: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    return bool(np.isfinite(h).all() and np.array_equal(h.astype(np.float32), a))


def quantize(w: np.ndarray, bits: int, group_size: int, half: bool = False, symmetric: bool = False) -> QuantTensor:
    """Affine min/max quantization of a float (N, K) weight, float32 scales and biases; with `half`,
    float16 ones where every group's fit float16's normal range (each scale rounded up and each
    minimum down to a float16 before the codes are chosen, so the codes still span the group).
    `symmetric`: w = s * (q - 2^(bits-1)), s = max|w| / (2^(bits-1) - 1), the bias -2^(bits-1) s (GGUF's
    Q8_0 form, which kernels read without the biases)."""
    check_scheme(bits, group_size)
    n, k = w.shape
    if k % group_size:
        raise UserError(f"a row of {k} weights does not split into groups of {group_size}")
    g = np.asarray(w, np.float32).reshape(n, k // group_size, group_size)
    if symmetric:
        mid = 1 << (bits - 1)
        scales = np.maximum(np.abs(g).max(axis=-1) / (mid - 1), np.float32(1e-12)).astype(np.float32)
        if half and _half_normal(scales * mid):
            scales = _to_half(scales, up=True)
        q = np.clip(np.rint(g / scales[..., None]) + mid, 0, 2 * mid - 1).astype(np.uint8)
        return from_codes(q.reshape(n, k), scales, -mid * scales, bits, group_size)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    levels = (1 << bits) - 1
    scales = np.maximum((hi - lo) / levels, np.float32(1e-12)).astype(np.float32)
    if half and _half_normal(scales) and _half_normal(lo, zero=True):
        scales, lo = _to_half(scales, up=True), _to_half(lo, up=False)
    q = np.clip(np.rint((g - lo[..., None]) / scales[..., None]), 0, levels).astype(np.uint8)
    return from_codes(q.reshape(n, k), scales, lo, bits, group_size)


def _half_normal(a: np.ndarray, zero: bool = False) -> bool:
    """Whether float16 holds `a` to its full precision: every magnitude in its normal range (or 0)."""
    m = np.abs(a)
    return bool((m <= 60000).all() and ((m >= 2.0**-14) | (zero & (m == 0))).all())


def _to_half(a: np.ndarray, up: bool) -> np.ndarray:
    """`a` rounded to the float16 at or above it (`up`), or at or below it, as float32."""
    h = a.astype(np.float16)
    off = h.astype(np.float32) < a if up else h.astype(np.float32) > a
    h[off] = np.nextafter(h[off], np.float16(np.inf if up else -np.inf))
    return h.astype(np.float32)


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """What a checkpoint's `quantization` block says: a default, and per-module overrides
    (`None`: that module is not quantized)."""

    bits: int
    group_size: int
    overrides: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    @classmethod
    def from_config(cls, d: dict) -> QuantScheme | None:
        block = d.get("quantization") or d.get("quantization_config")
        if not block:
            return None
        if "quant_method" in block:  # GPTQ, AWQ, bitsandbytes...: other layouts and kernels
            raise UserError(f"quantization_config.quant_method {block['quant_method']!r} is not supported; "
                            "supported: MLX affine checkpoints (a `quantization` block with bits and group_size)")
        mode = block.get("mode", "affine")
        if mode != "affine":
            raise UserError(f"quantization.mode {mode!r} is not supported; supported: affine")
        bits, group = block.get("bits", 4), block.get("group_size", 64)
        check_scheme(bits, group)
        overrides = {}
        for key, v in block.items():
            if key in ("bits", "group_size", "mode", "quant_method"):
                continue
            if v is False:
                overrides[key] = None
            elif isinstance(v, dict):
                if v.get("mode", "affine") != "affine":
                    raise UserError(f"quantization.{key}.mode {v['mode']!r} is not supported; supported: affine")
                check_scheme(v.get("bits", bits), v.get("group_size", group), f"quantization.{key}")
                overrides[key] = (v.get("bits", bits), v.get("group_size", group))
            else:
                raise UserError(f"quantization.{key}: expected an object or false, got {v!r}")
        return cls(bits, group, overrides)

    def for_module(self, path: str) -> tuple[int, int] | None:
        """(bits, group_size) of module `path` (e.g. model.layers.0.mlp.down_proj), or None."""
        return self.overrides.get(path, (self.bits, self.group_size))

    def to_config(self) -> dict:
        block: dict = {"group_size": self.group_size, "bits": self.bits}
        for path, v in sorted(self.overrides.items()):
            block[path] = False if v is None else {"group_size": v[1], "bits": v[0]}
        return block


def checkpoint_entries(tensors: dict) -> tuple[dict, dict | None]:
    """safetensors entries (a QuantTensor as its weight, scales and biases) and the config's
    `quantization` block (None if nothing is quantized): the most common scheme, the rest overrides."""
    flat, specs = {}, {}
    for name, w in tensors.items():
        if isinstance(w, QuantTensor):
            module = name[: -len(".weight")]
            # numpy has no bfloat16: such scales are written widened to float32 (exact), never as raw words
            s, b = (a.to_float32() if a.dtype == "bfloat16" else a.data for a in (w.scales, w.biases))
            flat[name], flat[module + ".scales"], flat[module + ".biases"] = w.codes, s, b
            specs[module] = (w.bits, w.group_size)
        else:
            flat[name] = w
            if w.ndim == 2:
                specs[name[: -len(".weight")]] = None
    held = [v for v in specs.values() if v is not None]
    if not held:
        return flat, None
    default = max(set(held), key=held.count)
    overrides = {m: v for m, v in specs.items() if v != default}
    return flat, QuantScheme(default[0], default[1], overrides).to_config()

