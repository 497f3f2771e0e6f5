"""In-process stages, loaded, warmed up and run on one compute thread of their own.

Why a thread of its own: torch's CPU wheel runs its kernels on libgomp, and libgomp cuts its
spin-wait to almost nothing once a process holds more OpenMP threads than CPUs: a second thread
that runs torch ops gets a second pool, and from then on every parallel region of either wakes
sleeping workers (a halted vCPU takes hundreds of microseconds to wake): decode steps run on a
second thread took twice as long (docs/benchmarks.md). So one thread loads every stage and runs
every batch and release; the engine thread only hands it work and reads outcomes, and never runs a
framework op.

The thread waits for work without a timeout: a pipeline its owner never closed sits blocked until
the process exits, never waking while Python finalizes (a thread that ends then runs MLX's
thread-local destructors, which take the GIL and abort the process). `close()` ends it while the
interpreter is whole.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from ..core.partition import check_coverage
from ..core.pipeline import BatchOutcome, BatchTiming, kv_budget, run_stages
from ..core.stage import Stage, StageBatch, StageStatus

_STOP = object()
_WAKE = object()


class LocalPipeline:
    """Stages in one process; satisfies `engine.core.pipeline.Pipeline`.

    `loaders` build the stages in pipeline order, `prepare` (if given) runs first: both on the
    compute thread. Errors while loading are raised here, by the constructor.
    """

    max_inflight = 1  # the stages share one thread: a second batch would only wait behind the first

    def __init__(self, loaders: Sequence[Callable[[], Stage]], prepare: Callable[[], None] | None = None):
        if not loaders:
            raise ValueError("a pipeline needs at least one stage")
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        started: Future = Future()
        self._thread = threading.Thread(target=_compute, args=(list(loaders), prepare, self._jobs, self._done, started),
                                        name="hetpipe-compute", daemon=True)
        self._thread.start()
        self.stages: list[Stage] = started.result()  # raises what loading raised
        # a pipeline dropped without close() still stops its thread (at collection, not at exit)
        weakref.finalize(self, self._jobs.put, _STOP).atexit = False
        try:
            check_coverage([(s.info.first, s.info.last) for s in self.stages], self.stages[0].info.num_layers)
        except Exception:
            self.close()
            raise

    def submit(self, tag: int, batch: StageBatch) -> None:
        self._jobs.put(("forward", tag, batch, time.perf_counter()))

    def poll(self, timeout_s: float) -> list[BatchOutcome]:
        try:
            items = [self._done.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._done.get_nowait())
            except queue.Empty:
                return [o for o in items if o is not _WAKE]

    def wake(self) -> None:
        self._done.put(_WAKE)

    def release(self, seq_ids: Sequence[int]) -> None:
        """Done on the compute thread, before any later batch; returns once done."""
        self.call(lambda stages: [s.release(seq_ids) for s in stages])

    def call(self, fn: Callable[[list[Stage]], object]) -> object:
        """Run `fn(stages)` on the compute thread, in order with the batches; its result."""
        if not self._thread.is_alive():
            raise RuntimeError("the pipeline is closed")
        done: Future = Future()
        self._jobs.put(("call", fn, done))
        return done.result()

    def draft(self, seq_id: int, start: int, tokens: Sequence[int], k: int) -> list[int]:
        """A draft model's turn on its one stage (`BaseStage.draft`), on the compute thread."""
        return self.call(lambda stages: stages[0].draft(seq_id, start, tokens, k))

    def kv_tokens(self) -> int:
        return kv_budget(self.stages)

    def describe(self) -> list[dict]:
        return [s.info.describe() for s in self.stages]

    def status(self) -> list[StageStatus]:
        """Each stage now, read on the compute thread between batches."""
        return self.call(lambda stages: [StageStatus(None, s.report(), s.info) for s in stages])

    # in-process stages are never lost
    def lost(self) -> list[int]:
        return []

    def check(self) -> list[int]:
        return []

    def abandon(self) -> None:
        pass

    def replace(self, index: int, timeout_s: float) -> str | None:
        return None

    def close(self) -> None:
        """Close the stages and end the compute thread (idempotent)."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()


def _compute(loaders, prepare, jobs: queue.SimpleQueue, done: queue.SimpleQueue, started: Future) -> None:
    """The compute thread: load, then run jobs in order until told to stop."""
    try:
        if prepare is not None:
            prepare()
        stages = [load() for load in loaders]
    except BaseException as e:
        started.set_exception(e)
        return
    started.set_result(stages)
    while True:
        job = jobs.get()  # no timeout, on purpose: see the module's docstring
        if job is _STOP:
            break
        if job[0] == "forward":
            _, tag, batch, sent = job
            try:
                result, stage_ms = run_stages(stages, batch)
            except Exception as e:  # the batch fails, the pipeline serves on
                done.put(BatchOutcome(tag, error=e))
                continue
            done.put(BatchOutcome(tag, result.tokens, BatchTiming(stage_ms, (time.perf_counter() - sent) * 1000),
                                  prompt_logprobs=result.prompt_logprobs))
        else:
            _, fn, result = job
            try:
                result.set_result(fn(stages))
            except BaseException as e:
                result.set_exception(e)
    for stage in stages:
        stage.close()
