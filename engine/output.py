"""What a request yields and records: chunks, clock readings, where the time went, stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .pipeline import BatchTiming


@dataclass(slots=True)
class GenerationChunk:
    """One streamed step: a token and the text it completes (may be empty mid-character)."""

    token_id: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" on the last chunk


@dataclass(slots=True)
class Timing:
    """Clock readings of one request (perf_counter seconds)."""

    start: float
    first: float | None = None  # first token out
    last: float | None = None  # latest token out
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens

    def token(self, now: float) -> None:
        if self.last is not None:
            self.gaps.append(now - self.last)
        self.first = self.first or now
        self.last, self.tokens = now, self.tokens + 1

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.start) * 1000 if self.first else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        span = (self.last or 0.0) - (self.first or 0.0)
        return (self.tokens - 1) / span if span > 0 else 0.0


@dataclass(slots=True)
class Profile:
    """Summed over the batches something took part in: compute per stage, and time on the wire."""

    steps: int = 0
    stage_ms: list[float] = field(default_factory=list)
    wire_ms: float = 0.0

    def add(self, t: BatchTiming | None) -> None:
        if t is None:
            return
        if len(self.stage_ms) != len(t.stage_ms):
            self.stage_ms = [0.0] * len(t.stage_ms)
        self.stage_ms = [a + b for a, b in zip(self.stage_ms, t.stage_ms)]
        self.wire_ms += t.wire_ms
        self.steps += 1

    def to_json(self, stages: list[dict]) -> dict:
        """Totals and per-step means, each stage named by its address or backend and layers."""
        n = max(self.steps, 1)
        names = [d.get("address") or f"{d['backend']}:{d['layers'][0]}-{d['layers'][1]}" for d in stages]
        return {"steps": self.steps, "wire_ms": self.wire_ms, "wire_ms_per_step": self.wire_ms / n,
                "stages": [{"stage": name, "compute_ms": ms, "compute_ms_per_step": ms / n}
                           for name, ms in zip(names, self.stage_ms)]}


def percentiles(name: str, xs: list[float]) -> dict:
    """`{name}_p50` and `{name}_p95` of xs (0.0 when empty)."""
    return {f"{name}_p{q}": float(np.percentile(xs, q)) if xs else 0.0 for q in (50, 95)}



class StopMatcher:
    """Finds stop strings across streamed pieces; holds back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str, final: bool) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        hold = max(len(s) - 1 for s in self.stops)
        keep = 0
        for k in range(min(hold, len(self.pending)), 0, -1):
            if any(s.startswith(self.pending[-k:]) for s in self.stops):
                keep = k
                break
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False
