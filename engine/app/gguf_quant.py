"""GGUF's block-quantized tensors as `QuantTensor`s, kept exactly where a mapping exists.

Every block type below is `w = scale * q + bias` over groups of 32 along a row, so its codes and
scales and biases are read out of the blocks as they are (ggml's layouts, as gguf-py's dequantizers
read them), kept in float16 where they are exact in it (d and m are: the Q4_x, Q5_x and Q8_0 rows),
else in float32 (the K-quants' products). The symmetric types store no biases (mode "symmetric":
-2^(bits-1) d, as the file):

    Q4_0  4-bit   scale d          symmetric        Q4_K  4-bit  scale d*sc   bias -dmin*m
    Q4_1  4-bit   scale d          bias m           Q5_K  5-bit  scale d*sc   bias -dmin*m
    Q5_0  5-bit   scale d          symmetric        Q8_0  8-bit  scale d      symmetric (code q+128)
    Q5_1  5-bit   scale d          bias m           Q6_K  6-bit  int8 sc per 16, float16 d per 256 (mode "q6_k")

Other types have no exact form here (Q2_K/Q3_K and the IQ types are codebooks or mixed scales):
they are dequantized by gguf-py and requantized to 8 bits in groups of 32 with float16 scales
(symmetric for Q3_K, which has no minimum), and stderr says so. `for_mlx_lm` turns any of these
into MLX's affine form (biases written out, Q6_K requantized to 8 bits), for a directory mlx-lm loads.
"""

from __future__ import annotations

import sys

import numpy as np

from ..core.quant import SUPER, QuantTensor, from_codes, pack, quantize
from ..core.tensors import TypedArray

EXACT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K")
REQUANT_BITS = 8


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 codes: low nibbles are weights 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) per block -> bit j of it for weight j, as 0/1 (blocks, 32)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from gguf.quants import Q4_K

    sc, m = Q4_K.get_scale_min(scales)
    return sc.astype(np.float32), m.astype(np.float32)


def _blocks_to_codes(kind: str, blocks: np.ndarray):
    """(n_blocks, bytes) of one type -> codes (n_groups, 32) and scales, biases (n_groups,; None:
    symmetric)."""
    if kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks[:, :2])
        if kind == "Q4_0":
            return _nibbles_32(blocks[:, 2:]), d, None
        return _nibbles_32(blocks[:, 4:]), d, _f16(blocks[:, 2:4])
    if kind in ("Q5_0", "Q5_1"):
        d = _f16(blocks[:, :2])
        head = 2 if kind == "Q5_0" else 4
        q = _nibbles_32(blocks[:, head + 4 :]) | (_high_bits(blocks[:, head : head + 4]) << 4)
        return q, d, (None if kind == "Q5_0" else _f16(blocks[:, 2:4]))
    if kind == "Q8_0":
        d = _f16(blocks[:, :2])
        q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, None
    if kind in ("Q4_K", "Q5_K"):
        n = blocks.shape[0]
        d, dmin = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
        sc, m = _k_scales(blocks[:, 4:16])
        if kind == "Q4_K":
            qs, qh = blocks[:, 16:144], None
        else:
            qh, qs = blocks[:, 16:48], blocks[:, 48:176]
        # 4 chunks of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c+1
        qs = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, 8, 32)
        if qh is not None:  # bit j of each of the 32 qh bytes is the fifth bit of sub-block j
            high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
            q = q | (high << 4)
        return q.reshape(n * 8, 32), (d * sc).reshape(-1), (-(dmin * m)).reshape(-1)
    raise KeyError(kind)


SYMMETRIC = ("Q3_K",)  # requantized types without a minimum: w = d * sc * q
_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
_warned: set[str] = set()


def _q6_k(blocks: np.ndarray, rows: int, cols: int) -> QuantTensor:
    """Q6_K blocks (256 weights: ql 128 bytes, qh 64, int8 sub-scales 16, float16 d) as mode q6_k,
    laid out as gguf-py's dequantizer reads them."""
    n = blocks.shape[0]
    ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], blocks[:, 208:210]
    low = ((ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 2, 4, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03)
    q = (low | (high.reshape(n, 2, 4, 32) << 4)).reshape(rows, cols)
    return QuantTensor(pack(q, 6), TypedArray(np.ascontiguousarray(sc).view(np.int8).reshape(rows, cols // 16), "int8"),
                       None, 6, 16, TypedArray(np.ascontiguousarray(d).view(np.float16).reshape(rows, cols // SUPER),
                                               "float16"))


def for_mlx_lm(t: QuantTensor) -> QuantTensor:
    """`t` in MLX's affine form, which mlx-lm loads: biases written out (exact), Q6_K requantized."""
    t = t.requantized8() if t.mode == "q6_k" else t
    return t if t.mode == "affine" else from_codes(t.unpack(), *t.float_parts(), t.bits, t.group_size)


def to_quant_tensor(data: np.ndarray, kind: str, rows: int, cols: int) -> QuantTensor:
    """A GGUF tensor of block type `kind` (raw bytes, `rows` rows of `cols` weights) as a QuantTensor."""
    if kind == "Q6_K":
        return _q6_k(np.ascontiguousarray(data).reshape(-1, 210), rows, cols)
    if kind in EXACT:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        blocks = np.ascontiguousarray(data).reshape(-1, type_size)
        q, s, b = _blocks_to_codes(kind, blocks)
        b = None if b is None else b.reshape(rows, -1)
        return from_codes(q.reshape(rows, cols), s.reshape(rows, -1), b, _BITS[kind], 32)
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    if kind not in _warned:
        _warned.add(kind)
        print(f"hetpipe: {kind} has no exact affine form; its tensors are requantized to "
              f"{REQUANT_BITS} bits in groups of 32", file=sys.stderr)
    w = dequantize(data, GGMLQuantizationType[kind]).astype(np.float32).reshape(rows, cols)
    # float16 scales, as the file's own d; symmetric where the type is (no biases to read)
    return quantize(w, REQUANT_BITS, 32, half=True, symmetric=kind in SYMMETRIC)
