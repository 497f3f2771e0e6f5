"""The serving engine: one thread that runs the scheduler's micro-batches through a pipeline.

Callers on any thread `submit` a request and read its `GenerationChunk`s from the delivery
function they passed (a queue for `stream`, an asyncio loop for `astream`); `cancel` takes it
out wherever it is. The engine thread alone touches the scheduler and the pipeline: each turn it
takes in new requests and cancellations, starts micro-batches while fewer than K are in flight,
and turns the tokens that come back into chunks (detokenized, stop strings applied). Finished
and cancelled sequences are released on every stage as soon as no batch of theirs is in flight.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import StageFailure, UserError
from .output import GenerationChunk, Profile, StopMatcher, Timing
from .pipeline import BatchTiming
from .sampling import SamplingParams
from .scheduler import Scheduler, Sequence as Seq, Slice
from .stage import SampledToken, SeqChunk, StageBatch
from .tokenizer import IncrementalDetokenizer, Tokenizer

RESULT_WAIT_S = 0.05  # the longest wait for results (heartbeats are checked between waits)
IDLE_EXIT_S = 10.0  # an engine thread with nothing to do this long ends (a new one starts on demand)


@dataclass(eq=False)
class Request:
    """What the engine keeps per request besides the scheduler's `Sequence`."""

    seq_id: int
    deliver: Callable[[GenerationChunk | BaseException], None]
    detok: IncrementalDetokenizer
    stops: StopMatcher
    timing: Timing
    ignore_eos: bool = False
    profile: Profile = field(default_factory=Profile)


class Engine:
    def __init__(self, pipeline, tokenizer: Tokenizer, *, eos_ids: set[int], context: int, vocab_size: int,
                 inflight: int | None = None, max_seqs: int = 256, max_queue: int = 1024,
                 max_batch_tokens: int = 512, prefill_with_decode: int = 128, log=None):
        limit = getattr(pipeline, "max_inflight", 1)
        if inflight is not None and inflight < 1:
            raise UserError("--inflight must be at least 1")
        # default: one micro-batch per stage, so each stage has its own to work on
        self.inflight = min(inflight or len(pipeline.stages), limit)
        # True where `submit` returns before the stages finish (remote stages): see `_run`
        self.overlaps = getattr(pipeline, "overlaps", False)
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context = context
        self.vocab_size = vocab_size
        self.scheduler = Scheduler(pipeline.kv_tokens(), micro_batches=self.inflight, max_seqs=max_seqs,
                                   max_queue=max_queue, max_batch_tokens=max_batch_tokens,
                                   prefill_with_decode=prefill_with_decode)
        self._ids = itertools.count(secrets.randbits(40) << 20)  # unique on daemons other coordinators share
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: list[tuple[Request, GenerationChunk]] = []  # made this turn, delivered after the launch
        # new work ends the engine's wait for results at once: a pipeline that waits on sockets
        # (remote) also watches one end of a pipe; an in-process one never waits
        self._wake_r = self._wake_w = None
        if hasattr(pipeline, "wake_on"):
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            pipeline.wake_on(self._wake_r)
        self._flying: dict[int, list[Slice]] = {}
        self._batches = itertools.count()
        self._seqs: dict[int, Seq] = {}
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()  # set when the current engine thread has finished its work
        self._lock = threading.Lock()
        self._closed = False
        self.error: BaseException | None = None  # what stopped the engine thread, if anything
        self.profile = Profile()  # every batch run, for benchmarks
        self.recoverable = hasattr(pipeline, "recover")
        self.recoveries: list[dict] = []  # one entry per lost stage event: when, which, how it ended
        self.log = log or (lambda m: print(f"hetpipe: {m}", file=sys.stderr, flush=True))
        _ENGINES.add(self)

    # -- any thread ----------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], *, max_tokens: int = 128, sampling: SamplingParams | None = None,
               stop: Sequence[str] = (), ignore_eos: bool = False,
               deliver: Callable[[GenerationChunk | BaseException], None]) -> Request:
        """Queue a request. Bad input raises `UserError` here, at once; later failures are delivered."""
        ids = self._check(prompt_ids, max_tokens, sampling)
        req = Request(next(self._ids), deliver, IncrementalDetokenizer(self.tokenizer), StopMatcher(stop),
                      Timing(time.perf_counter()), ignore_eos)
        seq = Seq(req.seq_id, ids, max_tokens, sampling or SamplingParams(),
                  min(len(ids) + max_tokens, self.context), owner=req)
        self.scheduler.check(seq)
        with self._lock:
            if self._closed:
                raise UserError("the engine is closed")
            if self.error is not None:
                raise StageFailure(f"the serving engine stopped: {self.error!r}")
            self._put(("add", seq))
            if self._thread is None:
                _close_all_at_exit()
                self._stopped = threading.Event()
                self._thread = threading.Thread(target=self._thread_main, args=(self._stopped,),
                                                name="hetpipe-engine", daemon=True)
                self._thread.start()
        return req

    def cancel(self, seq_id: int) -> None:
        """Stop a request and free its KV caches on every stage (as soon as no batch of it is in flight)."""
        self._put(("cancel", seq_id))

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the batches in flight, end every other request with an error, stop the thread."""
        with self._lock:
            self._closed = True
            thread, stopped = self._thread, self._stopped
        if thread is not None:
            self._put(("close", None))
            if _EXITING:
                stopped.wait(timeout_s)  # the thread parks instead of ending (`_thread_main`)
            else:
                thread.join(timeout_s)
        if self._wake_r is not None and not (thread and thread.is_alive()):
            self.pipeline.unwake(self._wake_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None

    def _put(self, item) -> None:
        self._inbox.put(item)
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"w")
            except OSError:  # BlockingIOError: the pipe is full of wake-ups already
                pass

    def _check(self, prompt_ids, max_tokens: int, sampling) -> list[int]:
        try:
            ids = [int(i) for i in prompt_ids if isinstance(i, (int, np.integer)) and not isinstance(i, bool)]
        except TypeError:
            ids = None
        if ids is None or len(ids) != len(prompt_ids):
            raise UserError("prompt token ids must be integers")
        if not ids:
            raise UserError("empty prompt")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise UserError("max tokens must be an integer of at least 1")
        if len(ids) >= self.context:
            raise UserError(f"prompt is {len(ids)} tokens; the model's context is {self.context}")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise UserError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise UserError("sampling must be a SamplingParams")
        return ids

    # -- the engine thread ---------------------------------------------------------------------

    def _thread_main(self, stopped: threading.Event) -> None:
        try:
            self._run()
        finally:
            stopped.set()
            if _EXITING:
                # Closed because the interpreter is exiting: never end. A thread that ends now runs
                # its C++ thread-local destructors while Python finalizes, and MLX's per-thread
                # compile cache takes the GIL in its destructor, which aborts the process ("terminate
                # called without an active exception"; 4 runs of 5 under tcmalloc). Parked here, the
                # thread holds no GIL and is simply gone when the process exits.
                threading.Event().wait()

    def _run(self) -> None:
        closing = False
        try:
            while True:
                if not self._flying and not closing and self._nothing_ready():
                    # idle: wait for work; after IDLE_EXIT_S of none, end the thread (`submit` starts
                    # another), so an unused engine holds no thread and can be collected with its pipeline
                    try:
                        item = self._inbox.get(timeout=IDLE_EXIT_S)
                    except queue.Empty:
                        with self._lock:
                            if self._inbox.empty():
                                self._thread = None
                                return
                        continue
                    closing |= self._handle(item)
                closing |= self._drain_inbox()
                if closing:
                    self._drop_unstarted(UserError("the engine was closed"))
                    if not self._flying:
                        return
                else:
                    self._launch()
                if self._flying:
                    done = self.pipeline.poll(RESULT_WAIT_S)
                    for tag, out, timing in done:
                        self._completed(tag, out, timing)
                    if done and self.overlaps and not closing:
                        # the next step leaves before the callers hear of this one: their work and
                        # the heartbeat check below then overlap the stages' compute, not add to it
                        self._launch()
                    self._deliver()
                    lost = self.pipeline.lost() if self.recoverable else []
                    if lost:
                        self._recover(lost)
        except BaseException as e:  # a bug, or the pipeline itself gone: no request may hang on it
            self.error = e
            self._deliver()  # tokens already made reach their callers before the error does
            err = e if isinstance(e, (UserError, StageFailure)) else StageFailure(f"engine stopped: {e!r}")
            for seq in list(self._seqs.values()):
                self._end(seq, err)
            raise

    def _nothing_ready(self) -> bool:
        self.scheduler.admit()
        return not any(not s.in_flight and s.pending > 0 for s in self.scheduler.running)

    def _drain_inbox(self) -> bool:
        if self._wake_r is not None:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except OSError:  # BlockingIOError: drained
                pass
        closing = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return closing
            closing |= self._handle(item)

    def _handle(self, item) -> bool:
        """Take in a new request or a cancellation; True if asked to close."""
        kind, arg = item
        if kind == "add":
            self._add(arg)
        elif kind == "cancel":
            self._cancel(arg)
        return kind == "close"

    def _add(self, seq: Seq) -> None:
        try:
            self.scheduler.add(seq)
        except UserError as e:
            seq.owner.deliver(e)
            return
        self._seqs[seq.seq_id] = seq

    def _cancel(self, seq_id: int) -> None:
        seq = self._seqs.get(seq_id)
        if seq is None:
            return  # finished already
        seq.cancelled = True
        if not seq.in_flight:
            self._end(seq)

    def _drop_unstarted(self, err: BaseException) -> None:
        for seq in list(self._seqs.values()):
            if not seq.in_flight:
                self._end(seq, err)

    def _launch(self) -> None:
        while len(self._flying) < self.inflight:
            slices = self.scheduler.next_batch()
            if not slices:
                return
            batch = StageBatch([SeqChunk(sl.seq.seq_id, sl.start, np.asarray(sl.seq.tokens(sl.start, sl.n), np.int32),
                                         sl.seq.sampling if sl.sample else None) for sl in slices])
            tag = next(self._batches)
            self._flying[tag] = slices
            self.pipeline.submit(tag, batch)

    def _completed(self, tag: int, out: list[SampledToken] | Exception, timing: BatchTiming | None = None) -> None:
        slices = self._flying.get(tag)
        if slices is None:
            return  # a batch given up on in a recovery
        del self._flying[tag]
        if isinstance(out, Exception):
            if self.recoverable and isinstance(out, StageFailure):
                lost = self.pipeline.unhealthy()  # a restarted or unreachable stage: rebuild, lose nothing
                if lost:
                    self._recover(lost)
                    return
            err = out if isinstance(out, (UserError, StageFailure)) else StageFailure(str(out))
            for sl in slices:
                self._end(sl.seq, err)
            return
        self.scheduler.completed(slices)
        self.profile.add(timing)
        for sl in slices:
            sl.seq.owner.profile.add(timing)
        tokens = {t.seq_id: t for t in out}
        now = time.perf_counter()
        for sl in slices:
            seq = sl.seq
            if seq.cancelled:
                self._end(seq)
            elif sl.sample:
                chunk = self._chunk(seq, tokens[seq.seq_id], now)
                if chunk.finish_reason:
                    self._end(seq)  # caches freed before the caller hears it is done
                self._outbox.append((seq.owner, chunk))

    def _deliver(self) -> None:
        out, self._outbox = self._outbox, []
        for req, chunk in out:
            req.deliver(chunk)

    def _recover(self, lost: list[int]) -> None:
        """A stage is gone: give up on every batch in flight, get the stage replaced, and rebuild
        every live sequence's caches from its token ids (prompt + generated) on the next steps.

        Greedy outputs continue exactly; streams see no token twice, none missing. If no stage
        comes back within the pipeline's recovery timeout, every request ends with that error.
        """
        t = time.monotonic()
        names = [self.pipeline.stages[i].address for i in lost]
        self._flying.clear()
        live = list(self._seqs.values())
        for seq in live:
            seq.in_flight = False
            seq.cached = 0
        try:
            self.pipeline.recover(lost, [s.seq_id for s in live], log=self.log)
        except StageFailure as e:
            self.recoveries.append({"lost": names, "detected": t, "ok": False, "error": str(e)})
            try:
                self.pipeline.release([s.seq_id for s in live])  # what the surviving stages still hold
            except Exception:
                pass
            for seq in live:
                self._end(seq, e)
            return
        self.recoveries.append({"lost": names, "detected": t, "ok": True, "seconds": time.monotonic() - t,
                                "rebuilt": len(live)})

    def _chunk(self, seq: Seq, tok: SampledToken, now: float) -> GenerationChunk:
        """The chunk one sampled token makes for its request (`finish_reason` set if it ends it)."""
        req: Request = seq.owner
        seq.generated.append(tok.token_id)
        req.timing.token(now)
        n = len(seq.generated)
        finish = None
        if tok.token_id in self.eos_ids and not req.ignore_eos:
            finish = "stop"
        elif n >= seq.max_tokens or seq.length >= self.context:
            finish = "length"
        piece = "" if finish == "stop" else req.detok.add(tok.token_id)
        if finish:
            piece += req.detok.flush()
        text, hit = req.stops.feed(piece, final=finish is not None)
        if hit:
            finish = "stop"
        return GenerationChunk(tok.token_id, text, tok.logprob, tok.top, finish)

    def _end(self, seq: Seq, err: BaseException | None = None) -> None:
        """Take a sequence out of everything; tell its request why, if it did not end normally."""
        started = seq.cached > 0 or seq.in_flight
        self.scheduler.finish(seq)
        self._seqs.pop(seq.seq_id, None)
        if err is not None and not seq.cancelled:
            seq.owner.deliver(err)
        if started:
            try:
                self.pipeline.release([seq.seq_id])
            except Exception:
                pass  # a stage that cannot be told drops the sequence with its connection


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _close_all() -> None:
    """An engine thread still running while torch or MLX tear down at exit aborts the process."""
    global _EXITING
    _EXITING = True
    for engine in list(_ENGINES):
        engine.close(timeout_s=5.0)


def _close_all_at_exit() -> None:
    """Run `_close_all` before the frameworks' own exit handlers: threading's exit hooks run before
    any atexit handler (atexit's run last-registered first, and torch or MLX register theirs after
    this module is imported)."""
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    try:
        threading._register_atexit(_close_all)  # what concurrent.futures uses for its workers
    except (AttributeError, RuntimeError):
        atexit.register(_close_all)


_HOOKED = False
_EXITING = False  # set when the interpreter starts exiting: engine threads then park (`_thread_main`)
