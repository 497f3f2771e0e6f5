"""What the engine keeps per request besides the scheduler's `Seq`: where its output goes, its
detokenizer and stop strings, its grammar state, timing and drafts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .output import GenerationChunk, Profile, Timing
from .speculative import Drafter
from .structured import Constraint
from .text import IncrementalDetokenizer, StopMatcher


@dataclass(eq=False)
class Request:
    """What the engine keeps per request besides the scheduler's `Seq`: its sequence's `owner`."""

    seq_id: int
    deliver: Callable[[GenerationChunk | BaseException], None]
    detok: IncrementalDetokenizer
    stops: StopMatcher
    timing: Timing
    ignore_eos: bool = False
    constraint: Constraint | None = None  # structured output's grammar state
    cached_tokens: int = 0  # prompt tokens found in the prefix cache: not prefilled again
    profile: Profile = field(default_factory=Profile)
    # prompt log-probabilities asked: per prompt position, (logprob, alternatives) once scored
    prompt_scores: list | None = None
    drafter: Drafter | None = None  # speculative decoding: its drafts and how many were taken

    @property
    def speculative(self) -> dict | None:
        """{"drafted", "accepted"}: draft tokens sent and taken (None: it did not speculate)."""
        return None if self.drafter is None else {"drafted": self.drafter.drafted, "accepted": self.drafter.accepted}
