"""The scheduler alone (no arrays, no stages): admission, queueing, micro-batch composition."""

import pytest

from engine.core.errors import UserError
from engine.core.sampling import SamplingParams
from engine.serving.scheduler import Scheduler, Seq


def seq(i, prompt_len, max_tokens=4):
    return Seq(i, list(range(prompt_len)), max_tokens, SamplingParams(), reserve=prompt_len + max_tokens)


def run(sched, slices):
    """The batch ran: its tokens are cached, and every sampling slice made one token."""
    sched.completed(slices)
    for sl in slices:
        if sl.sample:
            sl.seq.generated.append(7)


def shape(slices):
    return [(sl.seq.seq_id, sl.start, sl.n, sl.sample) for sl in slices]


def test_admission_is_first_come_first_served_within_the_kv_budget():
    s = Scheduler(100)
    a, b, c = seq(1, 56), seq(2, 46), seq(3, 6)  # reserves 60, 50, 10
    for x in (a, b, c):
        s.add(x)
    # b does not fit beside a; c would, but does not overtake b at the head of the queue
    assert s.running == [a] and list(s.waiting) == [b, c] and s.reserved == 60
    s.finish(a)
    s.admit()
    assert s.running == [b, c] and not s.waiting and s.reserved == 60


def test_limits_refuse_at_once_or_queue():
    s = Scheduler(100, max_seqs=1, max_queue=1)
    with pytest.raises(UserError, match="needs 101 KV tokens"):
        s.add(seq(0, 97))  # larger than any budget: refused, not queued
    s.add(seq(1, 5))
    s.add(seq(2, 5))  # max_seqs: waits
    assert [x.seq_id for x in s.running] == [1] and [x.seq_id for x in s.waiting] == [2]
    with pytest.raises(UserError, match="queue full"):
        s.add(seq(3, 5))
    s.finish(s.waiting[0])  # cancelled while waiting: out of the queue
    assert not s.waiting and s.reserved == 9


def test_a_long_prompt_is_prefilled_a_chunk_at_a_time_and_samples_at_its_end():
    s = Scheduler(1000, max_batch_tokens=32)
    long = seq(1, 70)
    s.add(long)
    got = []
    while not long.generated:
        slices = s.next_batch()
        got += shape(slices)
        run(s, slices)
    assert got == [(1, 0, 32, False), (1, 32, 32, False), (1, 64, 6, True)]
    assert long.cached == 70 and shape(s.next_batch()) == [(1, 70, 1, True)]  # then decode steps


def test_decode_steps_go_first_and_prefill_rides_along_within_its_cap():
    s = Scheduler(10_000, max_batch_tokens=64, prefill_with_decode=16)
    d1, d2 = seq(1, 3), seq(2, 5)
    s.add(d1)
    s.add(d2)
    run(s, s.next_batch())  # both prompts in one batch
    newcomer = seq(3, 40)
    s.add(newcomer)
    slices = s.next_batch()
    # decode rows of both running sequences, then 16 prompt tokens of the newcomer (not 62)
    assert shape(slices) == [(1, 3, 1, True), (2, 5, 1, True), (3, 0, 16, False)]
    assert all(sl.seq.in_flight for sl in slices) and s.next_batch() == []  # nothing else is ready
    run(s, slices)
    assert shape(s.next_batch()) == [(1, 4, 1, True), (2, 6, 1, True), (3, 16, 16, False)]


def test_micro_batches_split_the_running_sequences_evenly():
    s = Scheduler(10_000, micro_batches=2)
    seqs = [seq(i, 2) for i in range(5)]
    for x in seqs:
        s.add(x)
    first, second = s.next_batch(), s.next_batch()
    # each takes at most ceil(5 / 2) = 3 sequences; nobody is in two batches at once
    assert [len(first), len(second)] == [3, 2]
    assert {sl.seq.seq_id for sl in first}.isdisjoint(sl.seq.seq_id for sl in second)
    assert s.next_batch() == []
    run(s, first)
    assert {sl.seq.seq_id for sl in s.next_batch()} == {sl.seq.seq_id for sl in first}


def test_a_sequence_rebuilt_after_a_lost_stage_feeds_prompt_and_generated_tokens():
    s = Scheduler(10_000, max_batch_tokens=8)
    x = seq(1, 5)
    s.add(x)
    run(s, s.next_batch())
    run(s, s.next_batch())
    assert x.generated == [7, 7] and x.cached == 6
    x.cached = 0  # its caches were lost: the next input is everything not cached, generated tokens too
    (sl,) = s.next_batch()
    assert (sl.start, sl.n, sl.sample) == (0, 7, True) and x.tokens(0, 7) == [0, 1, 2, 3, 4, 7, 7]
