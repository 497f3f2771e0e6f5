"""The wire format: every message kind through pack and unpack (and real ZeroMQ frames), the stage
report validated field by field."""

import dataclasses

import numpy as np
import pytest
import zmq

from engine.core.sampling import SamplingParams
from engine.core.stage import SampledToken, SeqChunk, StageBatch, StageReport, StageResult
from engine.core.tensors import TypedArray
from transport import protocol as P
from transport.wire import (
    WireError,
    pack,
    pack_batch,
    pack_report,
    pack_result,
    pack_tensor_entry,
    unpack,
    unpack_batch,
    unpack_report,
    unpack_result,
    unpack_tensor_entry,
)

REPORT = StageReport(address="tcp://127.0.0.1:5555", heartbeat="tcp://127.0.0.1:40001", backend="torch", device="cpu",
                     dtype="bfloat16", num_layers=30, layers=(15, 29), kv_tokens=4096, kv_tokens_used=12, kv_tokens_cached=32,
                     live_sequences=[3, 9], max_seqs=None, draining=False,
                     identity={"config": "ab12", "weights": None}, ms_per_layer=0.61, head_ms=2.5,
                     layer_bytes=7_000_000, free_memory=1 << 34, resident_bytes=1 << 29, forward_ms=None)


@pytest.fixture(scope="module")
def pair():
    """A real DEALER/ROUTER pair on inproc: frames as ZeroMQ delivers them (zero-copy Frames)."""
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
    b.bind("inproc://wire-test")
    a.connect("inproc://wire-test")
    yield a, b
    a.close(0)
    b.close(0)


def through(pair, frames):
    a, b = pair
    a.send_multipart(frames, copy=False)
    _, *got = b.recv_multipart(copy=False)
    return unpack(got)


def batch(dtype):
    rows = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    return StageBatch([SeqChunk(7, 0, np.array([1, 2, 3], np.int32), SamplingParams(temperature=0.7, top_k=5, seed=3)),
                       SeqChunk(2**62, 40, np.array([9, 8], np.int32), None)], TypedArray.from_float32(rows, dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_forward_round_trip(pair, dtype):
    sent = batch(dtype)
    header, arrays = through(pair, pack_batch(sent, req=4, client="c-1", route=["tcp://h:1", "ipc:///tmp/x"]))
    assert header["kind"] == P.FORWARD and header["route"] == ["tcp://h:1", "ipc:///tmp/x"] and header["req"] == 4
    got = unpack_batch(header, arrays)
    assert [(s.seq_id, s.offset, s.token_ids.tolist(), s.sampling) for s in got.seqs] == \
        [(s.seq_id, s.offset, s.token_ids.tolist(), s.sampling) for s in sent.seqs]
    assert got.hidden.dtype == dtype and got.hidden.data.dtype == sent.hidden.data.dtype
    assert np.array_equal(got.hidden.data, sent.hidden.data)  # bit for bit: bf16 stays 2-byte words


def test_result_round_trip(pair):
    tokens = [SampledToken(7, 42, -0.25, [(42, -0.25), (3, -1.5)]), SampledToken(9, 1, -3.0, [])]
    header, arrays = through(pair, pack_result(StageResult(tokens=tokens), req=5, timings=[["tcp://h:1", 1.5]]))
    assert header["kind"] == P.RESULT and header["timings"] == [["tcp://h:1", 1.5]]
    assert unpack_result(header, arrays) == StageResult(None, tokens)
    hidden = TypedArray.from_float32(np.ones((2, 4), np.float32), "bfloat16")
    got = unpack_result(*through(pair, pack_result(StageResult(hidden=hidden), req=6)))
    assert got.tokens == [] and np.array_equal(got.hidden.data, hidden.data)


@pytest.mark.parametrize("kind,fields", [
    (P.HELLO, {"identity": {"config": "ab12", "weights": None}}), (P.LOAD, {"layers": [0, 14]}),
    (P.RELEASE, {"seq_ids": [1, 2, 3]}), (P.PING, {}), (P.HEALTH, {}), (P.OK, {"seqs": 2}),
    (P.ERROR, {"message": "KV cache full", "stage": "tcp://h:1"}),
])
def test_control_messages_round_trip(pair, kind, fields):
    header, arrays = through(pair, pack(kind, req=9, **fields))
    assert arrays == [] and {k: header[k] for k in ("kind", "req", *fields)} == {"kind": kind, "req": 9, **fields}


def test_a_draft_request_round_trip(pair):
    tokens = np.array([5, 17, 2], np.int32)
    header, arrays = through(pair, pack(P.DRAFT, [("int32", tokens)], req=3, seq_id=12, start=40, k=4))
    assert (header["kind"], header["seq_id"], header["start"], header["k"]) == (P.DRAFT, 12, 40, 4)
    assert arrays[0][0] == "int32" and np.array_equal(arrays[0][1], tokens)


def test_info_carries_a_stage_report(pair):
    header, _ = through(pair, pack(P.INFO, req=1, info=pack_report(REPORT)))
    assert header["kind"] == P.INFO and unpack_report(header["info"]) == REPORT
    idle = dataclasses.replace(REPORT, layers=None, kv_tokens=0, forward_ms=3.5)
    assert unpack_report(through(pair, pack(P.INFO, info=pack_report(idle)))[0]["info"]) == idle


@pytest.mark.parametrize("field,value", [("layers", [1]), ("layers", "0-3"), ("kv_tokens", 1.5), ("draining", 1),
                                         ("live_sequences", [1, "x"]), ("identity", {"config": 5}), ("backend", None),
                                         ("ms_per_layer", "fast"), ("max_seqs", True)])
def test_a_bad_report_field_is_refused(field, value):
    d = pack_report(REPORT)
    d[field] = value
    with pytest.raises(WireError, match=field):
        unpack_report(d)
    with pytest.raises(WireError, match="exactly"):
        unpack_report({k: v for k, v in pack_report(REPORT).items() if k != "heartbeat"})


def test_every_kind_is_covered_here():
    """A kind added to the protocol without a round trip above fails this test."""
    covered = {P.FORWARD, P.RESULT, P.INFO, P.HELLO, P.LOAD, P.RELEASE, P.PING, P.HEALTH, P.OK, P.ERROR, P.MODEL,
               P.CHUNK, P.DRAFT}
    assert covered == P.KINDS


def test_weight_delivery_messages_round_trip(pair):
    """MODEL's manifest (chunk hashes as bytes) and a CHUNK's uint8 frame come back as sent."""
    from engine.core.weight_store import TensorEntry

    entry = TensorEntry("model.layers.0.mlp.up_proj.weight", "BF16", [8, 4], 64, [bytes(range(32))])
    header, arrays = through(pair, pack(P.MODEL, req=3, identity={"config": "ab", "weights": "cd"}, config="{}",
                                        tensors=[pack_tensor_entry(entry)]))
    assert arrays == [] and unpack_tensor_entry(header["tensors"][0]) == entry
    data = np.arange(64, dtype=np.uint8)
    header, arrays = through(pair, pack(P.CHUNK, [("uint8", data)], req=4, name=entry.name, offset=0))
    assert header["kind"] == P.CHUNK and arrays[0][0] == "uint8" and np.array_equal(arrays[0][1], data)
    with pytest.raises(WireError):
        unpack_tensor_entry([entry.name, "BF16", [8, 4], 64, [b"short"]])  # a hash is 32 bytes


def test_masks_and_openai_sampling_round_trip(pair):
    """Structured output's masks ride in a frame of their own, each named by its sequence; the
    OpenAI penalties and logit bias come back as sent; a mask nobody names, or on a sequence that
    samples nothing, is refused."""
    p = SamplingParams(temperature=0.5, presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((3, 2.5), (9, -100.0)),
                       output_from=4, min_tokens=3, stop_ids=(2, 0))
    mask = np.arange(6, dtype=np.int32) * 7919
    sent = StageBatch([SeqChunk(1, 0, np.array([1, 2], np.int32), p, mask),
                       SeqChunk(2, 0, np.array([4], np.int32), SamplingParams()),
                       SeqChunk(3, 0, np.array([5], np.int32), p, -mask)])
    header, arrays = through(pair, pack_batch(sent, req=1))
    got = unpack_batch(header, arrays)
    assert [s.sampling for s in got.seqs] == [s.sampling for s in sent.seqs]
    assert [None if s.allowed is None else s.allowed.tolist() for s in got.seqs] == [mask.tolist(), None,
                                                                                    (-mask).tolist()]
    assert got.hidden is None
    with pytest.raises(WireError, match="masks"):
        unpack_batch({**header, "masks": 1}, arrays)
    bad = [list(s) for s in header["seqs"]]
    bad[1][4] = 0  # a second sequence naming the first's mask
    with pytest.raises(WireError):
        unpack_batch({**header, "seqs": bad}, arrays)


def test_a_verified_draft_round_trips_with_a_mask_row_per_position(pair):
    """Speculative decoding: a chunk's draft count, and its draft + 1 mask rows, consecutive in the
    mask frame; a draft as long as the chunk, or on a sequence that samples nothing, is refused."""
    masks = np.arange(18, dtype=np.int32).reshape(3, 6)
    sent = StageBatch([SeqChunk(1, 9, np.array([5], np.int32), SamplingParams(), masks[0]),
                       SeqChunk(2, 4, np.array([7, 8, 9], np.int32), SamplingParams(), masks[:3] * 2, draft=2),
                       SeqChunk(3, 4, np.array([1, 2], np.int32), SamplingParams(), draft=1)])
    header, arrays = through(pair, pack_batch(sent, req=1))
    got = unpack_batch(header, arrays)
    assert [s.draft for s in got.seqs] == [0, 2, 1] and got.seqs[2].allowed is None
    assert got.seqs[1].allowed.tolist() == (masks * 2).tolist() and got.seqs[0].allowed.tolist() == masks[0].tolist()
    for entry, value in ((2, 3), (1, 1)):  # three drafts in a three-token chunk; drafts that sample nothing
        bad = [list(s) for s in header["seqs"]]
        bad[entry][8] = value
        if entry == 1:
            bad[entry][3], bad[entry][4] = None, None
        with pytest.raises(WireError):
            unpack_batch({**header, "seqs": bad}, arrays)


def test_prefix_cache_hashes_round_trip(pair):
    """A first chunk's prefix, the names of the blocks a chunk fills and the batch's evictions come
    back as sent; a hash that is not a non-negative 63-bit int is refused."""
    big = (1 << 63) - 1
    sent = StageBatch([SeqChunk(1, 32, np.array([1, 2], np.int32), SamplingParams(), prefix=[big, 7]),
                       SeqChunk(2, 15, np.array([4], np.int32), SamplingParams(), names=[12345])],
                      evict=[3, 4, 5])
    header, arrays = through(pair, pack_batch(sent, req=1))
    got = unpack_batch(header, arrays)
    assert [(list(s.prefix), list(s.names)) for s in got.seqs] == [([big, 7], []), ([], [12345])]
    assert list(got.evict) == [3, 4, 5]
    for bad_evict in ([-1], [1 << 63], ["x"], 5):
        with pytest.raises(WireError, match="evict"):
            unpack_batch({**header, "evict": bad_evict}, arrays)
    bad = [list(s) for s in header["seqs"]]
    bad[0][5] = [1.5]
    with pytest.raises(WireError, match="seq entry"):
        unpack_batch({**header, "seqs": bad}, arrays)


def test_sampling_goes_once_per_sequence(pair):
    """A sequence's params go in full with its first sampling chunk, then as SAME_SAMPLING; the
    stage resolves them from what it kept, and a sequence starting afresh is sent them again."""
    from transport.wire import SAME_SAMPLING, SamplingMemo

    bias = tuple((i, 1.0) for i in range(1000))
    p = SamplingParams(temperature=0.5, logit_bias=bias, seed=1)
    sender, stage = SamplingMemo(), SamplingMemo()
    first = StageBatch([SeqChunk(5, 0, np.array([1, 2], np.int32), p)])
    later = StageBatch([SeqChunk(5, 2, np.array([3], np.int32), p)])
    h1, a1 = through(pair, pack_batch(first, sender, req=1))
    h2, a2 = through(pair, pack_batch(later, sender, req=2))
    assert isinstance(h1["seqs"][0][3], dict) and h2["seqs"][0][3] == SAME_SAMPLING
    assert len(pack_batch(later, sender, req=3)[0]) < 200 < len(h1.get("seqs").__repr__())
    assert unpack_batch(h1, a1, stage).seqs[0].sampling == p
    assert unpack_batch(h2, a2, stage).seqs[0].sampling == p
    with pytest.raises(WireError, match="never sent"):
        unpack_batch(h2, a2, SamplingMemo())  # a stage that never saw the sequence refuses, never guesses
    sender.forget([5])  # released: the next life of the sequence is sent in full again
    assert isinstance(through(pair, pack_batch(later, sender, req=4))[0]["seqs"][0][3], dict)


def test_a_batch_over_the_header_limit_raises_and_sends_nothing():
    from engine.core.errors import BatchTooLarge
    from transport.wire import SamplingMemo

    p = SamplingParams(logit_bias=tuple((i, 1.0) for i in range(1024)))
    seqs = [SeqChunk(i, 0, np.array([1], np.int32), p.copy_with(seed=i)) for i in range(120)]
    memo = SamplingMemo()
    with pytest.raises(BatchTooLarge):
        pack_batch(StageBatch(seqs), memo, req=1)
    assert memo.params == {}  # nothing counts as sent
    pack_batch(StageBatch(seqs[:40]), memo, req=2)
    assert len(memo.params) == 40


def test_peek_envelope_names_the_request_of_a_header_too_large():
    from transport.wire import peek_envelope

    frames = pack(P.FORWARD, req=77, client="c-9", seqs=[[1] * 10] * 120_000)
    assert len(frames[0]) > P.MAX_HEADER_BYTES
    with pytest.raises(WireError, match="too large"):
        unpack(frames)
    assert peek_envelope(frames[0]) == (77, "c-9")
    assert peek_envelope(b"\x93garbage") == (None, None)


def test_result_tokens_carry_a_per_sequence_error(pair):
    tokens = [SampledToken(1, 4, -0.5, []), SampledToken(2, -1, 0.0, [], error="ValueError: no token allowed")]
    got = unpack_result(*through(pair, pack_result(StageResult(tokens=tokens), req=1)))
    assert got.tokens == tokens
    with pytest.raises(WireError):
        unpack_result({"tokens": [[1, 2, 3]]}, [])
