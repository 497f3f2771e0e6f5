"""Quantized weights, framework-neutral: MLX's affine scheme and its on-disk layout, and two forms
GGUF files hold that it has not.

A weight (N, K) is held as codes q in [0, 2^bits) with one scale and one bias per group of
`group_size` along the input axis K:

    w[n, k] = scales[n, k // group_size] * q[n, k] + biases[n, k // group_size]     (mode "affine")

- mode "symmetric" (GGUF's Q4_0, Q5_0, Q8_0): no biases stored; each is -2^(bits-1) times its scale.
- mode "q6_k" (GGUF's Q6_K, 6 bits in groups of 16): symmetric, and each group's scale is an int8
  sub-scale times a float16 scale per 256 weights (`super_scales`, (N, K / 256)): 6.5625 bits a
  weight, as the file.

On disk (and in `QuantTensor.codes`) the codes are packed into uint32 words (N, K * bits / 32),
as one little-endian bit stream per row, least significant bit first: the layout `mx.quantize`
writes, so a directory of affine tensors loads in mlx-lm. Each backend re-lays the codes for its own
kernels when it loads them (`backends/*/quant.py`); where a backend has no kernel for a form it
requantizes it at load (`QuantTensor.requantized8`).

The config block, as mlx-lm writes it (mirrored as `quantization_config`):
    "quantization": {"group_size": 64, "bits": 4, "<module path>": {"group_size": .., "bits": ..,
                     "mode": ..} | false}        ("mode" only where it is not "affine")
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .tensors import TypedArray

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODES = ("affine", "symmetric", "q6_k")
SUPER = 256  # weights per super-scale in mode "q6_k"


def check_scheme(bits: int, group_size: int, where: str = "quantization", mode: str = "affine") -> None:
    if mode not in MODES:
        raise UserError(f"{where}: mode {mode!r} is not supported; supported: {', '.join(MODES)}")
    if mode == "q6_k":
        if (bits, group_size) != (6, 16):
            raise UserError(f"{where}: mode q6_k has 6 bits in groups of 16, not {bits} and {group_size}")
        return
    if bits not in BITS:
        raise UserError(f"{where}: bits {bits!r} is not one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"{where}: group_size {group_size!r} is not one of {', '.join(map(str, GROUP_SIZES))}")


@dataclass(frozen=True, slots=True)
class QuantTensor:
    codes: np.ndarray  # uint32 (N, K * bits / 32)
    scales: TypedArray  # (N, K / group_size); int8 sub-scales in mode "q6_k"
    biases: TypedArray | None  # (N, K / group_size); None: -2^(bits-1) times each scale
    bits: int
    group_size: int
    super_scales: TypedArray | None = None  # (N, K / 256) float16, mode "q6_k" only

    @property
    def mode(self) -> str:
        return "affine" if self.biases is not None else "symmetric" if self.super_scales is None else "q6_k"

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.scales.data.shape[1] * self.group_size

    @property
    def scheme(self) -> tuple[int, int, str]:
        return self.bits, self.group_size, self.mode

    def parts(self) -> dict[str, TypedArray]:
        """What is stored besides the codes, by the suffix it is stored under."""
        named = {"scales": self.scales, "biases": self.biases, "super_scales": self.super_scales}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + sum(a.data.nbytes for a in self.parts().values())

    def unpack(self) -> np.ndarray:
        """The codes, one uint8 per weight: (N, K)."""
        return unpack(self.codes, self.bits, self.shape[1])

    def float_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """Each group's scale and bias in float32 (exact, whatever the mode)."""
        s = self.scales.to_float32()
        if self.super_scales is not None:
            s = s * np.repeat(self.super_scales.to_float32(), SUPER // self.group_size, axis=-1)
        return s, (self.biases.to_float32() if self.biases is not None else -(1 << (self.bits - 1)) * s)

    def dequantize(self) -> np.ndarray:
        """float32 (N, K): the weight the codes stand for, computed in float32."""
        n, k = self.shape
        s, b = self.float_parts()
        q = self.unpack().reshape(n, k // self.group_size, self.group_size).astype(np.float32)
        return (s[..., None] * q + b[..., None]).reshape(n, k)

    def rows(self, index) -> QuantTensor:
        """The rows `index` (output channels), e.g. un-permuted: groups run along K, so rows move whole.
        On a stack of experts (E, N, ...), an expert's index gives that expert's tensor."""
        take = lambda a: None if a is None else TypedArray(a.data[index], a.dtype)  # noqa: E731
        return QuantTensor(self.codes[index], take(self.scales), take(self.biases), self.bits, self.group_size,
                           take(self.super_scales))

    def requantized8(self) -> QuantTensor:
        """Requantized to 8-bit symmetric codes in groups of 32 with float16 scales where they fit
        (every weight within half a step of its code): for a backend without a kernel for this form."""
        return quantize(self.dequantize(), 8, 32, half=True, symmetric=True)


def concat_rows(ws: list) -> QuantTensor | None:
    """The rows of several QuantTensors of one scheme stacked as one (fused q/k/v, gate/up), else None."""
    if not all(isinstance(w, QuantTensor) for w in ws):
        return None
    first = ws[0]
    key = lambda w: (w.scheme, w.shape[1], {k: a.dtype for k, a in w.parts().items()})  # noqa: E731
    if any(key(w) != key(first) for w in ws):
        return None
    if len(ws) == 1:
        return first
    cat = lambda get: None if get(first) is None else TypedArray(  # noqa: E731
        np.concatenate([get(w).data for w in ws], axis=0), get(first).dtype)
    return QuantTensor(np.concatenate([w.codes for w in ws], axis=0), cat(lambda w: w.scales),
                       cat(lambda w: w.biases), first.bits, first.group_size, cat(lambda w: w.super_scales))


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


def from_codes(q: np.ndarray, scales: np.ndarray, biases: np.ndarray | None, bits: int, group_size: int) -> QuantTensor:
    """A QuantTensor from uint8 codes (N, K) and float scales and biases (N, K / group; biases None:
    symmetric): held in float16 where both are exactly float16 (GGUF's Q4_0, Q4_1, Q5_x and Q8_0
    store d and m so), else float32."""
    s = np.ascontiguousarray(scales, np.float32)
    b = None if biases is None else np.ascontiguousarray(biases, np.float32)
    dt = "float16" if _exact_half(s) and (b is None or _exact_half(b)) else "float32"
    typed = lambda a: None if a is None else TypedArray(a.astype(np.dtype(dt)), dt)  # noqa: E731
    return QuantTensor(pack(q, bits), typed(s), typed(b), bits, group_size)


def _exact_half(a: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    return bool(np.isfinite(h).all() and np.array_equal(h.astype(np.float32), a))


def quantize(w: np.ndarray, bits: int, group_size: int, half: bool = False, symmetric: bool = False) -> QuantTensor:
    """Affine min/max quantization of a float (N, K) weight, float32 scales and biases; with `half`,
    float16 ones where every group's fit float16's normal range (each scale rounded up and each
    minimum down to a float16 before the codes are chosen, so the codes still span the group).
    `symmetric`: w = s * (q - 2^(bits-1)), s = max|w| / (2^(bits-1) - 1), no biases (GGUF's Q8_0 form)."""
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
        return from_codes(q.reshape(n, k), scales, None, bits, group_size)
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
    overrides: dict[str, tuple[int, int, str] | None] = field(default_factory=dict)
    mode: str = "affine"

    @classmethod
    def from_config(cls, d: dict) -> QuantScheme | None:
        block = d.get("quantization") or d.get("quantization_config")
        if not block:
            return None
        if "quant_method" in block:  # GPTQ, AWQ, bitsandbytes...: other layouts and kernels
            raise UserError(f"quantization_config.quant_method {block['quant_method']!r} is not supported; "
                            "supported: MLX affine checkpoints (a `quantization` block with bits and group_size)")
        bits, group, mode = block.get("bits", 4), block.get("group_size", 64), block.get("mode", "affine")
        check_scheme(bits, group, mode=mode)
        overrides = {}
        for key, v in block.items():
            if key in ("bits", "group_size", "mode", "quant_method"):
                continue
            if v is False:
                overrides[key] = None
            elif isinstance(v, dict):
                spec = (v.get("bits", bits), v.get("group_size", group), v.get("mode", "affine"))
                check_scheme(*spec[:2], f"quantization.{key}", spec[2])
                overrides[key] = spec
            else:
                raise UserError(f"quantization.{key}: expected an object or false, got {v!r}")
        return cls(bits, group, overrides, mode)

    def for_module(self, path: str) -> tuple[int, int, str] | None:
        """(bits, group_size, mode) of module `path` (e.g. model.layers.0.mlp.down_proj), or None."""
        return self.overrides.get(path, (self.bits, self.group_size, self.mode))

    def to_config(self) -> dict:
        block: dict = {"group_size": self.group_size, "bits": self.bits}
        if self.mode != "affine":
            block["mode"] = self.mode
        for path, v in sorted(self.overrides.items()):
            block[path] = False if v is None else {"group_size": v[1], "bits": v[0]}
            if v is not None and v[2] != "affine":
                block[path]["mode"] = v[2]
        return block


def checkpoint_entries(tensors: dict) -> tuple[dict, dict | None]:
    """safetensors entries (a QuantTensor as its weight, scales, and biases or super-scales where it
    has them) and the config's `quantization` block (None if nothing is quantized): the most common
    scheme, the rest overrides."""
    flat, specs = {}, {}
    for name, w in tensors.items():
        if isinstance(w, QuantTensor):
            module = name[: -len(".weight")]
            flat[name] = w.codes
            for suffix, a in w.parts().items():
                # numpy has no bfloat16: such scales are written widened to float32 (exact), never as raw words
                flat[f"{module}.{suffix}"] = a.to_float32() if a.dtype == "bfloat16" else a.data
            specs[module] = w.scheme
        else:
            flat[name] = w
            if w.ndim == 2:
                specs[name[: -len(".weight")]] = None
    held = [v for v in specs.values() if v is not None]
    if not held:
        return flat, None
    default = max(set(held), key=held.count)
    overrides = {m: v for m, v in specs.items() if v != default}
    return flat, QuantScheme(default[0], default[1], overrides, default[2]).to_config()

