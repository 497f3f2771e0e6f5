"""The `Pipeline` contract the serving engine drives: stages in order, batches in, tokens out.

A pipeline takes micro-batches with `submit` and hands back their outcomes from `poll`; the
in-process pipeline (`engine.serving.local_pipeline`) runs them on a compute thread of its own,
the remote one (`transport.remote_pipeline`) sends them along its stage daemons, several at once.
Losing a stage is the remote pipeline's alone: it reports lost stages and replaces one on request;
what to free, how long to wait and what to prefill again is the engine's policy
(`engine.serving.recovery`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .stage import PromptLogprobs, SampledToken, Stage, StageBatch, StageResult, StageStatus


@dataclass(slots=True)
class BatchTiming:
    """Where one batch's time went: compute on each stage (pipeline order) and the rest."""

    stage_ms: list[float]
    total_ms: float  # from submit to its tokens back in the coordinator
    # over stage daemons: each hop's time (coordinator -> first stage, stage -> stage, last stage ->
    # coordinator), from wall-clock readings each process takes (meaningful on one machine, or
    # clocks kept in step); empty in-process
    hop_ms: list[float] = field(default_factory=list)

    @property
    def wire_ms(self) -> float:
        """Transfer between processes (and, with micro-batches in flight, waiting behind another)."""
        return max(0.0, self.total_ms - sum(self.stage_ms))


@dataclass(slots=True)
class BatchOutcome:
    """What became of one submitted batch: its sampled tokens and timing, or the error."""

    tag: int
    tokens: list[SampledToken] | None = None
    timing: BatchTiming | None = None
    error: Exception | None = None
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


@runtime_checkable
class Pipeline(Protocol):
    stages: Sequence[Stage]
    max_inflight: int  # micro-batches it can work on at once

    def submit(self, tag: int, batch: StageBatch) -> None:
        """Start a batch; its outcome comes out of `poll` under `tag`. Returns at once."""
        ...

    def poll(self, timeout_s: float) -> list[BatchOutcome]:
        """Outcomes of submitted batches, waiting up to `timeout_s` for the first (or a `wake`)."""
        ...

    def wake(self) -> None:
        """End a `poll` waiting now, from any thread: new work has arrived."""
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free these sequences on every stage (ordered before any later batch)."""
        ...

    def kv_tokens(self) -> int:
        """The smallest KV budget of any stage: what a scheduler may fill."""
        ...

    def describe(self) -> list[dict]:
        """One `stages` entry per stage, for results and reports."""
        ...

    def status(self) -> list[StageStatus]:
        """Each stage now, from any thread: its report, or why it gave none. May block briefly (a
        ping, or a batch running)."""
        ...

    def lost(self) -> list[int]:
        """Indices of stages found gone (silent heartbeats); none for in-process stages."""
        ...

    def check(self) -> list[int]:
        """Indices of stages that fail a ping now or no longer hold their layers (after a failed batch)."""
        ...

    def abandon(self) -> None:
        """Forget every batch in flight: their outcomes never come out of `poll`."""
        ...

    def replace(self, index: int, timeout_s: float) -> str | None:
        """Try once, within `timeout_s` (its load included), to put a stage in place of lost stage
        `index` with the same layers. Returns where it now runs, or None."""
        ...

    def close(self) -> None: ...


UNLIMITED = 1 << 62  # the KV budget of stages built without one (tests, direct construction)


def kv_budget(stages: Sequence[Stage]) -> int:
    return min((s.info.kv_tokens for s in stages if s.info.kv_tokens), default=UNLIMITED)


def run_stages(stages: Sequence[Stage], batch: StageBatch) -> tuple[StageResult, list[float]]:
    """Token ids in at the first stage, the last stage's result out (sampled tokens, prompt
    log-probabilities); and each stage's milliseconds."""
    result, stage_ms = None, []
    for stage in stages:
        t = time.perf_counter()
        result = stage.forward(StageBatch(batch.seqs, result.hidden if result else None, batch.evict))
        stage_ms.append((time.perf_counter() - t) * 1000)
    return result, stage_ms
