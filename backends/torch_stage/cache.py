"""The torch stage's KV cache: fixed-size blocks of token slots shared by all sequences (paged).

Each layer keeps keys and values as one tensor of token slots, (slots, n_kv_heads, head_dim); which
blocks a sequence owns, and which are shared as a cached prefix, is `engine.core.kv_blocks`'
bookkeeping. Per batch, a `BatchSlots` turns block tables into slot indices once; every layer then
writes all new rows with one `index_copy_` and runs the decode steps of all sequences as one padded
attention call, instead of one call per sequence per layer (which dominated a 16-sequence decode step).
A layer with a sliding window reads the same batch through its own `BatchSlots` (each decode row's
last `window` slots, windowed masks on the prefill chunks); every key stays cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.kv_blocks import BLOCK, BlockManager, SlotPlan, doubling, plan_slots, window_mask, windowed


@dataclass(slots=True)
class BatchSlots:
    write: torch.Tensor  # (N,) slot of every new row
    decode_rows: torch.Tensor | None  # (B,) rows of one-token sequences, attended together
    decode_slots: torch.Tensor | None  # (B, Lmax) their cached slots, padded
    decode_lengths: torch.Tensor | None  # (B,) cached tokens of each: its slots past that are padding
    # (start, length, slots, mask); slots are None for a sequence's first chunk, which attends to its
    # own new rows only, and so is its mask where it is plain causal (the causal kernel, no explicit mask)
    prefill: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]
    all_decode: bool


class PagedKV:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (n_kv, head_dim), dtype, device
        self.keys = [torch.empty((0, n_kv, head_dim), dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty((0, n_kv, head_dim), dtype=dtype, device=device) for _ in range(n_layers)]
        self.blocks = BlockManager(None, self._grow)

    def _grow(self, old: int, need: int) -> int:
        """Room for `need` more blocks: reallocate every layer at least twice as large (within the budget)."""
        new = doubling(old, need, self.blocks.capacity)
        for store in (self.keys, self.values):
            for i, prev in enumerate(store):
                t = torch.empty((new * BLOCK, *self.shape), dtype=self.dtype, device=self.device)
                t[: prev.shape[0]] = prev
                store[i] = t
        return new

    def plan(self, seq_ids, starts, lengths, offsets, windows=(None,)) -> dict[int | None, BatchSlots]:
        """The batch's slots as a layer of each of `windows` (None: no window) reads them."""
        p = plan_slots(self.blocks, seq_ids, starts, lengths, offsets)
        return {w: self._slots(windowed(p, w), w) for w in windows}

    def _slots(self, p: SlotPlan, window: int | None) -> BatchSlots:
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        prefill = []
        for start, n, off, slots in p.prefill:
            plain = slots is None and (window is None or n <= window)
            mask = None if plain else to(window_mask(off, n, window))
            prefill.append((start, n, None if slots is None else to(slots), mask))
        plan = BatchSlots(to(p.write), None, None, None, prefill, p.all_decode)
        if p.decode_rows is not None:
            plan.decode_rows, plan.decode_slots = to(p.decode_rows), to(p.decode_slots)
            plan.decode_lengths = to(p.decode_lengths)
        return plan
