"""The prefix cache: block bookkeeping, and greedy float32 outputs token-identical with it on and off.

Outputs are compared with the same requests through a pipeline without the cache; the stages are
asked what they hold, and must hold exactly what the coordinator's copy says.
"""

import threading

import pytest

from engine.api import Generator, local_pipeline
from engine.core.errors import CacheMiss, UserError
from engine.core.kv_blocks import BLOCK, BlockManager, block_hashes
from engine.core.sampling import SamplingParams

# small micro-batches: prompts are prefilled in several chunks, beside other requests' steps
SMALL = dict(max_batch_tokens=48, prefill_with_decode=16)


def manager(capacity=None):
    return BlockManager(capacity, lambda old, need: old + max(need, 4))


# -- bookkeeping --------------------------------------------------------------------------------

def test_chained_hashes_name_a_block_by_everything_before_it():
    a = list(range(40))
    b = a[:16] + [99] + a[17:]  # differs in block 1 only
    ha, hb = block_hashes(a, 7), block_hashes(b, 7)
    assert len(ha) == 2 and ha[0] == hb[0] and ha[1] != hb[1]
    assert block_hashes(a[:16] + [5] * 16, 7)[0] == ha[0]
    assert block_hashes(a, 8)[0] != ha[0]  # another salt: another coordinator's blocks
    assert block_hashes(a[16:32], ha[0]) == ha[1:]  # chained: computed block by block
    assert all(0 <= h < 2**63 for h in ha)


def test_named_blocks_outlive_their_sequence_and_are_linked_by_the_next():
    m = manager()
    m.slots(1, 40)
    m.name(1, 0, [11, 12])
    t1 = m.table(1)
    m.release(1)
    assert m.cached_blocks == 2 and t1[2] in m.free  # the unnamed partial block is free at once
    assert m.match([11, 12, 13]) == 2
    m.link(2, [11, 12])
    assert m.table(2) == t1[:2] and m.cached_blocks == 0
    m.slots(2, 33)  # its own block after the shared ones
    assert m.table(2)[:2] == t1[:2] and len(m.table(2)) == 3
    m.link(3, [11])  # two sequences share block 0
    assert m.refs[t1[0]] == 2
    m.release(2)
    assert m.cached_blocks == 1  # block 1; block 0 is still held by sequence 3
    with pytest.raises(CacheMiss, match="prefix cache miss"):
        m.link(4, [11, 99])


def test_eviction_is_lru_over_unreferenced_blocks_and_never_touches_a_live_one():
    m = BlockManager(4, lambda old, need: old + need, keep_evicted=True)
    for sid, names in ((1, [1, 2]), (2, [3, 4])):
        m.slots(sid, 32)
        m.name(sid, 0, names)
    m.release(1)  # blocks 1, 2 cached; 3, 4 live
    m.slots(5, 16)  # the pool is full: the least recently used unreferenced block goes
    assert m.evicted == [2]  # a released sequence's last block goes first
    assert m.match([1, 2]) == 1 and m.match([3, 4]) == 2
    m.slots(6, 32)  # room for two more: block 1 goes; 3 and 4 are live, so the pool grows
    assert m.evicted == [2, 1] and m.match([3, 4]) == 2 and m.n_blocks == 5
    m.evict([3])  # told to forget a live block's name: it stays its sequence's, only unnamed
    assert m.match([3]) == 0 and m.refs[m.table(2)[0]] == 1
    m.release(2)
    assert m.cached_blocks == 1  # only block 4 is still named


def test_the_first_name_wins_and_a_copy_stays_private():
    m = manager()
    for sid in (1, 2):  # two sequences computed the same block in one batch
        m.slots(sid, 16)
        m.name(sid, 0, [42])
    assert m.by_hash[42] == m.table(1)[0]
    own = m.table(2)[0]
    m.release(2)
    assert own in m.free and m.cached_blocks == 0


# -- outputs, with the cache on and off ---------------------------------------------------------

SPECS = ["torch", "mlx", "mlx:0-14,torch:15-29"]


@pytest.fixture(scope="module", params=SPECS)
def pair(request, real_model):
    """(generator with the prefix cache, generator without), on the same split."""
    on = Generator(real_model, local_pipeline(real_model, request.param), **SMALL)
    off = Generator(real_model, local_pipeline(real_model, request.param), prefix_cache=False, **SMALL)
    yield on, off
    on.close()
    off.close()


def history(gen, n):
    text = ("A long conversation about rivers, mountains and the towns between them, told slowly. " * 40)
    return gen.tokenizer.encode(text)[:n]


def stream(gen, ids, n, out, key):
    s = gen.stream(ids, max_tokens=n, ignore_eos=True)
    out[key] = ([c.token_id for c in s], s.request.cached_tokens)


def concurrently(gen, prompts, n):
    out = {}
    threads = [threading.Thread(target=stream, args=(gen, p, n, out, i)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [out[i] for i in range(len(prompts))]


def held(gen):
    """What each stage holds against the coordinator's copy: (named blocks, cached tokens) each."""
    stages = [(set(s.blocks.by_hash), s.kv_tokens_cached()) for s in gen.pipeline.stages]
    mine = gen.engine.prefix
    return stages, [(set(mine.blocks.by_hash), mine.cached_tokens)] * len(stages)


def assert_consistent(gen):
    stages, mine = held(gen)
    assert stages == mine
    assert [(s.live_sequences(), s.kv_tokens_used()) for s in gen.pipeline.stages] == \
        [([], 0)] * len(gen.pipeline.stages)


def test_shared_prefixes_arriving_together_and_a_second_turn(pair):
    on, off = pair
    base = history(on, 200)
    turn1 = base + on.tokenizer.encode(" First question?")
    r1 = on.generate(turn1, max_tokens=12, ignore_eos=True)
    assert r1.token_ids == off.generate(turn1, max_tokens=12, ignore_eos=True).token_ids
    # turn 2 resends turn 1 and its answer; others with the same history arrive together
    turn2 = turn1 + r1.token_ids + on.tokenizer.encode(" And then?")
    prompts = [turn2] + [base + on.tokenizer.encode(f" Question number {i}?") for i in range(3)]
    got = concurrently(on, prompts, 10)
    want = concurrently(off, prompts, 10)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [c for _, c in want] == [0] * 4
    # turn 2 finds turn 1's prompt and most of its answer; the others the shared history
    assert got[0][1] >= len(turn1) // BLOCK * BLOCK
    assert all(c >= len(base) // BLOCK * BLOCK for _, c in got[1:])
    assert_consistent(on)


def test_cancelled_requests_leave_their_prefix_cached_and_others_unchanged(pair):
    on, off = pair
    base = history(on, 130)
    ps = [base + on.tokenizer.encode(f" Item {i}.") for i in range(3)]
    want = [off.generate(p, max_tokens=8, ignore_eos=True).token_ids for p in ps]
    s = on.stream(ps[0], max_tokens=50, ignore_eos=True)
    next(s)
    next(s)
    s.close()  # cancelled mid-decode
    prefilling = on.stream(ps[1], max_tokens=50, ignore_eos=True)
    prefilling.close()  # cancelled before (or while) its prompt was prefilled
    got = concurrently(on, ps, 8)
    assert [t for t, _ in got] == want
    assert got[2][1] >= len(base) // BLOCK * BLOCK
    assert_consistent(on)


def test_penalties_read_the_same_history_with_a_cached_prefix(pair):
    on, off = pair
    p = history(on, 100) + on.tokenizer.encode(" Go on.")
    on.generate(p, max_tokens=4, ignore_eos=True)  # cached now
    for sampling in (SamplingParams(presence_penalty=1.5, frequency_penalty=0.8),
                     SamplingParams(repetition_penalty=1.3)):  # reads the prompt: no prefix is reused
        want = off.generate(p, max_tokens=16, sampling=sampling, ignore_eos=True).token_ids
        s = on.stream(p, max_tokens=16, sampling=sampling, ignore_eos=True)
        assert [c.token_id for c in s] == want
        assert (s.request.cached_tokens > 0) == (sampling.repetition_penalty == 1.0)


@pytest.mark.parametrize("spec", ["torch", "mlx:0-14,torch:15-29"])
def test_eviction_under_a_small_kv_budget(real_model, spec):
    """256 tokens of KV: prompts sharing prefixes, one after another and several at once, keep
    evicting each other's cached blocks; outputs never change and no live block is lost."""
    kw = dict(kv_tokens=256)
    on = Generator(real_model, local_pipeline(real_model, spec, **kw), **SMALL)
    off = Generator(real_model, local_pipeline(real_model, spec, **kw), prefix_cache=False, **SMALL)
    try:
        text = history(on, 400)
        a, b, c = text[:90], text[150:230], text[300:390]  # 16 blocks' worth between them
        ps = [x + on.tokenizer.encode(f" {name}{i}") for x, name in ((a, "A"), (b, "B"), (c, "C")) for i in range(2)]
        for group in ([ps[0]], [ps[2]], [ps[4]], ps[0:2], [ps[3], ps[5]], [ps[1], ps[2], ps[4]]):
            assert [t for t, _ in concurrently(on, group, 10)] == [t for t, _ in concurrently(off, group, 10)]
            assert_consistent(on)
        assert on.engine.prefix.evictions > 0 and on.engine.prefix.hit_tokens > 0
        assert all(s.kv_tokens_cached() <= 256 for s in on.pipeline.stages)
    finally:
        on.close()
        off.close()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_failed_batch_leaves_the_stages_and_the_coordinator_agreeing(tiny_dirs, backend):
    """The coordinator's copy against a real stage, step by step: a batch refused by the stage
    named nothing there, so its names are forgotten everywhere, and a request admitted earlier
    with a cached prefix still finds every block it links."""
    import numpy as np

    from engine.api import load_stage
    from engine.core.stage import SeqChunk, StageBatch
    from engine.serving.prefix_cache import PrefixCache
    from engine.serving.scheduler import Seq

    stage = load_stage(backend, tiny_dirs["llama"], 0, 3)
    cache = PrefixCache(4096)
    p = SamplingParams()

    def seq(sid, ids):
        return Seq(sid, ids, 4, p, len(ids) + 4)

    def run(chunks, ok=True):
        batch = StageBatch([SeqChunk(s.seq_id, start, np.asarray(s.tokens(start, n), np.int32), p,
                                     None, *cache.chunk(s, start, n)) for s, start, n in chunks])
        batch.evict = cache.end_batch()
        if ok:
            stage.forward(batch)
        else:
            with pytest.raises(UserError):
                stage.forward(batch)
            cache.forget(chunks)

    def agree(linked_not_sent=0):
        """The same names; the same cached blocks but those a request admitted and not yet sent
        has linked (held on the coordinator's copy from admission, on a stage from its first chunk)."""
        assert set(stage.blocks.by_hash) == set(cache.blocks.by_hash)
        assert stage.kv_tokens_cached() == cache.cached_tokens + linked_not_sent

    a = seq(1, list(range(1, 41)))
    assert cache.admit(a) == 0
    run([(a, 0, 40)])
    stage.release([1])
    cache.release(1)
    agree()
    b = seq(2, list(range(1, 33)) + [7, 8, 9])
    assert cache.admit(b) == 32  # admitted, not yet sent
    bad = seq(3, list(range(50, 90)))
    cache.admit(bad)
    bad.prompt[-1] = 10**6  # a token id the stage refuses: the batch fails before it names anything
    run([(bad, 0, 40)], ok=False)
    cache.release(3)
    agree(linked_not_sent=32)
    run([(b, 32, 3)])  # links the two cached blocks, prefills the rest
    assert stage.live_sequences() == [2] and stage.kv_tokens_used() == 35
    stage.release([2])
    cache.release(2)
    agree()
    stage.close()
