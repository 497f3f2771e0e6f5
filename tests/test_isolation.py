"""One request cannot stop the engine: what fails while one request's data is packed, sent, sampled
or constrained ends that request alone, and the engine serves on. Real stages: a torch daemon on
loopback, the in-process pipeline, a tiny torch stage."""

import threading
import time

import numpy as np
import pytest

from engine.api import Generator, connect_pipeline, local_pipeline
from engine.app.procs import start_stage, stop_stages
from engine.compose.stages import load_stage
from engine.core.errors import BatchTooLarge, GrammarFailed, RequestFailed, UserError
from engine.core.sampling import SamplingParams
from engine.core.stage import SeqChunk, StageBatch
from engine.serving.local_pipeline import LocalPipeline
from engine.serving.structured import Constraint
from transport import protocol as P
from transport.client import Client
from transport.wire import pack

BIAS = tuple((i, 0.25) for i in range(2000, 3024))  # 1,024 entries, as many as a request may carry


@pytest.fixture(scope="module")
def daemon(real_model):
    proc, address = start_stage("torch", real_model, extra=["--layers", "0-29"])
    yield address
    stop_stages([proc])


def remote(real_model, address, **opts):
    return Generator(real_model, connect_pipeline(str(real_model), address, log=lambda m: None), **opts)


def test_a_request_the_wire_cannot_carry_fails_alone(real_model, daemon):
    with remote(real_model, daemon) as gen:
        ids = gen.prompt_ids("Name three rivers.", chat=True)
        want = gen.generate(ids, max_tokens=6).token_ids
        bad = SamplingParams()
        bad.top_k = 2**64  # past every check (a bug's doing): msgpack cannot pack it
        streams = [gen.stream(ids, max_tokens=6), gen.stream(ids, max_tokens=6, sampling=bad),
                   gen.stream(ids, max_tokens=6)]
        with pytest.raises(RequestFailed, match="could not be sent"):
            list(streams[1])
        assert [[c.token_id for c in s] for s in (streams[0], streams[2])] == [want, want]
        assert gen.engine.error is None
        assert gen.generate(ids, max_tokens=6).token_ids == want  # and it serves on


def test_a_batch_over_the_header_limit_is_sent_in_parts(real_model, daemon):
    """120 new sequences with 1,024-entry logit biases: their first batch's header is past the
    stage's limit, so it goes in parts; later steps send each sequence's params as a reference."""
    with remote(real_model, daemon) as gen:
        pipe, refused, sizes = gen.pipeline, [], []
        submit = pipe.submit

        def counting(tag, batch):
            try:
                submit(tag, batch)
            except BatchTooLarge:
                refused.append(len(batch.seqs))
                raise
            sizes.append(len(batch.seqs))

        pipe.submit = counting
        ids = gen.prompt_ids("Say hi.", chat=True)
        p = SamplingParams(logit_bias=BIAS)
        want = gen.generate(ids, max_tokens=3, sampling=p, ignore_eos=True).token_ids
        refused.clear()
        streams = [gen.stream(ids, max_tokens=3, sampling=p, ignore_eos=True) for _ in range(120)]
        assert all([c.token_id for c in s] == want for s in streams)
        assert refused and max(sizes) >= 100  # split once, then whole batches again
        assert gen.engine.error is None


def test_a_stage_names_the_request_it_refuses(daemon):
    """A header past the stage's limit is refused with an error naming its request at once: the
    coordinator never waits out its timeout for an answer that already came."""
    client = Client(timeout_s=30)
    try:
        req = client.next_req()
        client.send(daemon, pack(P.FORWARD, req=req, client=client.id, seqs=[[1] * 10] * 120_000))
        t = time.monotonic()
        with pytest.raises(UserError, match="too large"):
            client.wait(daemon, req)
        assert time.monotonic() - t < 5
    finally:
        client.close()



def test_a_stage_error_crosses_the_wire_as_its_own_type(daemon):
    """An ERROR frame names its kind and the coordinator raises the same type the stage raised in
    process: bad input, capacity, a prefix-cache miss (no code matches on the message's text)."""
    from engine.core.errors import CacheMiss, CapacityError
    from engine.core.stage import MAX_DRAFT
    from transport.wire import pack_batch

    client = Client(timeout_s=30)

    def forward(chunk):
        req = client.next_req()
        client.send(daemon, pack_batch(StageBatch([chunk]), req=req, client=client.id, route=[]))
        return client.wait(daemon, req)

    try:
        with pytest.raises(UserError, match="token ids must be in"):
            forward(SeqChunk(1, 0, np.array([1, 10**6], np.int32), SamplingParams()))
        with pytest.raises(CacheMiss, match="prefix cache miss"):
            forward(SeqChunk(2, 16, np.array([1], np.int32), SamplingParams(), prefix=(12345,)))
        with pytest.raises(CapacityError, match="in one call|KV cache full"):
            forward(SeqChunk(3, 0, np.ones(100_000, np.int32), SamplingParams()))
        req = client.next_req()
        client.send(daemon, pack(P.DRAFT, [("int32", np.ones(2, np.int32))], req=req, seq_id=4, start=0,
                                 k=MAX_DRAFT + 1))
        with pytest.raises(UserError, match="to draft"):
            client.wait(daemon, req)
    finally:
        client.close()

class BreaksAtStep(Constraint):
    """A real grammar state whose real llguidance matcher is driven into its error state at a given
    step (by a token it does not allow), as a budget running out mid-generation leaves it."""

    def __init__(self, real: Constraint, step: int):
        super().__init__(real.matcher, 0)
        self.words, self.step = real.words, step

    def mask(self):
        self.step -= 1
        if self.step == 0:
            bits = np.unpackbits(super().mask().view(np.uint8), bitorder="little")
            self.matcher.consume_token(int(np.flatnonzero(bits == 0)[0]))
        return super().mask()


def test_a_grammar_failing_mid_generation_ends_its_request_alone(real_model):
    with Generator(real_model, local_pipeline(real_model, "torch")) as gen:
        ids = gen.prompt_ids("Describe a cat in JSON.", chat=True)
        plain = gen.generate(ids, max_tokens=8).token_ids
        breaking = gen.stream(ids, max_tokens=40, constraint=BreaksAtStep(gen.constraint(True), 3))
        other = gen.stream(ids, max_tokens=8)
        got = []
        with pytest.raises(GrammarFailed, match="ran out of budget"):
            for c in breaking:
                got.append(c)
        assert len(got) == 2  # two tokens, then the error of its own (a 400 in the server, never a 503)
        assert [c.token_id for c in other] == plain
        assert gen.engine.error is None and gen.generate(ids, max_tokens=8).token_ids == plain


def test_a_sequence_whose_sampling_fails_fails_alone(tiny_dirs):
    stage = load_stage("torch", tiny_dirs["llama"], 0, 3)
    try:
        nothing = np.zeros((stage.cfg.vocab_size + 31) // 32, np.int32)  # a mask allowing no token
        batch = StageBatch([SeqChunk(1, 0, np.array([3, 4, 5], np.int32), SamplingParams()),
                            SeqChunk(2, 0, np.array([3, 4, 5], np.int32), SamplingParams(), allowed=nothing)])
        ok, failed = stage.forward(batch).tokens
        assert ok.error is None and 0 <= ok.token_id < stage.cfg.vocab_size
        assert failed.token_id == -1 and "allows no token" in failed.error
    finally:
        stage.close()


class DiesOnce(LocalPipeline):
    """The in-process pipeline, whose `poll` raises once: the engine thread meeting a bug."""

    def poll(self, timeout_s):
        if getattr(self, "_died", False):
            return super().poll(timeout_s)
        self._died = True
        raise RuntimeError("a bug in the pipeline")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread dies
def test_an_engine_that_dies_says_so_at_once(tiny_dirs):
    d = tiny_dirs["llama"]
    pipe = DiesOnce([lambda: load_stage("torch", d, 0, 3)])
    with Generator(d, pipe) as gen:
        died = threading.Event()
        gen.engine.on_fatal = lambda e: died.set()
        stream = gen.stream([1, 2, 3], max_tokens=4)
        with pytest.raises(Exception, match="a bug in the pipeline"):
            list(stream)
        assert died.wait(5) and isinstance(gen.engine.error, RuntimeError)
        with pytest.raises(Exception, match="engine stopped"):
            gen.stream([1, 2, 3], max_tokens=4)


def test_batch_outcome_errors_per_token_reach_the_request(real_model, daemon):
    """A result whose token entry carries an error ends that request with it (RequestFailed)."""
    with remote(real_model, daemon) as gen:
        poll = gen.pipeline.poll
        ids = gen.prompt_ids("Hello", chat=True)

        def failing(timeout_s):  # the stage's own error entry for the first sequence, as the wire carries it
            out = poll(timeout_s)
            for o in out:
                if o.tokens and not failing.done:
                    failing.done = True
                    o.tokens[0].token_id, o.tokens[0].error = -1, "ValueError: the stage could not sample it"
            return out

        failing.done = False
        gen.pipeline.poll = failing
        with pytest.raises(RequestFailed, match="could not sample"):
            gen.generate(ids, max_tokens=4)
        assert gen.generate(ids, max_tokens=4).token_ids
