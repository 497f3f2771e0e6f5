"""The MLX stage's KV cache: the torch stage's paged layout, in mlx.core (the same calls on Metal).

Each layer keeps keys and values as one array of token slots, (slots, n_kv_heads, head_dim);
which blocks a sequence owns, and which are shared as a cached prefix, is `engine.core.kv_blocks`'
bookkeeping. Per batch, `BatchSlots` holds the slot indices once for every layer: all new rows are
written with one scatter, and the decode rows of all sequences attend in one masked
`mx.fast.scaled_dot_product_attention` call over their gathered slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.core.kv_blocks import BLOCK, BlockManager, doubling, plan_slots


@dataclass(slots=True)
class BatchSlots:
    write: mx.array  # (N,) slot of every new row
    decode_rows: mx.array | None  # (B,) rows of one-token sequences, attended together
    decode_slots: mx.array | None  # (B, Lmax) their cached slots, padded
    decode_mask: mx.array | None  # (B, 1, 1, Lmax) bool: which of those are real (None: one row, no padding)
    prefill: list[tuple[int, int, mx.array | None]]  # (start, length, slots of all offset + length, or None at offset 0)
    all_decode: bool
    inverse: mx.array | None = None  # attention's rows (decode rows, then each chunk) back to batch order


class PagedKV:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: mx.Dtype):
        self.shape, self.dtype = (n_kv, head_dim), dtype
        self.keys = [mx.zeros((0, n_kv, head_dim), dtype) for _ in range(n_layers)]
        self.values = [mx.zeros((0, n_kv, head_dim), dtype) for _ in range(n_layers)]
        self.blocks = BlockManager(None, self._grow)

    def _grow(self, old: int, need: int) -> int:
        """Room for `need` more blocks: every layer at least twice as large (within the budget)."""
        new = doubling(old, need, self.blocks.capacity)
        pad = mx.zeros(((new - old) * BLOCK, *self.shape), self.dtype)
        for store in (self.keys, self.values):
            for i, prev in enumerate(store):
                store[i] = mx.concatenate([prev, pad])
        mx.eval(self.keys, self.values)
        return new

    def plan(self, seq_ids, starts, lengths, offsets) -> BatchSlots:
        p = plan_slots(self.blocks, seq_ids, starts, lengths, offsets)
        plan = BatchSlots(mx.array(p.write), None, None, None,
                          [(start, n, None if slots is None else mx.array(slots)) for start, n, _, slots in p.prefill],
                          p.all_decode)
        order = np.concatenate(([] if p.decode_rows is None else [p.decode_rows])
                               + [np.arange(start, start + n) for start, n, _, _ in p.prefill])
        if (order != np.arange(len(order))).any():
            plan.inverse = mx.array(np.argsort(order))
        if p.decode_rows is not None:
            plan.decode_rows, plan.decode_slots = mx.array(p.decode_rows), mx.array(p.decode_slots)
            if len(p.decode_lengths) > 1 and (p.decode_lengths != p.decode_slots.shape[1]).any():
                valid = mx.arange(p.decode_slots.shape[1])[None, :] < mx.array(p.decode_lengths)[:, None]
                plan.decode_mask = valid[:, None, None, :]
        return plan

    def arrays(self) -> list[mx.array]:
        return self.keys + self.values
