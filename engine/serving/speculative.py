"""Speculative decoding's drafts, made on the coordinator: several tokens per pass of the pipeline.

A running sequence that speculates sends, with its next token, up to k draft tokens; every stage
computes the k + 1 positions in one pass, and the last stage keeps the drafts the model itself
would have produced (`BaseStage._verify`), then one token more. Drafts come from:
- prompt lookup (`ngram`, vLLM's method): the sequence's last n tokens (n from `lookup_max` down to
  `lookup_min`) found earlier in its prompt and output; the tokens that followed them there;
- a draft model (`draft_model.py`): a smaller model with the same vocabulary, greedy, in this process;
- a prediction (OpenAI's Predicted Outputs): the text the output is expected to repeat, read in
  step with the output (each output token stands for the prediction's next, a changed one too);
  after a draft missed whole, the output's last tokens are looked for in it, nearest first.

The draft length adapts per sequence: after a draft taken whole the next may be longer (up to k);
after a miss, as long as what was taken, plus one. Two misses in a row stop drafting for a few
steps, twice as many each time (up to `MAX_BACKOFF`), so a stream whose drafts never hit costs
almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import UserError

METHODS = ("ngram", "draft")
DEFAULT_DRAFT = 8  # draft tokens per step, at most, unless told
MAX_BACKOFF = 64  # steps without drafts after repeated misses, at most


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_draft_tokens: int = DEFAULT_DRAFT  # k: draft tokens per step, at most
    lookup_min: int = 2  # n-gram lengths matched (vLLM's prompt_lookup_min / max)
    lookup_max: int = 4
    draft_model: str | None = None  # method "draft": the model (`--speculative draft:MODEL`)
    draft: object = None  # method "draft": the loaded `draft_model.DraftModel`, which drafts

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"speculative method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if (self.method == "draft") != (self.draft_model is not None):
            raise UserError("a draft model goes with the method draft (draft:MODEL), and only with it")
        if not 1 <= self.num_draft_tokens <= 32:
            raise UserError("num_draft_tokens must be in [1, 32]")
        if not 1 <= self.lookup_min <= self.lookup_max <= 16:
            raise UserError("lookup sizes: 1 <= lookup_min <= lookup_max <= 16")


def parse_speculative(spec: str | None, num_draft_tokens: int | None = None) -> SpeculativeConfig | None:
    """`--speculative ngram [--num-draft-tokens K]`."""
    if spec is None:
        if num_draft_tokens is not None:
            raise UserError("--num-draft-tokens needs --speculative")
        return None
    k = DEFAULT_DRAFT if num_draft_tokens is None else num_draft_tokens
    if spec.startswith("draft:"):
        if not spec[6:]:
            raise UserError("--speculative draft:MODEL names the draft model (a directory, a .gguf or a Hub id)")
        return SpeculativeConfig("draft", k, draft_model=spec[6:])
    return SpeculativeConfig(spec, k)


def lookup(tokens: np.ndarray, corpus: np.ndarray, k: int, lookup_min: int, lookup_max: int,
           skip_last: bool, cursor: int | None = None) -> tuple[list[int], int]:
    """The k tokens that follow an occurrence, in `corpus`, of `tokens`' last n tokens (longest n
    first), and where they start. The occurrence is the latest, or with `cursor` the one ending
    nearest it (a prediction read in step with the output). `skip_last`: the corpus is
    `tokens` itself, whose own end is no match."""
    for n in range(min(lookup_max, len(tokens)), lookup_min - 1, -1):
        pattern = tokens[-n:]
        end = len(corpus) - (1 if skip_last else 0)
        if end - n + 1 <= 0:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(corpus[:end], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        hits = hits[::-1] if cursor is None else hits[np.argsort(np.abs(hits + n - cursor), kind="stable")]
        for at in hits:
            follow = corpus[at + n : at + n + k]
            if len(follow):
                return follow.tolist(), int(at + n)
    return [], 0


@dataclass(slots=True)
class Drafter:
    """One sequence's drafting: its method, its prediction, and the adaptive draft length."""

    config: SpeculativeConfig
    prediction: np.ndarray | None = None  # Predicted Outputs: token ids the output is expected to repeat
    cursor: int = 0  # where in the prediction the output's next token is expected
    seen: int = 0  # output tokens the cursor has counted
    aligned: bool = True  # the output follows the prediction at the cursor
    from_prediction: bool = False  # the last draft came from the prediction
    k: int = 0  # draft length next step
    backoff: int = 0  # steps to go without drafting
    pause: int = 4  # the next backoff's length
    misses: int = 0  # misses in a row
    drafted: int = 0  # draft tokens sent, taken, and drafts verified, all told
    accepted: int = 0
    steps: int = 0

    def __post_init__(self):
        self.k = self.config.num_draft_tokens

    def propose(self, prompt: list[int], generated: list[int], room: int, seq_id: int = 0) -> list[int]:
        """Drafts to send after the sequence's last token, at most `room` of them."""
        k = min(self.k, room)
        if self.backoff:
            self.backoff -= 1
            return []
        if k <= 0:
            return []
        c = self.config
        self.from_prediction = False
        if self.prediction is not None:
            self.cursor += len(generated) - self.seen  # each new token stands for the prediction's next one
            self.seen = len(generated)
            if not self.aligned and generated:  # after a miss: where the output's last tokens are in it
                found, at = lookup(np.asarray(generated[-c.lookup_max:], np.int64), self.prediction, k, 1,
                                   c.lookup_max, skip_last=False, cursor=self.cursor)
                if found:
                    self.cursor, self.aligned = at, True
            draft = self.prediction[self.cursor : self.cursor + k].tolist()
            if draft:
                self.from_prediction = True
                return draft
        if c.draft is not None:
            return c.draft.propose(seq_id, prompt + generated, k)
        seq = np.asarray(prompt + generated, np.int64)
        return lookup(seq, seq, k, c.lookup_min, c.lookup_max, skip_last=True)[0]

    def verified(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens came back with `accepted` of them taken."""
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        if self.from_prediction and accepted == 0:
            self.aligned = False  # the output left the prediction here: find it again
        full = self.config.num_draft_tokens
        if accepted == drafted:
            self.k, self.misses, self.pause = min(full, self.k + 2), 0, 4
            return
        self.k = accepted + 1
        self.misses = self.misses + 1 if accepted == 0 else 0
        if self.misses >= 2:
            self.backoff, self.pause, self.misses = self.pause, min(MAX_BACKOFF, self.pause * 2), 0
