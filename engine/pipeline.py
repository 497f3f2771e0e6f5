"""An ordered list of stages covering the model: one call runs a batch through all of them."""

from __future__ import annotations

from collections.abc import Sequence

from .partition import check_coverage
from .stage import SampledToken, Stage, StageBatch


class Pipeline:
    def __init__(self, stages: Sequence[Stage]):
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        check_coverage([(s.info.first, s.info.last) for s in stages], stages[0].info.num_layers)
        self.stages = list(stages)

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
