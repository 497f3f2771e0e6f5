"""The torch stage's KV cache: fixed-size blocks of token slots shared by all sequences (paged).

Each layer keeps keys and values as one tensor of token slots, (slots, n_kv_heads, head_dim);
a sequence owns a list of blocks of BLOCK slots (its block table), so memory follows the tokens
actually held and a finished sequence's blocks go straight back to the free list. Per batch, a
`BatchSlots` turns block tables into slot indices once; every layer then writes all new rows with one
`index_copy_` and runs the decode steps of all sequences as one padded attention call, instead of
one call per sequence per layer (which dominated a 16-sequence decode step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 16  # token slots per block


@dataclass(slots=True)
class BatchSlots:
    write: torch.Tensor  # (N,) slot of every new row
    decode_rows: torch.Tensor | None  # (B,) rows of one-token sequences, attended together
    decode_slots: torch.Tensor | None  # (B, Lmax) their cached slots, padded
    decode_lengths: torch.Tensor | None  # (B,) cached tokens of each: its slots past that are padding
    # (start, length, slots, causal mask); slots and mask are None for a sequence's first chunk,
    # which attends to its own new rows only (the causal kernel, no gather, no explicit mask)
    prefill: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]
    all_decode: bool


class PagedKV:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (n_kv, head_dim), dtype, device
        self.keys = [torch.empty((0, n_kv, head_dim), dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty((0, n_kv, head_dim), dtype=dtype, device=device) for _ in range(n_layers)]
        self.n_blocks = 0
        self.free: list[int] = []
        self.tables: dict[int, list[int]] = {}

    def _grow(self, blocks: int) -> None:
        """Room for `blocks` more blocks: reallocate every layer at least twice as large."""
        new = max(self.n_blocks + blocks, 2 * self.n_blocks, 64)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                t = torch.empty((new * BLOCK, *self.shape), dtype=self.dtype, device=self.device)
                t[: old.shape[0]] = old
                store[i] = t
        self.free.extend(range(new - 1, self.n_blocks - 1, -1))
        self.n_blocks = new

    def _slots(self, seq_id: int, length: int) -> np.ndarray:
        """Slot of each of the first `length` positions of a sequence, allocating blocks as needed."""
        table = self.tables.setdefault(seq_id, [])
        need = -(-length // BLOCK) - len(table)
        if need > 0:
            if need > len(self.free):
                self._grow(need - len(self.free))
            table.extend(self.free.pop() for _ in range(need))
        pos = np.arange(length)
        return np.asarray(table, dtype=np.int64)[pos // BLOCK] * BLOCK + pos % BLOCK

    def plan(self, seq_ids, starts, lengths, offsets) -> BatchSlots:
        write, drows, dslots, prefill = [], [], [], []
        for sid, start, n, off in zip(seq_ids, starts, lengths, offsets):
            slots = self._slots(sid, off + n)
            write.append(slots[off:])
            if n == 1:
                drows.append(start)
                dslots.append(slots)
            elif off == 0:
                prefill.append((start, n, None, None))
            else:
                rows = torch.arange(n, device=self.device)[:, None] + off
                causal = torch.arange(off + n, device=self.device)[None, :] <= rows
                prefill.append((start, n, torch.from_numpy(slots).to(self.device), causal))
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        plan = BatchSlots(to(np.concatenate(write)), None, None, None, prefill, not prefill)
        if drows:
            lmax = max(len(s) for s in dslots)
            padded = np.zeros((len(dslots), lmax), dtype=np.int64)
            for i, s in enumerate(dslots):
                padded[i, : len(s)] = s
            plan.decode_rows, plan.decode_slots = to(np.asarray(drows)), to(padded)
            plan.decode_lengths = to(np.asarray([len(s) for s in dslots], dtype=np.int64))
        return plan

    def release(self, seq_id: int) -> None:
        self.free.extend(reversed(self.tables.pop(seq_id, [])))
