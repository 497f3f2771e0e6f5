"""The torch stage's paged KV cache: block tables, slot planning per batch, growth and reuse."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from backends.torch_stage.cache import BLOCK, PagedKV  # noqa: E402


def cache():
    return PagedKV(n_layers=2, n_kv=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))


def slots_of(kv, seq_id, n):
    table = kv.blocks.tables[seq_id]
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]


def test_a_first_prefill_writes_its_own_slots_and_attends_without_a_gather():
    kv = cache()
    plan = kv.plan([1, 2], starts=[0, 20], lengths=[20, 3], offsets=[0, 0])[None]
    assert len(kv.blocks.tables[1]) == 2 and len(kv.blocks.tables[2]) == 1  # blocks follow the tokens
    assert set(kv.blocks.tables[1]).isdisjoint(kv.blocks.tables[2])
    assert plan.write.tolist() == slots_of(kv, 1, 20) + slots_of(kv, 2, 3)
    assert [(start, n, slots, mask) for start, n, slots, mask in plan.prefill] == [(0, 20, None, None),
                                                                                 (20, 3, None, None)]
    assert plan.decode_rows is None and not plan.all_decode


def test_decode_rows_attend_together_padded_to_the_longest():
    kv = cache()
    kv.plan([1, 2], [0, 20], [20, 3], [0, 0])
    plan = kv.plan([1, 2], starts=[0, 1], lengths=[1, 1], offsets=[20, 3])[None]
    assert plan.all_decode and plan.prefill == []
    assert plan.write.tolist() == [slots_of(kv, 1, 21)[20], slots_of(kv, 2, 4)[3]]
    assert plan.decode_rows.tolist() == [0, 1]
    assert plan.decode_slots.shape == (2, 21)
    assert plan.decode_slots[0].tolist() == slots_of(kv, 1, 21)
    assert plan.decode_slots[1, :4].tolist() == slots_of(kv, 2, 4)
    assert plan.decode_lengths.tolist() == [21, 4]  # the second row's slots past 4 are padding


def test_a_later_chunk_gathers_its_slots_under_a_causal_mask():
    kv = cache()
    kv.plan([1], [0], [5], [0])
    plan = kv.plan([1], starts=[0], lengths=[3], offsets=[5])[None]
    ((start, n, slots, mask),) = plan.prefill
    assert (start, n) == (0, 3) and slots.tolist() == slots_of(kv, 1, 8)
    # row i (position 5 + i) sees positions 0..5+i
    assert mask.tolist() == [[p <= 5 + i for p in range(8)] for i in range(3)]


def test_a_windowed_layer_reads_the_last_window_slots_and_a_banded_mask():
    kv = cache()
    kv.plan([1, 2], [0, 20], [20, 3], [0, 0])
    plans = kv.plan([1, 2], starts=[0, 1], lengths=[1, 1], offsets=[20, 3], windows=(None, 6))
    full, win = plans[None], plans[6]
    assert full.decode_lengths.tolist() == [21, 4] and win.decode_lengths.tolist() == [6, 4]
    assert win.decode_slots[0].tolist() == slots_of(kv, 1, 21)[15:]  # positions 15..20: the last 6
    assert win.decode_slots[1, :4].tolist() == slots_of(kv, 2, 4)
    assert torch.equal(win.write, full.write)  # every key is written (and kept) whatever the window
    # a chunk of 3 after 5 cached positions, window 4: row i (position 5 + i) sees positions 2+i..5+i
    kv.plan([3], [0], [5], [0])
    ((_, _, slots, mask),) = kv.plan([3], [0], [3], [5], windows=(4,))[4].prefill
    assert mask.tolist() == [[2 + i <= p <= 5 + i for p in range(8)] for i in range(3)]
    # a first chunk longer than the window needs an explicit mask; one within it keeps the causal kernel
    assert kv.plan([4], [0], [6], [0], windows=(4,))[4].prefill[0][3] is not None
    assert kv.plan([5], [0], [4], [0], windows=(4,))[4].prefill[0][3] is None


def test_released_blocks_are_reused_and_growth_keeps_what_is_cached():
    kv = cache()
    kv.plan([1], [0], [40], [0])
    first_blocks = list(kv.blocks.tables[1])
    kv.keys[0][np.array(slots_of(kv, 1, 40))] = 1.5  # something cached
    kv.blocks.release(1)
    assert 1 not in kv.blocks.tables
    kv.plan([2], [0], [40], [0])
    assert sorted(kv.blocks.tables[2]) == sorted(first_blocks)  # freed blocks come back first
    before = kv.blocks.n_blocks
    kv.plan([3], [0], [BLOCK * (before + 1)], [0])  # more than is free: every layer grows
    assert kv.blocks.n_blocks >= 2 * before and kv.keys[1].shape[0] == kv.blocks.n_blocks * BLOCK
    assert torch.all(kv.keys[0][torch.tensor(slots_of(kv, 2, 40))] == 1.5)
    used = [b for t in kv.blocks.tables.values() for b in t]
    assert len(used) == len(set(used)) and not set(used) & set(kv.blocks.free)
