"""The `Stage` contract every backend, and the remote client, satisfies, and the types it speaks.

A stage holds the contiguous layers [first, last] of a model. The first stage also holds the
embedding and takes token ids; the last also holds the final norm and head and returns sampled
token ids with their log-probabilities, never vocab-sized logits. Every call carries a batch of
sequences, each with its id, its new tokens (and, past the first stage, its hidden rows), and its
position offset, so ragged prefill and a decode step of many sequences are the same call.
Everything here is numpy and dataclasses so it can cross a socket unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from .sampling import SamplingParams
from .tensors import TypedArray

MAX_DRAFT = 64  # draft tokens one chunk may carry to be verified, or a draft model may be asked for


@dataclass(slots=True)
class SeqChunk:
    """One sequence's share of a stage call."""

    seq_id: int
    offset: int  # tokens already in this sequence's KV cache == position of the first new token
    token_ids: np.ndarray  # (T,) int32: the new tokens (the last stage keeps them for penalties)
    sampling: SamplingParams | None = None  # None: no token wanted yet (a middle prefill chunk)
    allowed: np.ndarray | None = None  # structured output: the tokens the next one may be (int32 bitmask words)
    # the prefix cache (`engine.core.kv_blocks`): on a sequence's first chunk, the hashes of the
    # cached blocks it starts with (offset == len(prefix) * BLOCK); on any chunk, the hashes naming
    # the blocks it fills up, from block offset // BLOCK on (empty: name none)
    prefix: Sequence[int] = ()
    names: Sequence[int] = ()
    # prompt log-probabilities: the last stage scores each of these tokens given those before it,
    # with this many alternatives (None: not asked; the request then costs nothing more)
    prompt_logprobs: int | None = None
    # speculative decoding: the last `draft` token ids are drafts. The last stage samples at each of
    # the draft + 1 last rows in turn, keeps the drafts while each equals the token sampled before
    # it, and returns those tokens and the one sampled after the last kept (`allowed` then has one
    # mask row per sampled row). Every stage drops the rejected positions when the sequence's next
    # chunk starts before them; the names above count the chunk's tokens before the drafts only
    draft: int = 0


@dataclass(slots=True)
class StageBatch:
    seqs: list[SeqChunk]
    hidden: TypedArray | None = None  # (sum of T, hidden_size) rows in `seqs` order; None for the first stage
    evict: Sequence[int] = ()  # hashes of cached blocks to forget before this batch runs (the coordinator's decision)


@dataclass(slots=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first
    error: str | None = None  # sampling this sequence failed (token_id is then -1): it alone ends


@dataclass(slots=True)
class PromptLogprobs:
    """The last stage's scores of one chunk's tokens: token `start + i`'s log-probability given the
    tokens before it (NaN for position 0, which nothing predicts), and its `k` best alternatives."""

    seq_id: int
    start: int
    logprobs: np.ndarray  # (n,) float32
    top_ids: np.ndarray  # (n, k) int32
    top_logprobs: np.ndarray  # (n, k) float32

    def __eq__(self, other) -> bool:
        return isinstance(other, PromptLogprobs) and (self.seq_id, self.start) == (other.seq_id, other.start) and \
            all(np.array_equal(a, b, equal_nan=a.dtype.kind == "f") for a, b in
                ((self.logprobs, other.logprobs), (self.top_ids, other.top_ids),
                 (self.top_logprobs, other.top_logprobs)))


@dataclass(slots=True)
class StageResult:
    hidden: TypedArray | None = None  # from every stage but the last
    # from the last stage, per sampling sequence in batch order: one token, or a verified draft's several
    tokens: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # from the last stage, where asked


@dataclass(slots=True)
class StageInfo:
    """What a stage is: backend, where it runs, and which layers it holds."""

    backend: str
    device: str
    dtype: str
    first: int
    last: int
    num_layers: int  # of the whole model
    kv_tokens: int = 0  # tokens of KV cache this stage can hold, all sequences together (its budget)

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.last == self.num_layers - 1

    @property
    def layer_range(self) -> str:
        return f"{self.first}-{self.last}"

    def describe(self) -> dict:
        """The `stages` entry of `--json` output."""
        return {"backend": self.backend, "device": self.device, "dtype": self.dtype, "layers": [self.first, self.last],
                "kv_tokens": self.kv_tokens}


@dataclass(slots=True)
class StageReport:
    """What a stage says about itself: a stage daemon sends it on every hello, load, ping and health
    check (validated on receipt, `transport.wire.unpack_report`), an in-process stage makes it with
    `BaseStage.report`. Read by the client, the planner, `Pipeline.status()` and so `/health`,
    `/metrics` and `hetpipe health`. The fields after `max_seqs` are a daemon's own (their defaults:
    an in-process stage)."""

    backend: str
    device: str
    dtype: str
    num_layers: int
    layers: tuple[int, int] | None  # None: waiting to be given a layer range
    kv_tokens: int  # its KV budget (0 before it holds layers)
    kv_tokens_used: int
    kv_tokens_cached: int  # in cached blocks no sequence holds: reclaimable
    live_sequences: list[int]
    max_seqs: int | None
    address: str = ""  # "": in process
    heartbeat: str = ""  # where its heartbeat socket answers
    draining: bool = False  # after SIGTERM: serves its live sequences, takes no new ones
    identity: dict[str, str | None] = field(default_factory=dict)  # the model it serves: config and weights hashes
    # measured at start-up: what the planner splits layers by
    ms_per_layer: float = 0.0  # one layer, one decoded token
    head_ms: float = 0.0  # final norm and head, one token
    layer_bytes: int = 0  # one layer's weights in its dtype
    free_memory: int = 0
    resident_bytes: int = 0
    forward_ms: float | None = None  # a health check's one-token forward through its layers

    @property
    def info(self) -> StageInfo | None:
        if self.layers is None:
            return None
        return StageInfo(self.backend, self.device, self.dtype, self.layers[0], self.layers[1], self.num_layers,
                         self.kv_tokens)


@dataclass(slots=True)
class StageStatus:
    """One stage now, as `Pipeline.status()`, `hetpipe health`, `/health` and `/metrics` see it: its
    report, or why it gave none. `expected`: the layers its pipeline gave it (None: asked on its own,
    where a stage holding no layers is "idle")."""

    address: str | None  # None: in process
    report: StageReport | None  # None: it did not answer
    expected: StageInfo | None = None
    error: str | None = None
    compute_ms_per_step: float | None = None  # the server's: per pipeline step, since its previous look

    @property
    def state(self) -> str:
        """ok; lost (in a pipeline: silent, or holding other layers); down or idle (asked on its own)."""
        if self.expected is None:
            return "down" if self.report is None else "ok" if self.report.layers else "idle"
        ok = self.report is not None and self.report.layers == (self.expected.first, self.expected.last)
        return "ok" if ok else "lost"

    @property
    def name(self) -> str:
        info = self.expected or (self.report.info if self.report else None)
        return self.address or ("?" if info is None else f"{info.backend}:{info.layer_range}")

    def to_json(self) -> dict:
        """Its `/health` and `hetpipe health --json` entry."""
        r, info = self.report, self.expected or (self.report.info if self.report else None)
        out = {"stage": self.name, "state": self.state}
        if self.address:
            out["address"] = self.address
        if info is not None:
            out |= {**info.describe(), "kv_tokens": r.kv_tokens if r else info.kv_tokens}
        if r is not None:
            out |= {"live_sequences": len(r.live_sequences), "kv_tokens_used": r.kv_tokens_used,
                    "kv_tokens_cached": r.kv_tokens_cached, "draining": r.draining, "forward_ms": r.forward_ms}
        if self.error is not None:
            out["error"] = self.error
        if self.compute_ms_per_step is not None:
            out["compute_ms_per_step"] = self.compute_ms_per_step
        return out


@runtime_checkable
class Stage(Protocol):
    info: StageInfo

    def forward(self, batch: StageBatch) -> StageResult:
        """Run the batch through this stage's layers, appending to each sequence's KV cache."""
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the KV caches (and sampler state) of these sequences."""
        ...

    def live_sequences(self) -> list[int]: ...

    def kv_tokens_used(self) -> int:
        """Tokens held in KV caches now, all sequences together (at most `info.kv_tokens`)."""
        ...

    def kv_tokens_cached(self) -> int:
        """Tokens in the prefix cache's blocks no sequence holds: reclaimable, not counted as used."""
        ...

    def close(self) -> None: ...
