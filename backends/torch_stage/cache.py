"""Per-sequence, per-layer KV cache for the torch stage: grows in steps, written in place."""

from __future__ import annotations

import torch


class KVCache:
    step = 256  # tokens added per growth: few reallocations, little waste per sequence

    def __init__(self):
        self.keys: torch.Tensor | None = None  # (n_kv_heads, capacity, head_dim)
        self.values: torch.Tensor | None = None
        self.offset = 0

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (n_kv_heads, T, head_dim); return all cached keys and values so far."""
        t = k.shape[1]
        need = self.offset + t
        if self.keys is None or need > self.keys.shape[1]:
            cap = ((need + self.step - 1) // self.step) * self.step
            shape = (k.shape[0], cap, k.shape[2])
            keys, values = k.new_empty(shape), v.new_empty(shape)
            if self.keys is not None:
                keys[:, : self.offset] = self.keys[:, : self.offset]
                values[:, : self.offset] = self.values[:, : self.offset]
            self.keys, self.values = keys, values
        self.keys[:, self.offset : need] = k
        self.values[:, self.offset : need] = v
        self.offset = need
        return self.keys[:, :need], self.values[:, :need]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()
