"""The prefix cache's decisions, made on the coordinator for every stage at once.

Each stage holds the KV cache of its own layers only, so every stage must keep, share and drop the
same blocks. The coordinator runs `kv_blocks.BlockManager` over virtual blocks, as many as the
smallest stage's budget holds, and replays on it what each batch will make every stage do:

- a sequence admitted to run links the cached blocks its prompt starts with (`admit`): it starts
  that many tokens in, and its first chunk names them (`SeqChunk.prefix`);
- each chunk allocates the blocks its tokens need, evicting the least recently used unreferenced
  blocks when the budget is full, and names the blocks it fills up (`SeqChunk.names`);
- the evictions go with the batch (`StageBatch.evict`), applied by each stage before it runs it;
- a finished sequence's named blocks stay cached, unreferenced (`release`).

Stages run batches and releases in the order they were sent, so they hold what this copy holds.
Names made by a batch count only from the next one on (a stage names blocks after computing them);
a batch that failed has its names forgotten everywhere (`forget`). `reset` starts afresh under a
new salt (after a stage was replaced), telling the stages to forget every name it gave.
"""

from __future__ import annotations

import secrets

from ..core.kv_blocks import BLOCK, BlockManager, block_hashes
from .scheduler import Seq


class PrefixCache:
    def __init__(self, kv_tokens: int):
        self.capacity = max(1, kv_tokens // BLOCK)
        self._evict: list[int] = []
        self.evictions = 0  # blocks evicted for room, all told
        self.hit_tokens = 0  # prompt tokens not prefilled, all told
        self._new()

    def _new(self) -> None:
        self.salt = secrets.randbits(63)  # hashes of one coordinator's blocks only: never another's
        self.blocks = BlockManager(self.capacity, lambda old, need: old + need, keep_evicted=True)
        self.hashes: dict[int, list[int]] = {}  # seq_id -> hashes of its full blocks so far
        self.started: set[int] = set()  # sequences the stages have seen (their prefix was sent)
        self.pending: list[tuple[int, int, list[int]]] = []  # names made by the batch being built

    # -- the scheduler's and engine's calls ------------------------------------------------------

    def admit(self, seq: Seq) -> int:
        """A sequence starts running: link its cached prefix; returns the tokens it skips. The last
        prompt token is always computed (its logits sample the first token); a request whose
        repetition penalty reads the whole prompt, or whose prompt is scored, reuses nothing (the
        last stage would not see it)."""
        if seq.sampling.repetition_penalty != 1.0 or seq.score_prompt is not None:
            return 0  # (a prompt scored is computed whole: the last stage scores every token of it)
        want = self._hashes(seq, (len(seq.prompt) - 1) // BLOCK * BLOCK)
        n = self.blocks.match(want)
        self.blocks.link(seq.seq_id, want[:n])
        self.hit_tokens += n * BLOCK
        return n * BLOCK

    def chunk(self, seq: Seq, start: int, n: int, drafts: int = 0) -> tuple[list[int], list[int]]:
        """The (prefix, names) of a chunk of tokens [start, start + n) about to be sent, and `drafts`
        draft tokens after them: they take blocks (as on every stage) but name none. A block that
        accepted drafts fill up is never named: the prefix cache holds only what chunks named."""
        sid = seq.seq_id
        if sid not in self.blocks.tables:  # admitted before a reset: it starts afresh, from no prefix
            self.blocks.link(sid, [])
        prefix = []
        if sid not in self.started:
            self.started.add(sid)
            prefix = self._hashes(seq, len(self.blocks.table(sid)) * BLOCK)
        self.blocks.allocate(sid, start + n + drafts)
        first, end = start // BLOCK, (start + n) // BLOCK
        names = self._hashes(seq, end * BLOCK)[first:end] if end > first else []  # most decode steps fill none
        if names:
            self.pending.append((sid, first, names))
        return prefix, names

    def end_batch(self) -> list[int]:
        """The batch is built: its names count from now on; returns the hashes it must evict."""
        for sid, first, names in self.pending:
            self.blocks.name(sid, first, names)
        self.pending.clear()
        self.evictions += len(self.blocks.evicted)
        evict = self._evict + self.blocks.evicted
        self._evict, self.blocks.evicted = [], []
        return evict

    def release(self, seq_id: int) -> None:
        self.blocks.release(seq_id)
        self.hashes.pop(seq_id, None)
        self.started.discard(seq_id)

    def forget(self, chunks: list[tuple[Seq, int, int]]) -> None:
        """A batch of these (sequence, start, n) chunks failed: stages past the one that failed never
        named its blocks, those before it did. Every stage is told to forget those names."""
        for seq, start, n in chunks:
            names = self._hashes(seq, (start + n) // BLOCK * BLOCK)[start // BLOCK :]
            self.blocks.evict(names)
            self._evict += names

    def unsent(self, chunks: list[tuple[Seq, int, int, bool]], evict: list[int]) -> None:
        """A built batch of these (sequence, start, n, first chunk) was never sent: a first chunk's
        prefix goes with the sequence's next chunk again, the names it made are forgotten (made
        again when resent), and its evictions go with the next batch."""
        self._evict = evict + self._evict
        self.forget([(seq, start, n) for seq, start, n, _ in chunks])
        for seq, _, _, first in chunks:
            if first:
                self.started.discard(seq.seq_id)

    def reset(self) -> None:
        """Forget everything; the next batch tells every stage to forget every name given so far."""
        self._evict += list(self.blocks.by_hash) + self.blocks.evicted
        self._new()

    @property
    def cached_tokens(self) -> int:
        return self.blocks.cached_blocks * BLOCK

    def _hashes(self, seq: Seq, upto: int) -> list[int]:
        """The hashes of the sequence's full blocks before token `upto` (computed once each)."""
        have = self.hashes.setdefault(seq.seq_id, [])
        blocks = upto // BLOCK
        if len(have) < blocks:
            parent = have[-1] if have else self.salt
            have += block_hashes(seq.tokens(len(have) * BLOCK, (blocks - len(have)) * BLOCK), parent)
        return have[:blocks]
