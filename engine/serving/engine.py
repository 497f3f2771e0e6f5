"""The serving engine: one thread that drives a `Pipeline`, a step at a time.

Callers on any thread `submit` a request and read its `GenerationChunk`s from the delivery
function they passed (a queue for `stream`, an asyncio loop for `astream`); `cancel` takes it
out wherever it is. The engine thread alone touches the scheduler and the pipeline. Each step:

    take requests -> schedule -> run (submit, poll) -> postprocess -> deliver

Postprocessing turns returned tokens into chunks (detokenized, stop strings applied) and takes
finished sequences out, releasing them on every stage before their last chunk is delivered; the
next micro-batches are submitted before the chunks are delivered, so the callers' work overlaps
the stages' compute. A lost stage starts a recovery (`recovery.py`).

One request cannot stop the engine: whatever fails while its data is packed, sent or sampled ends
that request alone (a batch that cannot be sent is split until the part that fails is one
request). Only a stage lost beyond recovery stops serving: requests are then refused at once, the
engine tries every RETRY_LOST_S to put a stage in its place, and serving resumes by itself.
"""

from __future__ import annotations

import itertools
import queue
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.errors import CacheMiss, GrammarFailed, QueueFull, RequestFailed, StageFailure, UserError
from ..core.kv_blocks import BLOCK
from ..core.pipeline import BatchOutcome, Pipeline
from ..core.sampling import MAX_LOGPROBS, MAX_STOP_IDS, SamplingParams
from ..core.stage import PromptLogprobs, SampledToken, SeqChunk, StageBatch
from .output import GenerationChunk, Profile, Timing
from .prefix_cache import PrefixCache
from .recovery import RecoveryEvent, recover
from .request import Request
from .scheduler import Scheduler, Seq, Slice
from .speculative import Drafter, SpeculativeConfig
from .structured import Constraint
from .text import IncrementalDetokenizer, StopMatcher, Tokenizer

RESULT_WAIT_S = 0.05  # the longest wait for results while batches are in flight (lost stages are checked between)
RETRY_LOST_S = 1.0  # how often a stage lost beyond recovery is tried again


@dataclass(slots=True)
class EngineConfig:
    """How the engine schedules: micro-batches in flight, limits, and how long a recovery may take."""

    inflight: int | None = None  # micro-batches in flight (None: one per stage, within the pipeline's limit)
    max_seqs: int = 256  # sequences running at once
    max_queue: int = 1024  # requests waiting beyond those; more are refused
    max_batch_tokens: int = 512  # tokens in one micro-batch: the prefill chunk size
    prefill_with_decode: int = 128  # prefill tokens riding along with decode steps
    recovery_timeout_s: float = 30.0  # for a lost stage to be replaced, its load included
    prefix_cache: bool = True  # reuse the KV blocks of prompts' shared prefixes (`prefix_cache.py`)
    speculative: SpeculativeConfig | None = None  # drafts verified several tokens a pass (`speculative.py`)

    def __post_init__(self):
        if self.inflight is not None and self.inflight < 1:
            raise UserError("micro-batches in flight must be at least 1")
        for name in ("max_seqs", "max_queue", "max_batch_tokens", "prefill_with_decode"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1")
        if self.recovery_timeout_s < 0:
            raise UserError("the recovery timeout must be >= 0 seconds")


class Engine:
    def __init__(self, pipeline: Pipeline, tokenizer: Tokenizer, *, eos_ids: set[int], context: int,
                 vocab_size: int, position_limit: tuple[int, str] | None = None, config: EngineConfig | None = None, log=None):
        self.config = config or EngineConfig()
        # default: one micro-batch per stage, so each stage has its own to work on
        self.inflight = min(self.config.inflight or len(pipeline.stages), pipeline.max_inflight)
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context = context
        self.vocab_size = vocab_size
        # (positions, why): requests reaching past them are refused, never run wrong
        self.position_limit = position_limit
        c = self.config
        self.prefix = PrefixCache(pipeline.kv_tokens()) if c.prefix_cache else None
        self.scheduler = Scheduler(pipeline.kv_tokens(), micro_batches=self.inflight, max_seqs=c.max_seqs,
                                   max_queue=c.max_queue, max_batch_tokens=c.max_batch_tokens,
                                   prefill_with_decode=c.prefill_with_decode,
                                   on_admit=self._admitted if self.prefix else None)
        self._ids = itertools.count(secrets.randbits(40) << 20)  # unique on daemons other coordinators share
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._flying: dict[int, list[Slice]] = {}  # batch tag -> its slices
        self._tags = itertools.count()
        self._seqs: dict[int, Seq] = {}
        self._outbox: list[tuple[Request, GenerationChunk | BaseException]] = []  # for `_deliver`, in order
        self._closing = False
        self._lock = threading.Lock()
        self.error: BaseException | None = None  # what stopped the engine thread, if anything
        self.on_fatal: Callable[[BaseException], None] | None = None  # told if the engine thread dies (a bug)
        self.lost_stages: list[int] = []  # lost beyond recovery: requests refused until a stage takes each place
        self.lost_error = ""
        self._retry_at = 0.0
        self.profile = Profile()  # every batch run, for benchmarks
        self.drafted = self.accepted = 0  # speculative decoding's draft tokens, all requests together
        self.recoveries: list[RecoveryEvent] = []
        self.log = log or (lambda m: print(f"hetpipe: {m}", file=sys.stderr, flush=True))
        # a daemon thread: an engine its owner never closed does not keep the process alive; it
        # runs no framework code (the pipeline computes elsewhere), so being stopped at exit is harmless
        self._thread = threading.Thread(target=self._main, name="hetpipe-engine", daemon=True)
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], *, max_tokens: int = 128, sampling: SamplingParams | None = None,
               stop: Sequence[str] = (), ignore_eos: bool = False, constraint: Constraint | None = None,
               prompt_logprobs: int | None = None, speculate: bool = True, prediction: Sequence[int] | None = None,
               deliver: Callable[[GenerationChunk | BaseException], None]) -> Request:
        """Queue a request. Bad input raises `UserError` here, at once; later failures are delivered.
        `constraint`: structured output, whose mask goes with every sampling step to the last stage.
        `prompt_logprobs`: score each prompt token given those before it, with this many
        alternatives (the first chunk carries them; the prompt is computed whole, not cached).
        `speculate`: with the engine's speculative decoding on, False opts this request out.
        `prediction`: token ids the output is expected to repeat (OpenAI's Predicted Outputs), drafted
        from whether or not the engine speculates otherwise."""
        ids = self._check(prompt_ids, max_tokens, sampling)
        if prompt_logprobs is not None and not (type(prompt_logprobs) is int and 0 <= prompt_logprobs <= MAX_LOGPROBS):
            raise UserError(f"prompt logprobs must be an integer in [0, {MAX_LOGPROBS}]")
        req = Request(next(self._ids), deliver, IncrementalDetokenizer(self.tokenizer), StopMatcher(stop),
                      Timing(time.perf_counter()), ignore_eos, constraint)
        # the presence and frequency penalties count the output only: it starts past the prompt
        sampling = (sampling or SamplingParams()).copy_with(output_from=len(ids))
        if sampling.min_tokens:
            if sampling.min_tokens > max_tokens:
                raise UserError(f"min_tokens ({sampling.min_tokens}) is more than max_tokens ({max_tokens})")
            if not sampling.stop_ids:  # the model's own end tokens are what min_tokens holds back
                sampling = sampling.copy_with(stop_ids=tuple(sorted(self.eos_ids))[:MAX_STOP_IDS])
        seq = Seq(req.seq_id, ids, max_tokens, sampling, min(len(ids) + max_tokens, self.context), owner=req,
                  score_prompt=prompt_logprobs)
        if prompt_logprobs is not None:
            req.prompt_scores = [None] * len(ids)
        req.drafter = seq.drafter = self._drafter(speculate, prediction)
        self.scheduler.check(seq)
        with self._lock:
            if self._closing:
                raise UserError("the engine is closed")
            if self.error is not None:
                raise StageFailure(f"the serving engine stopped: {self.error!r}")
            if self.lost_stages:
                raise StageFailure(f"{self.lost_error}; serving resumes once a stage takes its place")
            # refused here, at once, when the queue is full now; requests not yet taken in by the
            # engine thread are not counted (they may run at once): its own check has the last word
            waiting = len(self.scheduler.waiting)
            if waiting >= self.config.max_queue:
                raise QueueFull(f"queue full: {waiting} requests waiting (limit {self.config.max_queue}); retry later")
            self._put(("add", seq))
        return req

    def _drafter(self, speculate: bool, prediction: Sequence[int] | None) -> Drafter | None:
        if prediction is not None:
            ids = [int(i) for i in prediction if isinstance(i, (int, np.integer)) and not isinstance(i, bool)]
            if len(ids) != len(prediction) or any(not 0 <= i < self.vocab_size for i in ids):
                raise UserError(f"a prediction's token ids must be integers in 0..{self.vocab_size - 1}")
            return Drafter(self.config.speculative or SpeculativeConfig(), np.asarray(ids, np.int64))
        return Drafter(self.config.speculative) if self.config.speculative and speculate else None

    def load(self) -> tuple[int, int, int]:
        """(requests waiting, requests running, KV tokens reserved) now, read from any thread."""
        s = self.scheduler
        return len(s.waiting), len(s.running), s.reserved

    def cancel(self, seq_id: int) -> None:
        """Stop a request and free its KV caches on every stage (as soon as no batch of it is in flight)."""
        self._put(("cancel", seq_id))

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the batches in flight, end every other request with an error, and join the thread."""
        with self._lock:
            self._closing = True
        self._put(("close", None))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _put(self, item) -> None:
        self._inbox.put(item)
        self.pipeline.wake()  # a `poll` waiting for results returns at once

    def _check(self, prompt_ids, max_tokens: int, sampling) -> list[int]:
        try:
            ids = [int(i) for i in prompt_ids if isinstance(i, (int, np.integer)) and not isinstance(i, bool)]
        except TypeError:
            ids = None
        if ids is None or len(ids) != len(prompt_ids):
            raise UserError("prompt token ids must be integers")
        if not ids:
            raise UserError("empty prompt")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise UserError("max tokens must be an integer of at least 1")
        if len(ids) >= self.context:
            raise UserError(f"prompt is {len(ids)} tokens; the model's context is {self.context}")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise UserError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        reach = min(len(ids) + max_tokens, self.context)
        if self.position_limit is not None and reach > self.position_limit[0]:
            raise UserError(f"prompt ({len(ids)} tokens) + max tokens ({max_tokens}) reach past position "
                            f"{self.position_limit[0]}: {self.position_limit[1]}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise UserError("sampling must be a SamplingParams")
        for t, _ in sampling.logit_bias if sampling is not None else ():
            if t >= self.vocab_size:
                raise UserError(f"logit bias names token {t}; token ids are in 0..{self.vocab_size - 1}")
        return ids

    # -- the engine thread ---------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while self._take_requests():
                if self.lost_stages:
                    self._retry_lost()
                self._submit(self._schedule())                     # schedule -> run
                self._postprocess(self.pipeline.poll(RESULT_WAIT_S) if self._flying else [])
                self._submit(self._schedule())                     # the next step leaves before callers hear
                self._deliver()                                    # of this one: their work overlaps it
                self._watch_stages()
            self._deliver()
        except BaseException as e:  # a bug, or the pipeline itself gone: no request may hang on it
            self.error = e
            err = e if isinstance(e, (UserError, StageFailure)) else StageFailure(f"engine stopped: {e!r}")
            for seq in list(self._seqs.values()):
                self._end(seq, err)
            self._deliver()
            if self.on_fatal is not None and not self._closing:
                self.on_fatal(e)
            raise

    def _take_requests(self) -> bool:
        """Take in new requests, cancellations and `close`, waiting for one while there is nothing
        to do (with a stage lost beyond recovery, at most RETRY_LOST_S). False once closed with no
        batch left in flight: the thread ends."""
        self._deliver()  # what the previous step's end (a recovery, say) left: before any wait
        idle = not self._flying and not self._closing and not self._ready()
        while True:
            try:
                if not idle:
                    kind, arg = self._inbox.get_nowait()
                else:
                    kind, arg = self._inbox.get(timeout=RETRY_LOST_S) if self.lost_stages else self._inbox.get()
            except queue.Empty:
                break
            idle = False
            if kind == "add":
                self._add(arg)
            elif kind == "cancel":
                self._cancel(arg)
            else:
                self._closing = True
        if self._closing:
            for seq in [s for s in self._seqs.values() if not s.in_flight]:
                self._end(seq, UserError("the engine was closed"))
        return not (self._closing and not self._flying)

    def _ready(self) -> bool:
        self.scheduler.admit()
        return any(not s.in_flight and s.pending > 0 for s in self.scheduler.running)

    def _add(self, seq: Seq) -> None:
        try:
            self.scheduler.add(seq)
        except UserError as e:
            seq.owner.deliver(e)
            return
        self._seqs[seq.seq_id] = seq

    def _admitted(self, seq: Seq) -> int:
        seq.owner.cached_tokens = n = self.prefix.admit(seq)
        return n

    def _cancel(self, seq_id: int) -> None:
        seq = self._seqs.get(seq_id)
        if seq is None:
            return  # finished already
        seq.cancelled = True
        if not seq.in_flight:
            self._end(seq)

    def _schedule(self) -> list[list[Slice]]:
        """Micro-batches to start now: as many as the pipeline has room for."""
        batches = []
        while not self._closing and len(self._flying) + len(batches) < self.inflight:
            slices = self.scheduler.next_batch()
            if not slices:
                break
            batches.append(slices)
        return batches

    def _submit(self, batches: list[list[Slice]]) -> None:
        for slices in batches:
            self._draft(slices)
            masks = self._masks(slices)
            slices = [sl for sl in slices if sl.seq.seq_id in self._seqs]  # a grammar that failed ended its request
            if slices:
                self._send(slices, masks)

    def _draft(self, slices: list[Slice]) -> None:
        """Drafts for the decode steps of sequences that speculate: never past their max tokens (the
        token after the drafts counts), their KV reservation, the context or the position limit, and
        all of them with the batch's own tokens within `max_batch_tokens`."""
        budget = self.scheduler.max_batch_tokens - sum(sl.n for sl in slices)
        for sl in slices:
            seq = sl.seq
            if seq.drafter is None or not sl.sample or sl.n != 1:
                continue
            room = min(seq.max_tokens - len(seq.generated) - 1, seq.reserve - seq.length, budget,
                       self.context - seq.length, (self.position_limit or (self.context,))[0] - seq.length)
            sl.draft = seq.drafter.propose(seq.prompt, seq.generated, room, seq.seq_id)
            budget -= len(sl.draft)

    def _masks(self, slices: list[Slice]) -> dict[int, np.ndarray]:
        """Structured output's masks for the slices that sample (a draft's: one per position, the
        draft cut where the grammar refuses it); a grammar that fails ends its request."""
        out = {}
        for sl in slices:
            constraint = sl.seq.owner.constraint
            if sl.sample and constraint is not None:
                try:
                    if sl.draft:
                        out[sl.seq.seq_id], kept = constraint.masks_along(sl.draft)
                        del sl.draft[kept:]
                        if not sl.draft:
                            out[sl.seq.seq_id] = out[sl.seq.seq_id][0]
                    else:
                        out[sl.seq.seq_id] = constraint.mask()
                except GrammarFailed as e:
                    self._end(sl.seq, e)
        return out

    def _send(self, slices: list[Slice], masks: dict[int, np.ndarray]) -> None:
        """Start one micro-batch. One that cannot be sent (over the wire's limits, or a request's data
        the wire cannot carry) is split and sent in parts, undoing what building it told the prefix
        cache; the part that still fails is one request, which ends with the error."""
        tag = next(self._tags)
        chunks = [self._seq_chunk(sl, masks.get(sl.seq.seq_id)) for sl in slices]
        evict = self.prefix.end_batch() if self.prefix else ()
        try:
            self.pipeline.submit(tag, StageBatch(chunks, evict=evict))
        except Exception as e:
            if self.prefix:
                self.prefix.unsent([(sl.seq, sl.start, sl.n, c.offset == len(c.prefix) * BLOCK)
                                    for sl, c in zip(slices, chunks)], list(evict))
            if len(slices) > 1:
                half = len(slices) // 2
                self._send(slices[:half], masks)
                self._send(slices[half:], masks)
                return
            self.log(f"request {slices[0].seq.seq_id} could not be sent to the stages: {e!r}")
            self._end(slices[0].seq, RequestFailed(f"the request could not be sent to the stages: {e}"))
            return
        self._flying[tag] = slices

    def _seq_chunk(self, sl: Slice, allowed: np.ndarray | None) -> SeqChunk:
        prefix, names = self.prefix.chunk(sl.seq, sl.start, sl.n, len(sl.draft)) if self.prefix else ((), ())
        scored = sl.seq.score_prompt if sl.start < len(sl.seq.prompt) else None  # a replay scores again: kept once
        return SeqChunk(sl.seq.seq_id, sl.start, np.asarray(sl.seq.tokens(sl.start, sl.n) + sl.draft, np.int32),
                        sl.seq.sampling if sl.sample else None, allowed, prefix, names, scored, len(sl.draft))

    def _postprocess(self, outcomes: list[BatchOutcome]) -> None:
        """Tokens into chunks (to the outbox); finished and cancelled sequences out (released on every stage)."""
        for o in outcomes:
            slices = self._flying.pop(o.tag, None)
            if slices is None:
                continue  # a batch given up on in a recovery
            if o.error is not None:
                self._failed(slices, o.error)
                continue
            self.scheduler.completed(slices)
            self.profile.add(o.timing)
            for scored in o.prompt_logprobs:
                self._keep_scores(scored)
            tokens: dict[int, list[SampledToken]] = {}
            for t in o.tokens:
                tokens.setdefault(t.seq_id, []).append(t)
            now = time.perf_counter()
            for sl in slices:
                seq = sl.seq
                seq.owner.profile.add(o.timing)
                if seq.cancelled:
                    self._end(seq)
                elif sl.sample:
                    try:
                        self._take_tokens(sl, tokens.get(seq.seq_id) or [None], now)
                    except (GrammarFailed, RequestFailed) as e:  # this request ends, not the engine
                        self._end(seq, e)
                    except Exception as e:  # a bug met with one request's data: it alone ends
                        self.log(f"request {seq.seq_id} failed: {e!r}\n{traceback.format_exc()}")
                        self._end(seq, RequestFailed(f"internal error: {type(e).__name__}"))

    def _take_tokens(self, sl: Slice, toks: list[SampledToken | None], now: float) -> None:
        """A sampling slice's tokens into chunks: one, or a verified draft's taken drafts and the
        token after them (their positions stay in the caches; the rejected ones are dropped on every
        stage by the sequence's next chunk)."""
        seq = sl.seq
        if len(toks) > len(sl.draft) + 1 or any(t is not None and t.token_id != d for t, d in zip(toks[:-1], sl.draft)):
            raise RequestFailed("the last stage returned tokens that are not a verified draft")
        for tok in toks:
            chunk = self._chunk(seq, tok, now)
            self._outbox.append((seq.owner, chunk))
            if chunk.finish_reason:
                self._end(seq)  # caches freed before the caller hears it is done
                break
        if sl.draft:
            taken = len(toks) - 1
            seq.cached += taken
            seq.drafter.verified(len(sl.draft), taken)
            self.drafted += len(sl.draft)
            self.accepted += taken

    def _keep_scores(self, p: PromptLogprobs) -> None:
        """A chunk's prompt scores into its request's (each position once: a replay scores again)."""
        seq = self._seqs.get(p.seq_id)
        scores = seq.owner.prompt_scores if seq is not None else None
        if scores is None:
            return
        for i in range(min(len(p.logprobs), len(scores) - p.start)):
            if scores[p.start + i] is None:
                lp = None if p.start + i == 0 else float(p.logprobs[i])
                top = [] if lp is None else [(int(t), float(v)) for t, v in zip(p.top_ids[i], p.top_logprobs[i])]
                scores[p.start + i] = (lp, top)

    def _failed(self, slices: list[Slice], error: Exception) -> None:
        """A batch failed: a stage restarted or unreachable is recovered (nothing lost); any other
        error ends the batch's requests."""
        if isinstance(error, StageFailure):
            lost = self.pipeline.check()
            if lost:
                self._recover(lost)
                return
        if isinstance(error, CacheMiss):  # a stage dropped a block this copy counts on (a daemon
            self.log(f"{error}; every sequence is prefilled again")  # shared with another coordinator)
            self._restart(self._give_up_in_flight())
            return
        if self.prefix:  # the stages past the failed one named none of the batch's blocks
            self.prefix.forget([(sl.seq, sl.start, sl.n) for sl in slices])
        err = error if isinstance(error, (UserError, StageFailure)) else StageFailure(str(error))
        for sl in slices:
            self._end(sl.seq, err)

    def _deliver(self) -> None:
        """Hand each request what the outbox holds for it, in order: a request's error never
        overtakes its last chunk."""
        out, self._outbox = self._outbox, []
        for req, item in out:
            try:
                req.deliver(item)
            except Exception as e:  # a caller's delivery function failing is that caller's loss alone
                self.log(f"request {req.seq_id}: delivery failed: {e!r}")
                if not isinstance(item, BaseException):
                    self._cancel(req.seq_id)

    def _watch_stages(self) -> None:
        if self._flying:  # heartbeats are watched while serving
            lost = self.pipeline.lost()
            if lost:
                self._recover(lost)

    def _recover(self, lost: list[int]) -> None:
        """A stage is gone. Every batch in flight is given up on; once a stage has taken the lost
        one's place, every live sequence is freed on every stage and prefilled again from its token
        ids (prompt + generated) by the next steps, so greedy outputs continue exactly and streams
        see no token twice, none missing. If none takes its place in time, every request ends with
        that error. The split is not planned again: the replacement takes the lost layer range."""
        live = self._give_up_in_flight()
        event = recover(self.pipeline, lost, self.config.recovery_timeout_s, self.log)
        self.recoveries.append(event)
        self._restart(live)  # the replacement holds no cached blocks: every prefix is prefilled again
        if not event.ok:
            err = StageFailure(event.error)
            for seq in live:
                self._end(seq, err)
            self.lost_stages, self.lost_error = list(event.unreplaced or lost), event.error
            self._retry_at = time.monotonic() + RETRY_LOST_S

    def _retry_lost(self) -> None:
        """Every RETRY_LOST_S, try again to put a stage (the lost one restarted, or a standby) in
        each lost place; once every place is filled, serving resumes."""
        if time.monotonic() < self._retry_at:
            return
        for i in list(self.lost_stages):
            where = self.pipeline.replace(i, max(self.config.recovery_timeout_s, RETRY_LOST_S))
            if where is not None:
                self.lost_stages.remove(i)
                self.log(f"stage {i} is back on {where}")
        self._retry_at = time.monotonic() + RETRY_LOST_S
        if not self.lost_stages:
            self.log("every stage is back: serving again")
            self._restart([])

    def _give_up_in_flight(self) -> list[Seq]:
        """Forget every batch in flight (outcomes still to come are dropped); returns every live sequence."""
        self._flying.clear()
        return list(self._seqs.values())

    def _restart(self, live: list[Seq]) -> None:
        """Free every live sequence on every stage and forget the prefix cache: the next steps
        prefill each again from its token ids (prompt + generated)."""
        for seq in live:
            seq.in_flight = False
            seq.cached = 0
        if self.prefix:
            self.prefix.reset()
        try:
            self.pipeline.release([s.seq_id for s in live])  # what the stages still hold
        except Exception:
            pass  # a stage that cannot be told drops them with its connection

    def _chunk(self, seq: Seq, tok: SampledToken | None, now: float) -> GenerationChunk:
        """The chunk one sampled token makes for its request (`finish_reason` set if it ends it)."""
        if tok is None or tok.error is not None:
            why = "the last stage returned no token for it" if tok is None else tok.error
            raise RequestFailed(f"sampling failed on the last stage: {why}")
        req: Request = seq.owner
        seq.generated.append(tok.token_id)
        req.timing.token(now)
        finish = None
        if req.constraint is not None:
            req.constraint.consume(tok.token_id)
        eos = tok.token_id in self.eos_ids and not req.ignore_eos
        if eos or (req.constraint is not None and req.constraint.done):  # EOS, or the JSON is complete
            finish = "stop"
        elif len(seq.generated) >= seq.max_tokens or seq.length >= self.context:
            finish = "length"
        piece = "" if eos else req.detok.add(tok.token_id)
        if finish:
            piece += req.detok.flush()
        text, stop = req.stops.feed(piece, final=finish is not None)
        if stop is not None:
            finish = "stop"
        chunk = GenerationChunk(tok.token_id, text, tok.logprob, tok.top, finish, stop=stop)
        if req.prompt_scores is not None and len(seq.generated) == 1:
            if any(s is None for s in req.prompt_scores):
                raise RequestFailed("the last stage did not score every prompt token")
            chunk.prompt_logprobs = [(t, lp, top) for t, (lp, top) in zip(seq.prompt, req.prompt_scores)]
        return chunk

    def _end(self, seq: Seq, err: BaseException | None = None) -> None:
        """Take a sequence out of everything; tell its request why, if it did not end normally."""
        started = seq.cached > 0 or seq.in_flight
        if seq.drafter is not None and seq.drafter.config.draft is not None:
            seq.drafter.config.draft.release(seq.seq_id)  # the draft model's cache of it
        self.scheduler.finish(seq)
        self._seqs.pop(seq.seq_id, None)
        if self.prefix:
            self.prefix.release(seq.seq_id)
        if err is not None and not seq.cancelled:
            self._outbox.append((seq.owner, err))
        if started:
            try:
                self.pipeline.release([seq.seq_id])
            except Exception:
                pass  # a stage that cannot be told drops the sequence with its connection
