"""Continuous batching: which sequences run in the next micro-batch. Bookkeeping only, no arrays.

Every step, sequences join (admitted from a bounded FIFO queue within the KV budget) and leave
(finished, cancelled). A micro-batch takes the ready decode steps first, then fills what is left
of its token budget with prefill chunks, so a long prompt is prefilled a chunk at a time between
the decode steps of running streams instead of stalling them. With K micro-batches in flight each
takes at most 1/K of the running sequences, so the pipeline's stages stay evenly fed.

A sequence's next input is always "every token not yet in the KV caches": the prompt's rest while
prefilling, the last sampled token while decoding, and prompt + generated tokens after its caches
were lost and are rebuilt. One rule covers all three.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..core.errors import QueueFull, UserError
from ..core.sampling import SamplingParams
from .request import Request


@dataclass(eq=False)
class Seq:
    seq_id: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    reserve: int  # KV tokens held for it while running: prompt + max_tokens, within the context
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens in the stages' KV caches
    in_flight: bool = False
    cancelled: bool = False
    owner: Request | None = None  # the engine's per-request state (output queue, detokenizer, timing)
    score_prompt: int | None = None  # prompt log-probabilities asked, with this many alternatives
    drafter: object = None  # speculative decoding's drafts for it (`speculative.Drafter`), if it speculates

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return self.length - self.cached

    def tokens(self, start: int, n: int) -> list[int]:
        p = len(self.prompt)
        if start >= p:
            return self.generated[start - p : start - p + n]
        return (self.prompt[start:] + self.generated)[: n]


@dataclass(slots=True)
class Slice:
    """One sequence's part of a micro-batch: tokens [start, start + n), sampling at the end or not."""

    seq: Seq
    start: int
    n: int
    sample: bool
    draft: list[int] = field(default_factory=list)  # speculative decoding: draft tokens sent after the n


class Scheduler:
    def __init__(self, kv_tokens: int, *, micro_batches: int = 1, max_seqs: int = 256, max_queue: int = 1024,
                 max_batch_tokens: int = 512, prefill_with_decode: int = 128, on_admit=None):
        """`on_admit(seq)`, if given, runs as a sequence starts running and returns how many of its
        prompt tokens are in the caches already (a cached prefix): it starts that far in."""
        if micro_batches < 1:
            raise UserError("micro-batches in flight must be at least 1")
        self.kv_tokens = kv_tokens
        self.micro_batches = micro_batches
        self.max_seqs = max_seqs
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.prefill_with_decode = prefill_with_decode  # prefill tokens riding along with decode steps
        self.on_admit = on_admit
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.reserved = 0

    def check(self, seq: Seq) -> None:
        """Refuse at once a request no amount of waiting would let in."""
        if seq.reserve > self.kv_tokens:
            raise UserError(f"request needs {seq.reserve} KV tokens (prompt {len(seq.prompt)} + max tokens "
                            f"{seq.max_tokens}); the smallest stage holds {self.kv_tokens}")

    def add(self, seq: Seq) -> None:
        self.check(seq)
        self.admit()  # the queue holds only what cannot run now
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"queue full: {len(self.waiting)} requests waiting (limit {self.max_queue}); retry later")
        self.waiting.append(seq)
        self.admit()

    def admit(self) -> None:
        """First come, first served: the head of the queue waits for room rather than being overtaken."""
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if self.reserved + seq.reserve > self.kv_tokens:
                break
            self.waiting.popleft()
            self.reserved += seq.reserve
            self.running.append(seq)
            if self.on_admit is not None:
                seq.cached = self.on_admit(seq)

    def next_batch(self) -> list[Slice]:
        """The next micro-batch (empty: nothing ready). Marks its sequences in flight."""
        self.admit()
        ready = [s for s in self.running if not s.in_flight and s.pending > 0]
        if not ready:
            return []
        cap = -(-len(self.running) // self.micro_batches)
        decode = [s for s in ready if s.pending == 1][:cap]
        slices = [Slice(s, s.cached, 1, True) for s in decode]
        budget = self.max_batch_tokens - len(slices)
        if slices:
            budget = min(budget, self.prefill_with_decode)
        for s in ready:
            if len(slices) >= cap or budget <= 0:
                break
            if s.pending > 1:
                n = min(s.pending, budget)
                slices.append(Slice(s, s.cached, n, n == s.pending))
                budget -= n
        for sl in slices:
            sl.seq.in_flight = True
        return slices

    def completed(self, slices: list[Slice]) -> None:
        """The micro-batch ran: its tokens are in the caches."""
        for sl in slices:
            sl.seq.in_flight = False
            sl.seq.cached += sl.n

    def finish(self, seq: Seq) -> None:
        """Take a sequence out, waiting or running; its KV reservation is free again."""
        seq.in_flight = False
        if seq in self.running:
            self.running.remove(seq)
            self.reserved -= seq.reserve
        elif seq in self.waiting:
            self.waiting.remove(seq)
