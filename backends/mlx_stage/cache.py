"""Per-sequence, per-layer KV cache for the MLX stage (mlx-lm's `KVCache` shape of things)."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256  # tokens added per growth

    def __init__(self):
        self.keys: mx.array | None = None  # (1, n_kv_heads, capacity, head_dim)
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v (1, n_kv_heads, T, head_dim); return all cached keys and values so far."""
        t = k.shape[2]
        need = self.offset + t
        if self.keys is None or need > self.keys.shape[2]:
            cap = ((need + self.step - 1) // self.step) * self.step
            shape = (1, k.shape[1], cap, k.shape[3])
            keys, values = mx.zeros(shape, k.dtype), mx.zeros(shape, v.dtype)
            if self.keys is not None:
                keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
                values[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = keys, values
        self.keys[..., self.offset : need, :] = k
        self.values[..., self.offset : need, :] = v
        self.offset = need
        return self.keys[..., :need, :], self.values[..., :need, :]
