"""What every backend's stage shares: offsets, sequence lifetimes, limits, sampling, warm-up.

A backend subclasses `BaseStage` and provides only the compute, `_compute(seqs, hidden)`, and its
paged KV cache's `BlockManager` as `self.blocks` (block tables, the prefix cache's named blocks:
`kv_blocks.py`), which this class links, names, evicts and releases as each batch says.
Everything here is numpy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig
from .kv_blocks import BLOCK, BlockManager
from .errors import CacheMiss, CapacityError, UserError
from .sampling import SamplingParams, log_softmax, logsumexp, sample_token, top_logprobs
from .stage import MAX_DRAFT, PromptLogprobs, SampledToken, SeqChunk, StageBatch, StageInfo, StageReport, StageResult
from .tensors import DTYPES, TypedArray, itemsize

GREEDY = SamplingParams()  # what a draft model decodes with


@dataclass(slots=True)
class Layout:
    """Where each sequence's rows sit in a flattened batch, in numpy (backends copy it over)."""

    starts: list[int]
    lengths: list[int]
    offsets: list[int]
    positions: np.ndarray  # (sum T,) int64: absolute position of every row
    # the rows the last stage turns into logits, in order: every row of a sequence whose prompt is
    # scored (`prompt_logprobs`), else the last row of each sequence that samples
    sample_rows: np.ndarray

    @classmethod
    def of(cls, seqs: Sequence[SeqChunk]) -> Layout:
        lengths = [len(s.token_ids) for s in seqs]
        starts = np.cumsum([0] + lengths[:-1]).tolist()
        offsets = [s.offset for s in seqs]
        positions = np.concatenate([np.arange(o, o + n) for o, n in zip(offsets, lengths)])
        rows = []
        for a, n, s in zip(starts, lengths, seqs):
            if s.prompt_logprobs is not None:
                rows.extend(range(a, a + n))
            elif s.sampling is not None:
                rows.extend(range(a + n - 1 - s.draft, a + n))  # a verified draft: its last draft + 1 rows
        return cls(starts, lengths, offsets, positions.astype(np.int64), np.asarray(rows, dtype=np.int64))


@dataclass(slots=True)
class _SeqState:
    length: int = 0  # tokens in the KV cache
    seen: list[int] = field(default_factory=list)  # token ids in order, for the penalties
    seen_from: int = 0  # the position of seen[0]: a cached prefix's tokens are never sent
    rng: np.random.Generator | None = None
    scores_next: np.ndarray | None = None  # prompt scoring: the log-probabilities of the row before the next chunk
    draft: int = 0  # the last chunk's drafts: positions at the end of `length` its next chunk may drop


PROBE_BYTES = 1 << 28  # a read-bandwidth probe: larger than any cache, so it reads DRAM (or HBM)


class BaseStage:
    """Bookkeeping shared by the backends: offsets, sequence lifetimes, sampling.

    A backend subclass provides `_compute(seqs, hidden)` returning either the hidden rows (as a
    `TypedArray`) or, on the last stage, float32 logits (B', vocab) for the sequences that sample,
    and sets `self.blocks` to its paged cache's block manager.
    """

    kernels = ""  # hetpipe's own kernels this stage runs, if any (benchmarks report it)

    def __init__(self, info: StageInfo, cfg: ModelConfig):
        self.info = info
        self.cfg = cfg
        self.hidden_size = cfg.hidden_size
        self._seqs: dict[int, _SeqState] = {}
        self.blocks: BlockManager | None = None  # the backend's paged KV cache's bookkeeping
        self.max_seqs: int | None = None  # live sequences at once (None: no limit but the KV budget)
        self.max_call_tokens: int | None = None  # tokens in one call: bounds activation memory
        n_layers = info.last - info.first + 1
        self.kv_token_bytes = n_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize(info.dtype)

    def set_kv_budget(self, tokens: int | None = None) -> None:
        """Cap the KV cache at `tokens`; by default at the memory left after the weights (free now),
        less MEMORY_RESERVE of the device's whole memory: the rule `hetpipe plan` plans by."""
        if tokens is None:
            tokens = int(self.free_memory() - MEMORY_RESERVE * self.total_memory()) // self.kv_token_bytes
        if tokens < 1:
            raise UserError(f"a KV budget of {tokens} tokens leaves no room for any sequence")
        self.info.kv_tokens = tokens
        if self.blocks is not None:  # beyond this, cached blocks no sequence holds are evicted for room
            self.blocks.capacity = tokens // BLOCK

    def free_memory(self) -> int:
        """Bytes free on this stage's device (backends on discrete GPUs override)."""
        return system_available_memory()

    def total_memory(self) -> int:
        """Bytes this stage's device has in all (backends on discrete GPUs override)."""
        return system_total_memory()

    def kv_tokens_used(self) -> int:
        return sum(st.length for st in self._seqs.values())

    def kv_tokens_cached(self) -> int:
        return self.blocks.cached_blocks * BLOCK if self.blocks is not None else 0

    def read_bandwidth(self) -> float | None:
        """Bytes/s this stage's device streams from its memory (PROBE_BYTES read, best of a few
        runs): the ceiling for one-stream decode, which reads every weight once per token.
        None where a backend cannot measure it."""
        return None

    def forward(self, batch: StageBatch) -> StageResult:
        # offset 0 starts a sequence afresh: a coordinator rebuilding caches after a stage was lost
        # may find stale state here (a batch from before the loss); it is dropped, never mixed in
        self.release([s.seq_id for s in batch.seqs if (s.offset == 0 or s.prefix) and s.seq_id in self._seqs])
        if batch.evict and self.blocks is not None:
            self.blocks.evict(batch.evict)
        self._drop_rejected(batch.seqs)
        self._check(batch)
        for s in batch.seqs:
            if s.seq_id not in self._seqs:
                self._seqs[s.seq_id] = _SeqState(length=len(s.prefix) * BLOCK, seen_from=len(s.prefix) * BLOCK)
                if s.prefix:
                    self.blocks.link(s.seq_id, s.prefix)
        try:
            out = self._compute(batch.seqs, batch.hidden)
        except Exception:
            # a half-run batch leaves caches of unknown length: drop them rather than lie
            self.release([s.seq_id for s in batch.seqs])
            raise
        for s in batch.seqs:
            st = self._seqs[s.seq_id]
            st.length += len(s.token_ids)
            st.draft = s.draft
            if s.names:  # full now: named, so a later sequence with the same tokens before it can link them
                self.blocks.name(s.seq_id, s.offset // BLOCK, s.names)
            if self.info.is_last:
                st.seen.extend(s.token_ids.tolist())
        if not self.info.is_last:
            return StageResult(hidden=out)
        if all(s.prompt_logprobs is None and not s.draft for s in batch.seqs):
            return StageResult(tokens=self._sample(batch.seqs, out))
        return self._score_and_sample(batch.seqs, out)

    def _drop_rejected(self, seqs: list[SeqChunk]) -> None:
        """A chunk that starts within its sequence's last drafts drops the positions from there on
        (the drafts the last stage rejected): their keys stay in their slots, overwritten as the
        sequence goes on, and never read (attention reads up to the chunk's offset + its tokens)."""
        for s in seqs:
            st = self._seqs.get(s.seq_id)
            if st is None or not st.draft:
                continue
            if st.length - st.draft <= s.offset < st.length:
                del st.seen[max(0, s.offset - st.seen_from) :]
                st.length = s.offset
            st.draft = 0
    def truncate(self, seq_id: int, length: int) -> None:
        """Keep only a sequence's first `length` positions (a draft model's rejected drafts): the
        rest stay in their slots, overwritten as it goes on. In-process use; a daemon's sequences
        drop rejected drafts by their next chunk (`SeqChunk.draft`)."""
        st = self._seqs[seq_id]
        if not 0 <= length <= st.length or length < st.seen_from:
            raise UserError(f"sequence {seq_id}: cannot keep {length} of its {st.length} positions")
        del st.seen[length - st.seen_from :]
        st.length, st.draft = length, 0

    def draft(self, seq_id: int, start: int, tokens: Sequence[int], k: int) -> list[int]:
        """A draft model's turn, on a stage holding every layer: keep the sequence's first `start`
        positions (those it drafted past them were not taken), feed `tokens` from there, and decode
        k tokens greedily, one forward each. Returns them; the last is not fed (it may not be taken)."""
        if not (self.info.is_first and self.info.is_last):
            raise UserError("a draft model runs all its layers on one stage")
        if not 1 <= k <= MAX_DRAFT or len(tokens) == 0:
            raise UserError(f"a draft needs tokens to feed and 1 to {MAX_DRAFT} tokens to draft")
        held = self._seqs[seq_id].length if seq_id in self._seqs else 0
        if start > held:
            raise UserError(f"sequence {seq_id}: holds {held} positions, not {start}")
        if start < held:
            self.truncate(seq_id, start)
        r = self.forward(StageBatch([SeqChunk(seq_id, start, np.asarray(tokens, np.int32), GREEDY)]))
        out = [r.tokens[0].token_id]
        for i in range(k - 1):
            r = self.forward(StageBatch([SeqChunk(seq_id, start + len(tokens) + i, np.asarray(out[-1:], np.int32),
                                                  GREEDY)]))
            out.append(r.tokens[0].token_id)
        return out

    def release(self, seq_ids: Sequence[int]) -> None:
        for sid in seq_ids:
            if self._seqs.pop(sid, None) is not None:
                self._free(sid)

    def live_sequences(self) -> list[int]:
        return sorted(self._seqs)

    def report(self, **daemon) -> StageReport:
        """What this stage says about itself now; `daemon`: the fields a stage daemon adds."""
        i = self.info
        return StageReport(i.backend, i.device, i.dtype, i.num_layers, (i.first, i.last), i.kv_tokens,
                           self.kv_tokens_used(), self.kv_tokens_cached(), self.live_sequences(), self.max_seqs,
                           **daemon)

    def close(self) -> None:
        self.release(list(self._seqs))

    def _check(self, batch: StageBatch) -> None:
        ids = [s.seq_id for s in batch.seqs]
        if not ids:
            raise UserError("empty batch")
        if len(set(ids)) != len(ids):
            raise UserError("a sequence appears twice in one batch")
        total = 0
        for s in batch.seqs:
            if s.seq_id < 0 and not WARMUP_ID <= s.seq_id < WARMUP_ID + WARMUP_IDS:
                raise UserError(f"sequence ids are non-negative, not {s.seq_id}")
            have = self._seqs[s.seq_id].length if s.seq_id in self._seqs else len(s.prefix) * BLOCK
            if s.offset != have:
                raise UserError(f"sequence {s.seq_id}: offset {s.offset} but {have} tokens cached")
            if len(s.token_ids) == 0:
                raise UserError(f"sequence {s.seq_id}: no new tokens")
            if (s.prefix or s.names) and self.blocks is None:
                raise UserError("this stage keeps no prefix cache")
            if s.prefix and self.blocks.match(s.prefix) != len(s.prefix):
                raise CacheMiss(f"prefix cache miss: sequence {s.seq_id} starts with {len(s.prefix)} cached blocks, "
                                 f"{self.blocks.match(s.prefix)} of them held here")
            if not (_is_count(s.draft) and s.draft < len(s.token_ids)):
                raise UserError(f"sequence {s.seq_id}: {s.draft} drafts in a chunk of {len(s.token_ids)} tokens")
            if s.draft and (s.sampling is None or s.prompt_logprobs is not None):
                raise UserError(f"sequence {s.seq_id}: drafts are verified by sampling, never scored")
            if s.draft and s.allowed is not None and s.allowed.shape[:1] != (s.draft + 1,):
                raise UserError(f"sequence {s.seq_id}: {s.draft} drafts need {s.draft + 1} mask rows")
            full = (s.offset + len(s.token_ids) - s.draft) // BLOCK - s.offset // BLOCK
            if s.names and len(s.names) != full:
                raise UserError(f"sequence {s.seq_id}: {len(s.names)} block names for the {full} blocks it fills")
            if s.token_ids.min() < 0 or s.token_ids.max() >= self.cfg.vocab_size:
                raise UserError(f"sequence {s.seq_id}: token ids must be in 0..{self.cfg.vocab_size - 1}")
            total += len(s.token_ids)
        if self.max_call_tokens and total > self.max_call_tokens:
            raise CapacityError(f"{total} tokens in one call; this stage takes at most {self.max_call_tokens}")
        new = sum(1 for i in ids if i not in self._seqs and i >= 0)
        if new and self.max_seqs and len(self._seqs) + new > self.max_seqs:
            raise CapacityError(f"stage holds {len(self._seqs)} sequences; {new} more would pass its limit "
                             f"of {self.max_seqs}")
        if self.info.is_first != (batch.hidden is None):
            raise UserError("the first stage takes token ids only; later stages take hidden rows")
        if batch.hidden is not None:
            shape = batch.hidden.data.shape
            if batch.hidden.dtype not in DTYPES or len(shape) != 2 or shape[1] != self.hidden_size:
                raise UserError(f"hidden rows must be (tokens, {self.hidden_size}) floats, not {shape} "
                                 f"{batch.hidden.dtype}")
            if shape[0] != total:
                raise UserError(f"hidden has {shape[0]} rows for {total} tokens")
        used = self.kv_tokens_used()
        more = total + sum(len(s.prefix) * BLOCK for s in batch.seqs if s.seq_id not in self._seqs)  # linked ones count
        if self.info.kv_tokens and used + more > self.info.kv_tokens:
            raise CapacityError(f"KV cache full: {used} tokens held, {more} more asked, budget {self.info.kv_tokens}")

    def _sample(self, seqs: list[SeqChunk], logits: np.ndarray) -> list[SampledToken]:
        """One token per sampling sequence. A sequence whose sampling fails gets an error entry
        instead (its request ends alone; the others in the batch are served)."""
        out = []
        for s, row in zip([s for s in seqs if s.sampling is not None], logits):
            try:
                out.append(self._sample_one(s, row))
            except Exception as e:
                out.append(SampledToken(s.seq_id, -1, 0.0, [], error=f"{type(e).__name__}: {e}"[:500]))
        return out

    def _score_and_sample(self, seqs: list[SeqChunk], logits: np.ndarray) -> StageResult:
        """The logits hold every row of a scored sequence (each scores the token after it; the
        chunk's first token is scored by the row kept from the chunk before; the last of them
        samples as usual) and the draft + 1 last rows of a verified draft (`_verify`)."""
        tokens, scored, at = [], [], 0
        for s in seqs:
            n = len(s.token_ids) if s.prompt_logprobs is not None else s.draft + 1 if s.sampling else 0
            rows = logits[at : at + n]
            at += n
            if s.prompt_logprobs is not None:
                scored.append(self._score(s, rows))
            if s.sampling is None:
                continue
            try:
                tokens += self._verify(s, rows) if s.draft else [self._sample_one(s, rows[-1])]
            except Exception as e:
                tokens.append(SampledToken(s.seq_id, -1, 0.0, [], error=f"{type(e).__name__}: {e}"[:500]))
        return StageResult(tokens=tokens, prompt_logprobs=scored)

    def _verify(self, s: SeqChunk, rows: np.ndarray) -> list[SampledToken]:
        """Sample each draft position in turn, as plain decoding would have sampled it (the same
        sampler, penalties over the tokens before it, its own mask, the same random stream); keep
        the drafts while each equals the token sampled for its place. With a draft that is one
        token (a point mass), taking the sampled token either way is the rejection rule of
        speculative sampling: the output is distributed exactly as the model's own, greedy or not."""
        drafts, upto = s.token_ids[-s.draft :].tolist(), s.offset + len(s.token_ids) - s.draft
        out = []
        for i in range(s.draft + 1):
            tok = self._sample_one(s, rows[i], upto + i, None if s.allowed is None else s.allowed[i])
            out.append(tok)
            if i == s.draft or tok.token_id != drafts[i]:
                break
        return out

    def _score(self, s: SeqChunk, rows: np.ndarray) -> PromptLogprobs:
        st, k, n = self._seqs[s.seq_id], s.prompt_logprobs, len(s.token_ids)
        logprobs = np.full(n, np.nan, np.float32)
        top_ids, top_lps = np.zeros((n, k), np.int32), np.full((n, k), np.nan, np.float32)
        before = st.scores_next if s.offset > 0 else None  # position 0 has nothing before it
        for i in range(n):
            if before is not None:
                logprobs[i] = before[s.token_ids[i]]
                if k:
                    best = np.argpartition(-before, k - 1)[:k]
                    best = best[np.argsort(-before[best], kind="stable")]
                    top_ids[i], top_lps[i] = best, before[best]
            before = log_softmax(rows[i])
        st.scores_next = before
        return PromptLogprobs(s.seq_id, s.offset, logprobs, top_ids, top_lps)

    def _sample_one(self, s: SeqChunk, row: np.ndarray, upto: int | None = None,
                    allowed: np.ndarray | None = None) -> SampledToken:
        """The token after the sequence's first `upto` tokens (default: all of this chunk's)."""
        p, st = s.sampling, self._seqs[s.seq_id]
        if upto is None:
            upto, allowed = s.offset + len(s.token_ids), s.allowed
        chosen_from = row  # what the token is drawn from; its log-probabilities are the model's own
        if p.holds_back(upto - p.output_from):
            chosen_from = row.copy()
            chosen_from[[t for t in p.stop_ids if t < row.size]] = -np.inf
        if st.rng is None:
            st.rng = np.random.default_rng(p.seed)
        history = np.asarray(st.seen[: upto - st.seen_from], dtype=np.int64) if p.uses_history else _EMPTY
        if st.seen_from and p.uses_history:  # the output penalties read only what follows the prompt
            if p.repetition_penalty != 1.0:
                raise UserError(f"sequence {s.seq_id}: a repetition penalty reads the whole prompt, and it "
                                 "started from a cached prefix this stage never saw")
            p = p.copy_with(output_from=max(0, p.output_from - st.seen_from))
        tok = sample_token(chosen_from, p, st.rng, history, allowed)
        lse = logsumexp(row)
        top = top_logprobs(row, p.logprobs, lse) if p.logprobs > 1 else []
        return SampledToken(s.seq_id, tok, float(row[tok]) - lse, top)

    def warmup(self, decode_only: bool = False) -> None:
        """Run a short prefill and one decode step so the first request pays no one-time cost.

        `decode_only`: a one-token forward (a health check).
        """
        sid = WARMUP_ID
        p = SamplingParams()
        for n, off in ((1, 0),) if decode_only else ((8, 0), (1, 8)):
            toks = np.zeros(n, dtype=np.int32)
            hidden = None if self.info.is_first else TypedArray.from_float32(
                np.zeros((n, self.hidden_size), np.float32), self.info.dtype)
            self.forward(StageBatch([SeqChunk(sid, off, toks, p)], hidden))
        self.release([sid])

    def _compute(self, seqs: list[SeqChunk], hidden: TypedArray | None):
        raise NotImplementedError

    def _free(self, seq_id: int) -> None:
        self.blocks.release(seq_id)


_EMPTY = np.zeros(0, dtype=np.int64)


def _is_count(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0
WARMUP_ID = -(2**62)  # warm-up's sequence ids start here: clients' ids are refused below zero
WARMUP_IDS = 16  # how many: a warm-up may run a batch of several
MEMORY_RESERVE = 0.10  # of a device's memory, kept for activations, the runtime and the OS (KV takes the rest)


def system_total_memory() -> int:
    """Bytes of physical memory (MemTotal on Linux)."""
    return _meminfo("MemTotal:") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def system_available_memory() -> int:
    """Bytes the OS could hand out now (MemAvailable on Linux; physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
