"""An ordered list of stages covering the model: one call runs a batch through all of them.

`forward` runs one batch and returns its tokens. The serving engine uses `submit` and `poll`
instead, so a pipeline of remote stages can hold several micro-batches in flight; in process,
stages run one after another and `submit` computes at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from .partition import check_coverage
from .stage import SampledToken, Stage, StageBatch


UNLIMITED = 1 << 62  # a stage built without a budget (tests, direct construction)


class Pipeline:
    max_inflight = 1  # in-process stages share one thread: nothing to overlap

    def __init__(self, stages: Sequence[Stage]):
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        check_coverage([(s.info.first, s.info.last) for s in stages], stages[0].info.num_layers)
        self.stages = list(stages)
        self._done: list[tuple[object, list[SampledToken] | Exception]] = []

    def submit(self, tag, batch: StageBatch) -> None:
        """Start a batch; its outcome (tokens, or the exception) comes out of `poll` under `tag`."""
        try:
            self._done.append((tag, self.forward(batch)))
        except Exception as e:  # the batch fails, the pipeline serves on
            self._done.append((tag, e))

    def poll(self, timeout_s: float) -> list[tuple[object, list[SampledToken] | Exception]]:
        done, self._done = self._done, []
        return done

    def kv_tokens(self) -> int:
        """The smallest KV budget of any stage: what a scheduler may fill."""
        return min((s.info.kv_tokens for s in self.stages if s.info.kv_tokens), default=UNLIMITED)

    def forward(self, batch: StageBatch) -> list[SampledToken]:
        """Token ids in at the first stage, sampled tokens out of the last."""
        result = None
        for stage in self.stages:
            result = stage.forward(StageBatch(batch.seqs, result.hidden if result else None))
        return result.tokens

    def release(self, seq_ids: Sequence[int]) -> None:
        for stage in self.stages:
            stage.release(seq_ids)

    def describe(self) -> list[dict]:
        return [s.info.describe() for s in self.stages]

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
