"""What `/health`, `/metrics` and the page say about the stages: the pipeline's status, with each
stage's compute milliseconds per step over the steps run since the previous look."""

from __future__ import annotations

import threading
import time

from ...core.stage import StageStatus
from ...serving.generator import Generator

FRESH_S = 0.5  # a status younger than this is reused (many scrapers, one ping)


class StatusCache:
    def __init__(self, gen: Generator):
        self.gen = gen
        self._lock = threading.Lock()
        self._last: list[StageStatus] = []
        self._at = 0.0
        self._mark = (0, [])  # (steps, stage_ms) at the previous look
        self._per_step: list[float] = []

    def refresh(self) -> list[StageStatus]:
        """The pipeline's status now (at most FRESH_S old); blocks for a ping or a running batch."""
        with self._lock:
            if time.monotonic() - self._at < FRESH_S:
                return self._last
            try:
                entries = self.gen.pipeline.status()
            except Exception as e:  # a pipeline that cannot even say: every stage unknown
                entries = [StageStatus(getattr(s, "address", None), None, s.info, str(e))
                           for s in self.gen.pipeline.stages]
            p = self.gen.engine.profile
            steps, ms = p.steps, list(p.stage_ms)
            then_steps, then_ms = self._mark
            if steps > then_steps and len(then_ms) in (0, len(ms)):
                base = then_ms or [0.0] * len(ms)
                self._per_step = [(a - b) / (steps - then_steps) for a, b in zip(ms, base)]
                self._mark = (steps, ms)
            for i, e in enumerate(entries):
                e.compute_ms_per_step = self._per_step[i] if i < len(self._per_step) else None
            self._last, self._at = entries, time.monotonic()
            return entries

    def cached(self) -> list[StageStatus]:
        """The latest status without asking again (what a metrics scrape reads after `refresh`)."""
        with self._lock:
            return self._last
