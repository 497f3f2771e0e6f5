"""What a request yields and records: chunks, clock readings, and where the time went."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.pipeline import BatchTiming


@dataclass(slots=True)
class GenerationChunk:
    """One streamed step: a token and the text it completes (may be empty mid-character)."""

    token_id: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    # on the first chunk, where asked: each prompt token's log-probability given those before it
    # (None for the first) and its alternatives, as (token id, logprob, [(token id, logprob), ...])
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = None
    stop: str | None = None  # on the last chunk: the stop string that ended it, if one did


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
    hop_ms: list[float] = field(default_factory=list)  # each hop's, over the batches that timed them
    hop_steps: int = 0

    def add(self, t: BatchTiming | None) -> None:
        if t is None:
            return
        if len(self.stage_ms) != len(t.stage_ms):
            self.stage_ms = [0.0] * len(t.stage_ms)
        self.stage_ms = [a + b for a, b in zip(self.stage_ms, t.stage_ms)]
        self.wire_ms += t.wire_ms
        self.steps += 1
        if t.hop_ms:
            if len(self.hop_ms) != len(t.hop_ms):
                self.hop_ms, self.hop_steps = [0.0] * len(t.hop_ms), 0
            self.hop_ms = [a + b for a, b in zip(self.hop_ms, t.hop_ms)]
            self.hop_steps += 1

    def to_json(self, stages: list[dict]) -> dict:
        """Totals and per-step means, each stage named by its address or backend and layers."""
        n = max(self.steps, 1)
        names = [d.get("address") or f"{d['backend']}:{d['layers'][0]}-{d['layers'][1]}" for d in stages]
        return {"steps": self.steps, "wire_ms": self.wire_ms, "wire_ms_per_step": self.wire_ms / n,
                "stages": [{"stage": name, "compute_ms": ms, "compute_ms_per_step": ms / n}
                           for name, ms in zip(names, self.stage_ms)],
                # coordinator -> first stage, each stage -> the next, last stage -> coordinator
                "hop_ms_per_step": [ms / max(self.hop_steps, 1) for ms in self.hop_ms]}


def percentiles(name: str, xs: list[float]) -> dict:
    """`{name}_p50` and `{name}_p95` of xs (0.0 when empty)."""
    return {f"{name}_p{q}": float(np.percentile(xs, q)) if xs else 0.0 for q in (50, 95)}
