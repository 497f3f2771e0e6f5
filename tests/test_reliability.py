"""Reliability and security with real daemon processes: lost stages, bad input, CURVE, limits, drain.

Recovery tests kill (-9), stop (SIGSTOP) or fail over a stage mid-generation and compare every
request's greedy tokens to an undisturbed run of the same requests.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import msgpack
import numpy as np
import pytest
import zmq

from engine.app.procs import start_stage, stop_stages
from engine.core.errors import CapacityError, StageFailure, UserError
from engine.api import Generator, SpeculativeConfig
from transport import protocol as P
from transport.auth import init_keys
from engine.api import connect_pipeline
from transport.client import Client, StageError
from transport.wire import pack, pack_batch
from engine.core.stage import SeqChunk, StageBatch
from engine.core.sampling import SamplingParams

LENGTHS = [6, 23, 11, 40]
MAX_TOKENS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(gen, lengths):
    text = gen.tokenizer.encode("Rain fell on the old town as the market stalls opened one by one. " * 10)
    return [text[i * 5 : i * 5 + n] for i, n in enumerate(lengths)]


def run_concurrently(gen, ps, max_tokens, on_token=None):
    """Each prompt streamed from its own thread; returns token lists (or the exception) per prompt."""
    out = [None] * len(ps)

    def run(i):
        try:
            toks = []
            for c in gen.stream(ps[i], max_tokens=max_tokens, ignore_eos=True):
                toks.append(c.token_id)
                if on_token:
                    on_token(i, len(toks))
            out[i] = toks
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return out


def live(pipe):
    return [(s.live_sequences(), s.kv_tokens_used()) for s in pipe.stages]


class Cluster:
    """Torch stage daemons on fixed loopback ports, so a restarted one comes back at its address."""

    def __init__(self, model, n):
        self.model = model
        self.addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(n)]
        self.procs = [start_stage("torch", model, listen=a)[0] for a in self.addresses]
        self.restarts: list[threading.Thread] = []

    def restart(self, i):
        self.procs[i] = start_stage("torch", self.model, listen=self.addresses[i])[0]

    def restart_soon(self, i):
        """Restart daemon i from another thread (the test goes on while it starts)."""
        t = threading.Thread(target=self.restart, args=(i,))
        t.start()
        self.restarts.append(t)

    def heal(self):
        """Every daemon running and answering again: what a test stopped is continued, what it
        killed is restarted at its address (daemons start in ~10 s; the tests share them)."""
        for t in self.restarts:
            t.join()
        self.restarts.clear()
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            else:
                self.restart(i)
        client = Client(30)  # and holding nothing a test's coordinator left behind
        for address in self.addresses:
            held = client.call(address, P.PING)["info"]["live_sequences"]
            if held:
                client.call(address, P.RELEASE, seq_ids=held)
        client.close()

    def close(self):
        stop_stages(self.procs)


@pytest.fixture(scope="module")
def shared_cluster(real_model):
    c = Cluster(real_model, 3)
    yield c
    c.heal()
    c.close()


@pytest.fixture()
def cluster(shared_cluster):
    yield shared_cluster
    shared_cluster.heal()


def generator(real_model, cluster, recovery_timeout_s, standby=(), speculative=None):
    a, b = cluster.addresses[:2]
    pipe = connect_pipeline(str(real_model), f"{a}=0-14,{b}=15-29", standby=standby, log=lambda m: None)
    return Generator(real_model, pipe, recovery_timeout_s=recovery_timeout_s, speculative=speculative)


@contextmanager
def undisturbed(real_model, cluster, lengths, recovery_timeout_s, standby=(), speculative=None):
    """(pipeline, generator, prompts, their tokens from an undisturbed concurrent run); closed after."""
    with generator(real_model, cluster, recovery_timeout_s, standby, speculative) as gen:
        ps = prompts(gen, lengths)
        yield gen.pipeline, gen, ps, run_concurrently(gen, ps, MAX_TOKENS)


def disturbed_run(gen, ps, when, disturb):
    """Run the prompts; call `disturb()` once request 0 has `when` tokens. Returns (outputs, time disturbed)."""
    at = {}

    def on_token(i, n):
        if i == 0 and n == when and not at:
            at["t"] = time.monotonic()
            disturb()

    return run_concurrently(gen, ps, MAX_TOKENS, on_token), at["t"]


def test_kill_9_and_restart_mid_generation_loses_nothing(real_model, cluster):
    def kill_and_restart():
        cluster.procs[1].kill()
        cluster.restart_soon(1)

    with undisturbed(real_model, cluster, LENGTHS, recovery_timeout_s=60) as (pipe, gen, ps, want):
        got, t_kill = disturbed_run(gen, ps, 8, kill_and_restart)
        assert got == want
        (event,) = gen.engine.recoveries
        assert event.ok and event.lost == [cluster.addresses[1]]
        assert event.detected - t_kill < 2.0, f"detected after {event.detected - t_kill:.2f} s"
        assert live(pipe) == [([], 0), ([], 0)]
        # the second run started from the first's cached prompts; the replacement had none, and
        # after the recovery every stage holds just the blocks the coordinator counts
        assert gen.engine.prefix.hit_tokens > 0
        assert [s.kv_tokens_cached() for s in pipe.stages] == [gen.engine.prefix.cached_tokens] * 2


def test_failover_to_a_standby(real_model, cluster):
    """A killed stage's layers go to the standby; the sequences, speculating (their drafts in flight
    when the stage dies), are replayed from their taken tokens and decode what an undisturbed run
    decodes; the stages hold nothing after."""
    with undisturbed(real_model, cluster, LENGTHS, standby=[cluster.addresses[2]], recovery_timeout_s=30,
                     speculative=SpeculativeConfig()) as (pipe, gen, ps, want):
        taken = gen.engine.accepted
        got, _ = disturbed_run(gen, ps, 5, cluster.procs[1].kill)
        assert got == want and taken > 20 and gen.engine.accepted > taken  # the repeated text is drafted
        assert [s.address for s in pipe.stages] == [cluster.addresses[0], cluster.addresses[2]]
        assert [(s.info.first, s.info.last) for s in pipe.stages] == [(0, 14), (15, 29)]
        assert len(gen.engine.recoveries) == 1 and live(pipe) == [([], 0), ([], 0)]


def test_stopped_stage_is_detected_and_resumes(real_model, cluster):
    pid = cluster.procs[0].pid

    def stop_then_continue():
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(3.0, os.kill, args=(pid, signal.SIGCONT)).start()

    with undisturbed(real_model, cluster, LENGTHS[:2], recovery_timeout_s=30) as (pipe, gen, ps, want):
        got, t_stop = disturbed_run(gen, ps, 6, stop_then_continue)
        assert got == want
        event = gen.engine.recoveries[0]
        assert event.ok and event.detected - t_stop < 2.0
        assert live(pipe) == [([], 0), ([], 0)]


def test_no_capacity_in_time_ends_each_request_with_a_clear_error(real_model, cluster):
    with generator(real_model, cluster, recovery_timeout_s=2) as gen:
        ps = prompts(gen, LENGTHS[:3])
        t0 = time.monotonic()
        got, _ = disturbed_run(gen, ps, 3, cluster.procs[1].kill)
        assert all(isinstance(r, StageFailure) and "no stage took its place within 2 s" in str(r) for r in got), got
        assert time.monotonic() - t0 < 30


def test_recovery_timeout_bounds_a_replacement_slow_to_load(real_model, cluster):
    """The standby answers hello at once but takes far longer than the timeout to load (it compiles
    its layers with torch.compile): the recovery gives up at the timeout, load included."""
    slow = f"tcp://127.0.0.1:{free_port()}"
    proc = start_stage("torch", real_model, listen=slow, extra=["--compile"])[0]
    try:
        with generator(real_model, cluster, recovery_timeout_s=4, standby=[slow]) as gen:
            got, t_kill = disturbed_run(gen, prompts(gen, LENGTHS[:2]), 3, cluster.procs[1].kill)
            ends = time.monotonic()
            (event,) = gen.engine.recoveries
            assert not event.ok and "no stage took its place within 4 s" in event.error
            assert all(isinstance(r, StageFailure) and "within 4 s" in str(r) for r in got), got
            # from the loss being seen to every request's error: the timeout, plus at most 2 s
            assert ends - event.detected < 4 + 2, f"{ends - event.detected:.1f} s"
            assert event.detected - t_kill < 2.0
    finally:
        proc.kill()  # busy compiling: it would answer SIGTERM only once done
        proc.wait()


def test_soak_concurrent_clients_cancellations_and_a_restart(real_model, cluster):
    gen = generator(real_model, cluster, recovery_timeout_s=60)
    pipe = gen.pipeline
    distinct = prompts(gen, [5, 9, 14, 3, 20, 7])
    want = [gen.generate(p, max_tokens=6, ignore_eos=True).token_ids for p in distinct]
    rng = random.Random(0)
    plan = [(rng.randrange(len(distinct)), rng.random() < 0.2) for _ in range(240)]
    results, lock = {}, threading.Lock()
    jobs = iter(range(len(plan)))

    def client():
        while True:
            with lock:
                j = next(jobs, None)
            if j is None:
                return
            p, cancel = plan[j]
            st = gen.stream(distinct[p], max_tokens=6, ignore_eos=True)
            toks = []
            for c in st:
                toks.append(c.token_id)
                if cancel and len(toks) == 2:
                    st.close()
                    break
            with lock:
                results[j] = toks

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    while len(results) < 80:
        time.sleep(0.05)
    cluster.procs[1].kill()
    cluster.restart(1)
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(results) == len(plan)  # none lost
    for j, (p, cancel) in enumerate(plan):
        assert results[j] == (want[p][:2] if cancel else want[p]), j
    assert gen.engine.recoveries and all(e.ok for e in gen.engine.recoveries)
    time.sleep(0.3)
    assert live(pipe) == [([], 0), ([], 0)]
    gen.close()


# -- bad input -------------------------------------------------------------------------------------

def rss_kib(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def malformed(rng: random.Random, hidden: int) -> list:
    """One message a well-behaved client never sends."""
    ok_seq = [[1, 0, 3, None]]
    tokens = np.arange(3, dtype=np.int32)
    kind = rng.randrange(17)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 64))]
    if kind == 1:
        return [msgpack.packb(rng.choice([[1, 2], "x", 5, None, {"v": 1}]))]
    if kind == 2:
        return [msgpack.packb({"v": 99, "kind": "ping", "arrays": []})]
    if kind == 3:
        return [msgpack.packb({"v": 1, "kind": rng.choice(["boom", 5, None, "result"]), "arrays": []})]
    if kind == 4:  # frames the header does not name, or names that are missing
        return [msgpack.packb({"v": 1, "kind": "forward", "arrays": [["int32", [3]]] * rng.randrange(0, 3)})] + \
            [tokens.tobytes()] * rng.randrange(0, 3)
    if kind == 5:  # shape against byte length
        return [msgpack.packb({"v": 1, "kind": "forward", "seqs": ok_seq, "arrays": [["int32", [1000]]]}),
                tokens.tobytes()]
    if kind == 6:
        return [msgpack.packb({"v": 1, "kind": "forward", "seqs": ok_seq,
                               "arrays": [[rng.choice(["float64", "object", "int8", 7]), [3]]]}), tokens.tobytes()]
    if kind == 7:  # truncated frames
        frames = pack_batch(StageBatch([SeqChunk(1, 0, tokens, SamplingParams())]), req=1)
        return [bytes(frames[0])[: rng.randrange(1, len(bytes(frames[0])))], bytes(frames[1])[:5]]
    if kind == 8:  # oversized header
        return [msgpack.packb({"v": 1, "kind": "ping", "pad": "x" * (P.MAX_HEADER_BYTES + 10)})]
    if kind == 9:  # wrong-typed seq entries
        seq = rng.choice([[-1, 0, 3, None], [1, -5, 3, None], [1, 0, 0, None], ["a", 0, 3, None], [1, 0, 3],
                          [2**64 - 1, 0, 3, None], [1, 0, 99, None], [1, 0, 3, {"temperature": "hot"}],
                          [1, 0, 3, {"bogus": 1}], [1, 0, 3, {"seed": -4}], [1, 0, 3, {"top_k": 1.5}]])
        return pack(P.FORWARD, [("int32", tokens)], seqs=[seq], req=2)
    if kind == 10:  # token ids outside the vocabulary
        return pack(P.FORWARD, [("int32", np.array([10**6, -3, 5], np.int32))], seqs=ok_seq, req=3)
    if kind == 11:  # a hidden frame to the first stage, of the wrong width
        return pack(P.FORWARD, [("int32", tokens), ("float32", np.zeros((3, hidden + 1), np.float32))],
                    seqs=ok_seq, req=4)
    if kind == 12:  # bad layer ranges
        return pack(P.LOAD, layers=rng.choice([[5, 2], [0, 99], [-1, 0], "0-1", [0], [0.5, 1]]), req=5)
    if kind == 13:
        return pack(P.RELEASE, seq_ids=rng.choice(["x", [1.5], None, [[1]]]), req=6)
    if kind == 15:  # a draft model's turn, badly asked: no tokens, k out of range, a start past the cache,
        # ids outside the vocabulary, the wrong dtype or no frame
        fields, arrays = dict(seq_id=9, start=0, k=4), [("int32", tokens)]
        bad = rng.randrange(6)
        if bad == 0:
            arrays = [("int32", np.zeros(0, np.int32))]
        elif bad == 1:
            fields["k"] = rng.choice([0, -1, 65, 1.5, "x"])
        elif bad == 2:
            fields["start"] = rng.choice([10**6, -2, None])
        elif bad == 3:
            arrays = [("int32", np.array([10**6, -3], np.int32))]
        elif bad == 4:
            arrays = [("float32", tokens.astype(np.float32))]
        else:
            arrays = []
        return pack(P.DRAFT, arrays, **fields, req=9)
    if kind == 14:  # offsets that do not match the cache
        return pack(P.FORWARD, [("int32", tokens)], seqs=[[7, rng.randrange(1, 2**31), 3, None]], req=7)
    return pack(P.FORWARD, [("int32", tokens)], seqs=ok_seq, route=rng.choice([[5], "x", ["file:///etc"]]), req=8)


def test_fuzz_ten_thousand_malformed_messages(tiny_dirs):
    proc, address = start_stage("torch", tiny_dirs["llama"], extra=["--layers", "0-3"])
    try:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        good = Client(10)
        rng = random.Random(1)
        rss = []
        for round_ in range(20):
            for _ in range(500):
                sock.send_multipart(malformed(rng, 64))
            while sock.poll(200):  # error replies: drained, not counted (a message may earn none)
                sock.recv_multipart()
            # after every 500, a correct request still works
            header = good.call(address, P.PING)
            assert header["info"]["layers"] == [0, 3]
            batch = StageBatch([SeqChunk(10**6 + round_, 0, np.arange(1, 6, dtype=np.int32), SamplingParams())])
            req = good.next_req()
            good.send(address, pack_batch(batch, req=req, client=good.id, route=[]))
            reply, _ = good.wait(address, req)
            assert reply["kind"] == P.RESULT and len(reply["tokens"]) == 1
            good.call(address, P.RELEASE, seq_ids=[10**6 + round_])
            rss.append(rss_kib(proc.pid))
        assert proc.poll() is None
        assert good.call(address, P.PING)["info"]["live_sequences"] == []
        assert rss[-1] - rss[3] < 30 * 1024, rss  # bounded: no growth with the number of bad messages
        good.close()
        sock.close(0)
    finally:
        stop_stages([proc])


def test_engine_api_rejects_bad_inputs_cleanly(tiny_dirs, real_model):
    from engine.api import local_pipeline

    gen = Generator(real_model, local_pipeline(str(real_model), "torch"))
    for bad in ([1, "x"], [[1]], 5, None, [1.5]):
        with pytest.raises(UserError):
            gen.stream(bad, max_tokens=2)
    with pytest.raises(UserError):
        gen.stream([1], max_tokens="3")
    with pytest.raises(UserError):
        gen.stream([1], max_tokens=2, sampling={"temperature": 1})
    assert gen.generate([1, 2, 3], max_tokens=2).token_ids  # and it still serves
    gen.close()


# -- CURVE -----------------------------------------------------------------------------------------

def test_curve_only_allowed_keys_get_in(real_model, tmp_path):
    keys, other = init_keys(tmp_path / "keys"), init_keys(tmp_path / "other")
    proc, address = start_stage("torch", real_model, extra=["--auth", str(keys), "--layers", "0-29"])
    try:
        cli = [sys.executable, "-m", "engine.app.cli", "health", "--stages", address, "--timeout", "3", "--json"]
        ok = subprocess.run(cli + ["--auth", str(keys)], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)[0]["state"] == "ok"
        # a client with no keys at all, and one whose key is not on the allow-list
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        for f in ("coordinator.key", "coordinator.key_secret"):
            (wrong / f).write_bytes((other / f).read_bytes())
        (wrong / "stage.key").write_bytes((keys / "stage.key").read_bytes())
        for extra, why in (([], "handshake failed"), (["--auth", str(wrong)], "did not accept our key")):
            t = time.monotonic()
            r = subprocess.run(cli + extra, capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and "down" in r.stdout and time.monotonic() - t < 20
            assert why in json.loads(r.stdout)[0]["error"], r.stdout
        # generation works over the authenticated link
        pipe = connect_pipeline(str(real_model), f"{address}=0-29", auth_dir=keys)
        gen = Generator(real_model, pipe)
        assert len(gen.generate([1, 2, 3], max_tokens=3, ignore_eos=True).token_ids) == 3
        gen.close()
        pipe.close()
    finally:
        stop_stages([proc])


def test_non_loopback_listen_needs_auth_or_insecure(real_model):
    cmd = [sys.executable, "-m", "engine.app.cli", "stage", "--backend", "torch", "--model", str(real_model),
           "--listen", "tcp://0.0.0.0:0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "without authentication" in r.stderr and "Traceback" not in r.stderr
    proc, address = start_stage("torch", real_model, listen="tcp://0.0.0.0:0", extra=["--insecure"])
    stop_stages([proc])
    assert address.startswith("tcp://0.0.0.0:")


# -- limits, drain, health -------------------------------------------------------------------------

def forward(client, address, seq_id, offset, n):
    batch = StageBatch([SeqChunk(seq_id, offset, np.arange(1, n + 1, dtype=np.int32), SamplingParams())])
    req = client.next_req()
    client.send(address, pack_batch(batch, req=req, client=client.id, route=[]))
    return client.wait(address, req)[0]


def test_limits_and_sigterm_drain(real_model):
    proc, address = start_stage("torch", real_model,
                                extra=["--layers", "0-29", "--max-seqs", "2", "--max-call-tokens", "16",
                                       "--kv-tokens", "30"])
    try:
        c = Client(10)
        forward(c, address, 1, 0, 10)
        forward(c, address, 2, 0, 10)
        with pytest.raises(CapacityError, match="limit of 2"):
            forward(c, address, 3, 0, 2)
        with pytest.raises(CapacityError, match="at most 16"):
            forward(c, address, 1, 10, 17)
        with pytest.raises(CapacityError, match="KV cache full"):
            forward(c, address, 1, 10, 16)
        c.call(address, P.RELEASE, seq_ids=[2])
        proc.send_signal(signal.SIGTERM)  # drain: sequence 1 is live
        time.sleep(0.5)
        with pytest.raises(CapacityError, match="shutting down"):
            forward(c, address, 4, 0, 2)
        assert forward(c, address, 1, 10, 1)["kind"] == P.RESULT  # the live one is still served
        assert proc.poll() is None
        c.call(address, P.RELEASE, seq_ids=[1])
        assert proc.wait(timeout=10) == 0  # drained, exited cleanly
        c.close()
    finally:
        stop_stages([proc])


def test_health_reports_every_stage(real_model):
    procs = [start_stage("torch", real_model, extra=["--layers", r]) for r in ("0-14", "15-29")]
    try:
        addrs = [a for _, a in procs] + [f"tcp://127.0.0.1:{free_port()}"]
        r = subprocess.run([sys.executable, "-m", "engine.app.cli", "health", "--stages", ",".join(addrs), "--timeout",
                            "2", "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1  # one is down
        report = json.loads(r.stdout)
        assert [x["state"] for x in report] == ["ok", "ok", "down"]
        assert [x["layers"] for x in report[:2]] == [[0, 14], [15, 29]]
        assert all(x["forward_ms"] > 0 and x["live_sequences"] == 0 and x["kv_tokens"] > 0 for x in report[:2])
        assert "did not answer" in report[2]["error"]
    finally:
        stop_stages([p for p, _ in procs])


def test_a_daemon_connects_only_where_it_was_told(tiny_dirs):
    """A route naming an address the coordinator did not assign with the layers (nor --peers lists)
    is refused with an error, and no connection is opened to it (a listening socket sees none)."""
    traps = []
    for _ in range(3):
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        t.listen()
        t.settimeout(3)
        traps.append((t, f"tcp://127.0.0.1:{t.getsockname()[1]}"))
    (stray, stray_at), (assigned, assigned_at), (peer, peer_at) = traps
    proc, address = start_stage("torch", tiny_dirs["llama"], extra=["--layers", "0-1", "--peers", peer_at])
    client = Client(10)
    try:
        def forward(route):
            req = client.next_req()
            batch = StageBatch([SeqChunk(7, 0, np.arange(1, 4, dtype=np.int32), None)])
            client.send(address, pack_batch(batch, req=req, client=client.id, route=route))
            return client.wait(address, req)

        client.call(address, P.LOAD, layers=[0, 1], next_hop=assigned_at)
        with pytest.raises(UserError, match="does not connect"):
            forward([stray_at])
        with pytest.raises(socket.timeout):
            stray.accept()  # not even a TCP connection was attempted
        for trap, at in ((assigned, assigned_at), (peer, peer_at)):  # allowed: the daemon connects
            with pytest.raises(StageError, match="cannot reach"):  # (a trap speaks no ZeroMQ)
                forward([at])
            trap.accept()[0].close()
        client.call(address, P.LOAD, layers=[0, 1], next_hop=None)  # now the last hop it knows is gone
        with pytest.raises(UserError, match="does not connect"):
            forward([assigned_at])
    finally:
        client.close()
        stop_stages([proc])
        for t, _ in traps:
            t.close()
