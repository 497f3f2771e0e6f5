"""The MLX stage's KV cache: the torch stage's paged blocks, in mlx.core (the same calls on Metal).

Each layer keeps keys and values as one array of token slots, head-major: (n_kv_heads * slots,
head_dim), head h of slot s at row h * slots + s, so one `take` gathers a batch's keys already
laid out (B, n_kv_heads, L, head_dim) for `mx.fast.scaled_dot_product_attention` (on the CPU
backend a transposed view there costs 3-4x the attention itself). Which blocks a sequence owns, and
which are shared as a cached prefix, is `engine.core.kv_blocks`' bookkeeping. Per batch,
`BatchSlots` holds the row indices once for every layer: all new rows are written with one
scatter, and the decode rows of all sequences attend in one masked call. A layer with a sliding
window reads the same batch through its own `BatchSlots` (each decode row's last `window` slots,
windowed masks on the prefill chunks); every key stays cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.core.kv_blocks import BLOCK, BlockManager, SlotPlan, doubling, plan_slots, window_mask, windowed


@dataclass(slots=True)
class BatchSlots:
    write: mx.array  # (n_kv * N,) rows of every new row's heads, head-major: k.transpose(1, 0, 2) order
    decode_rows: mx.array | None  # (B,) rows of one-token sequences, attended together
    decode_index: mx.array | None  # (B, n_kv, Lmax) cache rows of their keys and values, padded
    decode_mask: mx.array | None  # (B, 1, 1, Lmax) bool: which of those are real (None: no padding)
    # (start, length, (1, n_kv, offset + length) rows or None at offset 0, mask: None where plain causal
    # (MLX's causal mask is aligned to the keys' end, so a later chunk needs none either), else
    # (1, 1, length, offset + length) bool)
    prefill: list[tuple[int, int, mx.array | None, object]]
    all_decode: bool
    inverse: mx.array | None = None  # attention's rows (decode rows, then each chunk) back to batch order


class PagedKV:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: mx.Dtype):
        self.n_kv, self.head_dim, self.dtype = n_kv, head_dim, dtype
        self.keys = [mx.zeros((0, head_dim), dtype) for _ in range(n_layers)]
        self.values = [mx.zeros((0, head_dim), dtype) for _ in range(n_layers)]
        self.blocks = BlockManager(None, self._grow)

    def _grow(self, old: int, need: int) -> int:
        """Room for `need` more blocks: every layer at least twice as large (within the budget)."""
        new = doubling(old, need, self.blocks.capacity)
        pad = mx.zeros((self.n_kv, (new - old) * BLOCK, self.head_dim), self.dtype)
        for store in (self.keys, self.values):
            for i, prev in enumerate(store):
                heads = prev.reshape(self.n_kv, old * BLOCK, self.head_dim)
                store[i] = mx.concatenate([heads, pad], axis=1).reshape(-1, self.head_dim)
        mx.eval(self.keys, self.values)
        return new

    def plan(self, seq_ids, starts, lengths, offsets, windows=(None,)) -> dict[int | None, BatchSlots]:
        """The batch's slots as a layer of each of `windows` (None: no window) reads them."""
        p = plan_slots(self.blocks, seq_ids, starts, lengths, offsets)
        return {w: self._slots(windowed(p, w), w) for w in windows}

    def _slots(self, p: SlotPlan, window: int | None) -> BatchSlots:
        head = np.arange(self.n_kv, dtype=np.int64)[:, None] * (self.blocks.n_blocks * BLOCK)  # (n_kv, 1)
        rows = lambda slots: mx.array((head + slots[None, :]).astype(np.int32))  # noqa: E731  (n_kv, len)
        prefill = []
        for start, n, off, slots in p.prefill:
            mask = None
            if window is not None and off + n > window:
                mask = mx.array(window_mask(off, n, window))[None, None]
            prefill.append((start, n, None if slots is None else rows(slots)[None], mask))
        plan = BatchSlots(rows(p.write).reshape(-1), None, None, None, prefill, p.all_decode)
        order = np.concatenate(([] if p.decode_rows is None else [p.decode_rows])
                               + [np.arange(start, start + n) for start, n, _, _ in p.prefill])
        if (order != np.arange(len(order))).any():
            plan.inverse = mx.array(np.argsort(order))
        if p.decode_rows is not None:
            plan.decode_rows = mx.array(p.decode_rows)
            plan.decode_index = mx.array((head[None] + p.decode_slots[:, None, :]).astype(np.int32))
            if (p.decode_lengths != p.decode_slots.shape[1]).any():
                valid = mx.arange(p.decode_slots.shape[1])[None, :] < mx.array(p.decode_lengths)[:, None]
                plan.decode_mask = valid[:, None, None, :]
        return plan

    def arrays(self) -> list[mx.array]:
        return self.keys + self.values
