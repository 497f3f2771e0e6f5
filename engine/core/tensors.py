"""A numpy array tagged with the dtype its bits mean: the neutral form between frameworks.

numpy has no bfloat16, so bfloat16 data is held as its raw 2-byte words (uint16) and never
upcast on the way between stages; each backend views the words as its own bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

# activation dtypes a stage computes in -> numpy storage dtype
STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}
DTYPES = tuple(STORAGE)
AUTO = "auto"  # asked for, never computed in: each stage's backend picks (`engine.compose.stages.resolve_dtype`)


def check_dtype(dtype: str, allow_auto: bool = False) -> str:
    """`dtype` if hetpipe computes in it (or, with `allow_auto`, "auto"), else a UserError naming the choices."""
    if dtype not in STORAGE and not (allow_auto and dtype == AUTO):
        choices = (AUTO,) * allow_auto + DTYPES
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(choices)}")
    return dtype


def itemsize(dtype: str) -> int:
    return np.dtype(STORAGE[dtype]).itemsize


@dataclass(slots=True)
class TypedArray:
    """Weights read from a checkpoint, and the hidden rows that travel between stages."""

    data: np.ndarray
    dtype: str  # a key of STORAGE

    def to_float32(self) -> np.ndarray:
        if self.dtype == "bfloat16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32)

    @classmethod
    def from_float32(cls, x: np.ndarray, dtype: str) -> TypedArray:
        """Round-to-nearest-even to bfloat16 words, or a plain cast."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if dtype != "bfloat16":
            return cls(x.astype(STORAGE[dtype]), dtype)
        bits = x.view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return cls((rounded >> 16).astype(np.uint16), dtype)
