"""A draft model for speculative decoding: a smaller model with the target's vocabulary (or the
target's own 4-bit copy), all its layers on one stage: in the coordinator's process (a
`LocalPipeline`) or a stage daemon of its own (`--draft-stages`, a `RemotePipeline`).

Per speculating sequence that stage keeps a KV cache of its own (its budget, never the target
stages'): each step it is fed the tokens it has not seen (the prompt at first, then the tokens the
target took and the one after them), drops what it drafted that was not taken, and decodes k
tokens greedily, one forward each, between the target's steps (`BaseStage.draft`).
"""

from __future__ import annotations

import sys

from ..core.config import ModelConfig
from ..core.errors import HetpipeError, UserError


class DraftModel:
    """The draft model's one stage, reached through its pipeline's `draft` (the local compute
    thread, or one message to the daemon), a whole draft per call."""

    def __init__(self, pipeline, model_dir, vocab_size: int, name: str = "draft"):
        """`pipeline`: the draft model's, one stage; `model_dir`: its weights' directory here;
        `vocab_size`: the target's, which the draft's must equal."""
        if len(pipeline.stages) != 1:
            raise UserError("a draft model runs all its layers on one stage")
        draft_vocab = ModelConfig.load(model_dir).vocab_size
        if draft_vocab != vocab_size:
            raise UserError(f"the draft model's vocabulary has {draft_vocab} tokens, the target's "
                            f"{vocab_size}: a draft model shares the target's vocabulary")
        self.pipeline, self.name = pipeline, name
        self.fed: dict[int, list[int]] = {}  # seq_id -> the tokens in the draft's cache, in order
        self.failed: str | None = None  # why the draft model stopped drafting (its stage failed)

    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        """k greedy draft tokens after `tokens` (the sequence so far)."""
        fed = self.fed.get(seq_id, [])
        keep = 0
        for a, b in zip(fed, tokens[: len(tokens) - 1]):  # the last token is fed again: its logits draft
            if a != b:
                break
            keep += 1
        if self.failed:
            return []
        try:
            out = self.pipeline.draft(seq_id, keep, tokens[keep:], k)
        except HetpipeError as e:  # its daemon lost, or its KV full: decoding goes on without drafts
            self.failed = str(e) or type(e).__name__
            print(f"hetpipe: the draft model {self.name} stopped drafting: {self.failed}", file=sys.stderr)
            return []
        self.fed[seq_id] = list(tokens) + out[:-1]
        return out

    def release(self, seq_id: int) -> None:
        if self.fed.pop(seq_id, None) is not None and not self.failed:
            self.pipeline.release([seq_id])

    def close(self) -> None:
        self.pipeline.close()
