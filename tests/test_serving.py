"""Serving: batched, concurrent, joining, cancelled and queued requests on SmolLM2 (float32).

Every check compares against the same request run alone through the same pipeline, and asks
the stages themselves what they still hold.
"""

import asyncio
import json
import subprocess
import sys
import threading

import pytest

from engine.app.bench.serving import KEYS
from engine.api import local_pipeline
from engine.app.procs import start_stage, stop_stages
from engine.core.errors import QueueFull, UserError
from engine.api import Generator
from engine.core.sampling import SamplingParams
from engine.api import connect_pipeline

# small micro-batches, so prompts are prefilled in several chunks between other requests' steps
SMALL = dict(max_batch_tokens=32, prefill_with_decode=16)


def prompts(gen, lengths):
    """Token-id prompts of the given lengths, each different."""
    text = gen.tokenizer.encode("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 20)
    return [text[i * 3 : i * 3 + n] for i, n in enumerate(lengths)]


def alone(gen, ids, max_tokens, sampling=None):
    return gen.generate(ids, max_tokens=max_tokens, sampling=sampling, ignore_eos=True).token_ids


def live(gen):
    return [(s.live_sequences(), s.kv_tokens_used()) for s in gen.pipeline.stages]


@pytest.fixture(scope="module", params=["torch", "mlx:0-14,torch:15-29"])
def gen(request, real_model):
    g = Generator(real_model, local_pipeline(real_model, request.param), **SMALL)
    yield g
    g.close()


def test_batch_of_very_different_lengths_equals_each_alone(gen):
    ps = prompts(gen, [1, 7, 60, 150])
    max_tokens = [10, 16, 8, 12]
    want = [alone(gen, p, n) for p, n in zip(ps, max_tokens)]
    got = gen.generate_batch(ps, max_tokens=max_tokens, ignore_eos=True)
    assert [r.token_ids for r in got] == want
    assert live(gen) == [([], 0)] * len(gen.pipeline.stages)


def test_requests_joining_mid_flight_equal_alone_and_prefill_interleaves(gen):
    ps = prompts(gen, [12, 20, 120])
    got, events = {}, []
    lock = threading.Lock()

    def run(i, n):
        toks = []
        for c in gen.stream(ps[i], max_tokens=n, ignore_eos=True):
            toks.append(c.token_id)
            with lock:
                events.append((i, len(toks)))
        got[i] = toks

    a = threading.Thread(target=run, args=(0, 30))
    a.start()
    while (0, 4) not in events:  # B joins after A's 4th token, C (a long prompt) after A's 8th
        threading.Event().wait(0.005)
    b = threading.Thread(target=run, args=(1, 20))
    b.start()
    while (0, 8) not in events:
        threading.Event().wait(0.005)
    with lock:
        c_joined = len(events)
    c = threading.Thread(target=run, args=(2, 6))
    c.start()
    for t in (a, b, c):
        t.join(timeout=120)
    # each alone afterwards (before, C's prompt would be in the prefix cache: one chunk, not several)
    assert [got[i] for i in range(3)] == [alone(gen, p, n) for p, n in zip(ps, (30, 20, 6))]
    # C's 120-token prompt took several chunks; A kept decoding between them instead of stalling
    c_first = events.index((2, 1))
    assert sum(1 for i, _ in events[c_joined:c_first] if i == 0) >= 3
    assert live(gen) == [([], 0)] * len(gen.pipeline.stages)


def test_each_request_keeps_its_own_sampling(gen):
    ps = prompts(gen, [9, 14, 5])
    samplings = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7),
                 SamplingParams(temperature=1.2, top_k=20, seed=3, repetition_penalty=1.3)]
    want = [alone(gen, p, 12, s) for p, s in zip(ps, samplings)]
    got = gen.generate_batch(ps, max_tokens=12, sampling=samplings, ignore_eos=True)
    assert [r.token_ids for r in got] == want


def test_cancelled_streams_leave_no_kv_behind(gen):
    ps = prompts(gen, [10, 40, 25])
    streams = [gen.stream(p, max_tokens=50, ignore_eos=True) for p in ps]
    for st in streams:
        next(st), next(st)
    streams[0].close()
    for _ in zip(range(3), streams[1]):
        pass
    del streams[1]  # dropped unfinished: cancelled too
    assert len(list(streams[-1])) == 48  # the survivor runs to its end
    assert live(gen) == [([], 0)] * len(gen.pipeline.stages)


def test_astream_runs_concurrently_and_cancels(gen):
    ps = prompts(gen, [8, 30])
    want = [alone(gen, p, 10) for p in ps]

    async def collect(p):
        return [c.token_id async for c in gen.astream(p, max_tokens=10, ignore_eos=True)]

    async def cancel_midway(p):
        started = asyncio.Event()

        async def long_stream():
            async for _ in gen.astream(p, max_tokens=200, ignore_eos=True):
                started.set()

        task = asyncio.ensure_future(long_stream())
        await started.wait()  # cancelled mid-generation, however fast the steps are
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main():
        got = await asyncio.gather(collect(ps[0]), collect(ps[1]), cancel_midway(ps[1]))
        return got[:2]

    assert asyncio.run(main()) == want
    threading.Event().wait(0.2)  # the cancellation reaches the engine thread
    assert live(gen) == [([], 0)] * len(gen.pipeline.stages)


def test_kv_budget_admits_queues_and_refuses(real_model):
    pipe = local_pipeline(str(real_model), "torch")
    pipe.stages[0].set_kv_budget(100)
    g = Generator(real_model, pipe, max_queue=1, **SMALL)
    try:
        ps = prompts(g, [40, 45, 50, 30])
        with pytest.raises(UserError, match="needs 111 KV tokens.*holds 100"):
            g.stream(ps[0] + ps[3], max_tokens=41)
        want = [alone(g, p, 20) for p in ps[:2]]
        # 60 + 65 > 100: the second waits for the first; a third finds the queue full
        streams = [g.stream(p, max_tokens=20, ignore_eos=True) for p in ps[:2]]
        with pytest.raises(QueueFull, match="queue full"):  # at once if the second already waits, else on reading
            list(g.stream(ps[2], max_tokens=20, ignore_eos=True))
        assert [[c.token_id for c in st] for st in streams[:2]] == want
        assert live(g) == [([], 0)]
    finally:
        g.close()


def test_bad_requests_fail_at_once_with_clear_errors(gen):
    for kw, msg in ((dict(prompt=[]), "empty prompt"), (dict(prompt=[1, 10**9]), "token ids must be in"),
                    (dict(prompt=[1], max_tokens=0), "max tokens"), (dict(prompt=[1] * 9000), "context")):
        with pytest.raises(UserError, match=msg):
            gen.stream(kw.pop("prompt"), **kw)
    with pytest.raises(UserError, match="3 entries for 2 prompts"):
        gen.generate_batch([[1], [2]], max_tokens=[1, 2, 3])


@pytest.fixture(scope="module")
def torch_daemons(real_model):
    procs = [start_stage("torch", real_model) for _ in range(2)]
    yield [address for _, address in procs]
    stop_stages([p for p, _ in procs])


def test_remote_micro_batches_in_flight_equal_alone(real_model, torch_daemons):
    a, b = torch_daemons
    pipe = connect_pipeline(str(real_model), f"{a}=0-14,{b}=15-29")
    g = Generator(real_model, pipe, inflight=2, **SMALL)
    try:
        ps = prompts(g, [5, 33, 12, 70, 2, 18])
        want = [alone(g, p, 12) for p in ps]
        steps = g.engine.profile.steps
        got = g.generate_batch(ps, max_tokens=12, ignore_eos=True)
        assert [r.token_ids for r in got] == want
        # the batch ran as more than one micro-batch per step
        assert g.engine.inflight == 2 and g.engine.profile.steps - steps > 12
        assert live(g) == [([], 0), ([], 0)]
    finally:
        g.close()
        pipe.close()


def test_cli_bench_prints_the_json_keys(real_model, torch_daemons):
    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "bench", "--model", str(real_model), "--stages",
                        ",".join(torch_daemons), "--concurrency", "3", "--requests", "5", "--max-tokens", "4",
                        "--prompt-len", "9", "--inflight", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out)[: len(KEYS)] == list(KEYS)
    assert out["tokens"] == 5 * 4 and out["aggregate_tokens_per_s"] > 0 and out["requests_per_s"] > 0
    assert 0 < out["ttft_ms_p50"] <= out["ttft_ms_p95"] and 0 < out["itl_ms_p50"] <= out["itl_ms_p95"]
    bad = subprocess.run([sys.executable, "-m", "engine.app.cli", "bench", "--model", str(real_model), "--local",
                          "torch", "--concurrency", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "at least 1" in bad.stderr and "Traceback" not in bad.stderr
