"""A draft model for speculative decoding: a smaller model with the target's vocabulary (or the
target's own 4-bit copy), all its layers on one in-process stage in the coordinator's process.

Per speculating sequence it keeps a KV cache of its own (its stage's budget, never the target
stages'): each step it is fed the tokens it has not seen (the prompt at first, then the tokens the
target took and the one after them), drops what it drafted that was not taken, and decodes k
tokens greedily, one forward each, between the target's steps.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import UserError
from ..core.sampling import SamplingParams
from ..core.stage import SeqChunk, StageBatch

GREEDY = SamplingParams()


class DraftModel:
    """The draft model's one stage, on a `LocalPipeline` of its own: its compute thread runs it (the
    engine thread never runs a framework op), a whole draft in one hand-over."""

    def __init__(self, pipeline, vocab_size: int, name: str = "draft"):
        (stage,) = pipeline.stages
        if not (stage.info.is_first and stage.info.is_last):
            raise UserError("a draft model runs all its layers on one stage")
        if stage.cfg.vocab_size != vocab_size:
            raise UserError(f"the draft model's vocabulary has {stage.cfg.vocab_size} tokens, the target's "
                            f"{vocab_size}: a draft model shares the target's vocabulary")
        self.pipeline, self.name = pipeline, name
        self.fed: dict[int, list[int]] = {}  # seq_id -> the tokens in the draft's cache, in order

    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        """k greedy draft tokens after `tokens` (the sequence so far)."""
        fed = self.fed.get(seq_id, [])
        keep = 0
        for a, b in zip(fed, tokens[: len(tokens) - 1]):  # the last token is fed again: its logits draft
            if a != b:
                break
            keep += 1
        out = self.pipeline.call(lambda stages: _draft(stages[0], seq_id, tokens, keep, len(fed), k))
        self.fed[seq_id] = list(tokens) + out[:-1]
        return out

    def release(self, seq_id: int) -> None:
        if self.fed.pop(seq_id, None) is not None:
            self.pipeline.release([seq_id])

    def close(self) -> None:
        self.pipeline.close()


def _draft(stage, seq_id: int, tokens: list[int], keep: int, cached: int, k: int) -> list[int]:
    """On the compute thread: drop what is not kept, feed the rest, decode k tokens greedily."""
    if keep < cached:
        stage.truncate(seq_id, keep)
    r = stage.forward(StageBatch([SeqChunk(seq_id, keep, np.asarray(tokens[keep:], np.int32), GREEDY)]))
    out = [r.tokens[0].token_id]
    for i in range(k - 1):
        r = stage.forward(StageBatch([SeqChunk(seq_id, len(tokens) + i, np.asarray(out[-1:], np.int32), GREEDY)]))
        out.append(r.tokens[0].token_id)
    return out
