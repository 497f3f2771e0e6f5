"""An ordered list of stages covering the model: one call runs a batch through all of them.

`forward` runs one batch and returns its tokens. The serving engine uses `submit` and `poll`
instead, so a pipeline of remote stages can hold several micro-batches in flight; in process,
stages run one after another and `submit` computes at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .partition import check_coverage
from .stage import SampledToken, Stage, StageBatch


@dataclass(slots=True)
class BatchTiming:
    """Where one batch's time went: compute on each stage (pipeline order) and the rest."""

    stage_ms: list[float]
    total_ms: float  # from submit to its tokens back in the coordinator

    @property
    def wire_ms(self) -> float:
        """Transfer between processes (and, with micro-batches in flight, waiting behind another)."""
        return max(0.0, self.total_ms - sum(self.stage_ms))


UNLIMITED = 1 << 62  # a stage built without a budget (tests, direct construction)


class Pipeline:
    max_inflight = 1  # in-process stages share one thread: nothing to overlap
    overlaps = False  # `submit` computes before it returns

    def __init__(self, stages: Sequence[Stage]):
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        check_coverage([(s.info.first, s.info.last) for s in stages], stages[0].info.num_layers)
        self.stages = list(stages)
        self._done: list[tuple[object, list[SampledToken] | Exception, BatchTiming | None]] = []
        self.last_stage_ms: list[float] = []

    def submit(self, tag, batch: StageBatch) -> None:
        """Start a batch; its outcome (tokens, or the exception) and timing come out of `poll` under `tag`."""
        t = time.perf_counter()
        try:
            tokens = self.forward(batch)
        except Exception as e:  # the batch fails, the pipeline serves on
            self._done.append((tag, e, None))
            return
        self._done.append((tag, tokens, BatchTiming(self.last_stage_ms, (time.perf_counter() - t) * 1000)))

    def poll(self, timeout_s: float) -> list[tuple[object, list[SampledToken] | Exception, BatchTiming | None]]:
        done, self._done = self._done, []
        return done

    def kv_tokens(self) -> int:
        """The smallest KV budget of any stage: what a scheduler may fill."""
        return min((s.info.kv_tokens for s in self.stages if s.info.kv_tokens), default=UNLIMITED)

    def forward(self, batch: StageBatch) -> list[SampledToken]:
        """Token ids in at the first stage, sampled tokens out of the last."""
        result, stage_ms = None, []
        for stage in self.stages:
            t = time.perf_counter()
            result = stage.forward(StageBatch(batch.seqs, result.hidden if result else None))
            stage_ms.append((time.perf_counter() - t) * 1000)
        self.last_stage_ms = stage_ms
        return result.tokens

    def release(self, seq_ids: Sequence[int]) -> None:
        for stage in self.stages:
            stage.release(seq_ids)

    def describe(self) -> list[dict]:
        return [s.info.describe() for s in self.stages]

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
