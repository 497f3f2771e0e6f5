"""Paged KV bookkeeping shared by every backend's stage and by the coordinator: blocks, block
tables, reference counts and the prefix cache's named blocks. Numpy and ints only.

A stage's KV cache is a pool of blocks of BLOCK token slots; a sequence owns a list of blocks (its
block table). A *full* block may be named by a hash of its tokens and of everything before it
(vLLM's chained block hashes, `block_hashes`): a later sequence whose prompt starts with the same
tokens links the named blocks into its own table (their reference counts go up) and prefills only
the rest. A released sequence's named blocks stay in the pool, unreferenced, until the memory is
needed: they are evicted least recently used first; a referenced block is never evicted.

The coordinator runs the same `BlockManager` over a pool of virtual blocks as large as the
smallest stage's budget (`engine.serving.prefix_cache`): it decides what is named, linked and
evicted, and every stage, told with each batch, does the same, so all stages hold the same blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import CacheMiss

BLOCK = 16  # token slots per block: the same on every backend (the coordinator names blocks of it)
HASH_MASK = (1 << 63) - 1  # hashes are non-negative 63-bit ints (they travel as msgpack ints)


def block_hashes(tokens: Sequence[int], parent: int) -> list[int]:
    """Hashes of the full blocks of `tokens`, chained from `parent` (the hash of the block before
    them, or the coordinator's salt for a sequence's first block)."""
    out = []
    for b in range(len(tokens) // BLOCK):
        data = parent.to_bytes(8, "little") + np.asarray(tokens[b * BLOCK : (b + 1) * BLOCK], "<i4").tobytes()
        parent = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & HASH_MASK
        out.append(parent)
    return out


class BlockManager:
    """Blocks, block tables, reference counts, named blocks and their LRU order.

    `capacity`: blocks to hold before unreferenced named blocks are evicted to make room (None: no
    limit). `grow(old, need)` is called when the pool must get larger; it returns the new number of
    blocks (at least old + need). With `keep_evicted`, the hashes of blocks evicted here to find
    room are kept in `evicted` until read (the coordinator sends them to the stages).
    """

    def __init__(self, capacity: int | None, grow: Callable[[int, int], int], keep_evicted: bool = False):
        self.capacity = capacity
        self._grow = grow
        self.n_blocks = 0
        self.free: list[int] = []
        self.tables: dict[int, list[int]] = {}
        self.refs: dict[int, int] = {}  # block -> sequences holding it (blocks in some table)
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # unreferenced named blocks, oldest first
        self.evicted: list[int] | None = [] if keep_evicted else None

    # -- what is held ----------------------------------------------------------------------------

    @property
    def cached_blocks(self) -> int:
        """Named blocks no sequence references: reclaimable."""
        return len(self.lru)

    def table(self, seq_id: int) -> list[int]:
        return self.tables.get(seq_id, [])

    def match(self, hashes: Sequence[int]) -> int:
        """How many of `hashes`, from the first, name blocks held now."""
        n = 0
        for h in hashes:
            if h not in self.by_hash:
                break
            n += 1
        return n

    # -- changes ---------------------------------------------------------------------------------

    def link(self, seq_id: int, hashes: Sequence[int]) -> None:
        """Start `seq_id`'s table with the named blocks of `hashes` (all held: see `match`)."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        missing = len(hashes) - self.match(hashes)
        if missing:
            raise CacheMiss(f"prefix cache miss: {missing} of {len(hashes)} prefix blocks are not held here")
        table = [self.by_hash[h] for h in hashes]
        for b in table:
            self._ref(b)
        self.tables[seq_id] = table

    def allocate(self, seq_id: int, length: int) -> list[int]:
        """The sequence's table, with blocks for its first `length` positions (taken as needed)."""
        table = self.tables.setdefault(seq_id, [])
        for _ in range(-(-length // BLOCK) - len(table)):
            b = self._take()
            self.refs[b] = 1
            table.append(b)
        return table

    def slots(self, seq_id: int, length: int) -> np.ndarray:
        """Slot of each of the first `length` positions of a sequence, allocating blocks as needed."""
        table = self.allocate(seq_id, length)
        pos = np.arange(length)
        return np.asarray(table, dtype=np.int64)[pos // BLOCK] * BLOCK + pos % BLOCK

    def name(self, seq_id: int, first: int, hashes: Sequence[int]) -> None:
        """Name the sequence's blocks first, first + 1, ... by `hashes`. A hash already naming
        another block keeps it (the first wins); this sequence's copy stays its own."""
        table = self.tables[seq_id]
        for b, h in zip(table[first : first + len(hashes)], hashes):
            if h not in self.by_hash and b not in self.hash_of:
                self.by_hash[h], self.hash_of[b] = b, h

    def evict(self, hashes: Sequence[int]) -> None:
        """Forget these names (unknown ones are ignored); unreferenced blocks go back to the free list."""
        for h in hashes:
            b = self.by_hash.pop(h, None)
            if b is None:
                continue
            del self.hash_of[b]
            if b in self.lru:
                del self.lru[b]
                self.free.append(b)

    def release(self, seq_id: int) -> None:
        """Drop a sequence's table: its named blocks stay cached (its last blocks are the first to go)."""
        for b in reversed(self.tables.pop(seq_id, [])):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                del self.refs[b]
                if b in self.hash_of:
                    self.lru[b] = None
                else:
                    self.free.append(b)

    def _ref(self, b: int) -> None:
        if b in self.lru:
            del self.lru[b]
        self.refs[b] = self.refs.get(b, 0) + 1

    def _take(self) -> int:
        if not self.free:
            if self.lru and self.capacity is not None and self.n_blocks >= self.capacity:
                b, _ = self.lru.popitem(last=False)
                h = self.hash_of.pop(b)
                del self.by_hash[h]
                if self.evicted is not None:
                    self.evicted.append(h)
                return b
            old = self.n_blocks
            self.n_blocks = self._grow(old, 1)
            self.free.extend(range(self.n_blocks - 1, old - 1, -1))
        return self.free.pop()


@dataclass(slots=True)
class SlotPlan:
    """Where one batch's rows go in a paged cache, and what each sequence attends to (numpy)."""

    write: np.ndarray  # (N,) slot of every new row
    decode_rows: np.ndarray | None  # (B,) rows of one-token sequences, attended together
    decode_slots: np.ndarray | None  # (B, Lmax) their cached slots, padded with slot 0
    decode_lengths: np.ndarray | None  # (B,) cached tokens of each, the new one included
    # (start, length, offset, slots): slots of all offset + length positions, None when offset is 0
    # (a first chunk attends to its own new rows only)
    prefill: list[tuple[int, int, int, np.ndarray | None]]

    @property
    def all_decode(self) -> bool:
        return not self.prefill


def plan_slots(blocks: BlockManager, seq_ids, starts, lengths, offsets) -> SlotPlan:
    write, drows, dslots, prefill = [], [], [], []
    for sid, start, n, off in zip(seq_ids, starts, lengths, offsets):
        slots = blocks.slots(sid, off + n)
        write.append(slots[off:])
        if n == 1:
            drows.append(start)
            dslots.append(slots)
        else:
            prefill.append((start, n, off, slots if off else None))
    plan = SlotPlan(np.concatenate(write), None, None, None, prefill)
    if drows:
        padded = np.zeros((len(dslots), max(len(s) for s in dslots)), dtype=np.int64)
        for i, s in enumerate(dslots):
            padded[i, : len(s)] = s
        plan.decode_rows, plan.decode_slots = np.asarray(drows, dtype=np.int64), padded
        plan.decode_lengths = np.asarray([len(s) for s in dslots], dtype=np.int64)
    return plan


def windowed(p: SlotPlan, window: int | None) -> SlotPlan:
    """The batch `p` as a layer attending within its last `window` positions reads it: each decode row
    its last `window` slots (left-aligned, padded past the new lengths). Prefill chunks keep all their
    slots; their masks hold the window (each backend's `cache.py`)."""
    if window is None or p.decode_rows is None or p.decode_lengths.max() <= window:
        return p
    keep = np.minimum(p.decode_lengths, window)
    cols = (p.decode_lengths - keep)[:, None] + np.arange(keep.max())[None, :]
    cols = np.minimum(cols, p.decode_slots.shape[1] - 1)
    return SlotPlan(p.write, p.decode_rows, np.take_along_axis(p.decode_slots, cols, axis=1), keep, p.prefill)


def window_mask(offset: int, length: int, window: int | None) -> np.ndarray:
    """(length, offset + length) bool: which positions each of a chunk's rows attends to, causal and
    within `window` (transformers' sliding window: key j for query i when i - window < j <= i)."""
    rows = np.arange(length)[:, None] + offset
    cols = np.arange(offset + length)[None, :]
    ok = cols <= rows
    if window is not None:
        ok &= cols > rows - window
    return ok


def doubling(old: int, need: int, capacity: int | None, least: int = 64) -> int:
    """A pool's next size: at least twice as large (and `least`), within `capacity` unless more is needed."""
    new = max(2 * old, least)
    if capacity is not None:
        new = min(new, capacity)
    return max(new, old + need)
