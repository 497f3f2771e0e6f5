"""The coordinator's generation loop: tokenize, prefill, decode, detokenize. Streaming is the primitive.

    gen = Generator(model_dir, pipeline)
    for piece in gen.stream("Hello", max_tokens=32):
        print(piece.text, end="")
    result = gen.generate("Hello", max_tokens=32)   # joins stream()
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator, Sequence

import numpy as np

from .config import ModelConfig
from .errors import UserError
from .pipeline import Pipeline
from .sampling import SamplingParams
from .stage import SeqChunk, StageBatch
from .tokenizer import IncrementalDetokenizer, Tokenizer

PREFILL_CHUNK = 512  # prompt tokens per stage call: bounds activation memory on long prompts


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

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.start) * 1000 if self.first else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        span = (self.last or 0.0) - (self.first or 0.0)
        return (self.tokens - 1) / span if span > 0 else 0.0


@dataclass(slots=True)
class GenerationResult:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[dict]
    finish_reason: str
    ttft_ms: float
    decode_tokens_per_s: float
    stages: list[dict]

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class Generator:
    def __init__(self, model_dir: str | Path, pipeline: Pipeline):
        self.cfg = ModelConfig.load(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        self.pipeline = pipeline
        self.eos_ids = self.tokenizer.eos_ids | set(self.cfg.eos_token_ids)
        self._ids = itertools.count()
        self.last_timing: Timing | None = None

    def prompt_ids(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return self.tokenizer.apply_chat_template(prompt)
        if chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def stream(self, prompt: str | list[dict] | Sequence[int], *, chat: bool = False, max_tokens: int = 128,
               sampling: SamplingParams | None = None, stop: Sequence[str] = ()) -> Iterator[GenerationChunk]:
        """Yield one `GenerationChunk` per generated token; the last carries `finish_reason`.

        `prompt` is text, a chat message list, or token ids. With `chat`, text becomes one user turn.
        """
        sampling = sampling or SamplingParams()
        ids = list(prompt) if _is_ids(prompt) else self.prompt_ids(prompt, chat)
        self._check_prompt(ids, max_tokens)
        seq_id = next(self._ids)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = _StopMatcher(stop)
        timing = self.last_timing = Timing(time.perf_counter())
        try:
            tok = self._prefill(seq_id, ids, sampling)
            for n in itertools.count(1):
                timing.last, timing.tokens = time.perf_counter(), n
                timing.first = timing.first or timing.last
                finish = self._finish_reason(tok.token_id, n, len(ids) + n, max_tokens)
                piece = "" if tok.token_id in self.eos_ids else detok.add(tok.token_id)
                if finish:
                    piece += detok.flush()
                text, hit = stops.feed(piece, final=finish is not None)
                if hit:
                    finish = "stop"
                yield GenerationChunk(tok.token_id, text, tok.logprob, tok.top, finish)
                if finish:
                    return
                chunk = SeqChunk(seq_id, len(ids) + n - 1, np.array([tok.token_id], np.int32), sampling)
                tok = self.pipeline.forward(StageBatch([chunk]))[0]
        finally:
            self.pipeline.release([seq_id])

    def generate(self, prompt, *, chat: bool = False, **kw) -> GenerationResult:
        """Run `stream()` to the end and collect the result (same arguments)."""
        sampling = kw.get("sampling") or SamplingParams()
        prompt_ids = list(prompt) if _is_ids(prompt) else self.prompt_ids(prompt, chat)
        chunks = list(self.stream(prompt_ids, **kw))
        t = self.last_timing
        logprobs = []
        for c in chunks:
            entry = {"token_id": c.token_id, "logprob": c.logprob}
            if sampling.logprobs > 1:
                entry["top"] = [{"token_id": i, "logprob": lp} for i, lp in c.top]
            logprobs.append(entry)
        return GenerationResult(
            text="".join(c.text for c in chunks),
            prompt_token_ids=prompt_ids,
            token_ids=[c.token_id for c in chunks],
            logprobs=logprobs,
            finish_reason=chunks[-1].finish_reason,
            ttft_ms=t.ttft_ms,
            decode_tokens_per_s=t.decode_tokens_per_s,
            stages=self.pipeline.describe(),
        )

    def _check_prompt(self, ids: list[int], max_tokens: int) -> None:
        ctx = self.cfg.max_position_embeddings
        if not ids:
            raise UserError("empty prompt")
        if max_tokens < 1:
            raise UserError("max tokens must be at least 1")
        if len(ids) >= ctx:
            raise UserError(f"prompt is {len(ids)} tokens; the model's context is {ctx}")
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
            raise UserError(f"prompt token ids must be in 0..{self.cfg.vocab_size - 1}")

    def _prefill(self, seq_id: int, ids: list[int], sampling: SamplingParams):
        arr = np.asarray(ids, dtype=np.int32)
        for start in range(0, len(arr), PREFILL_CHUNK):
            part = arr[start : start + PREFILL_CHUNK]
            last = start + len(part) == len(arr)
            out = self.pipeline.forward(StageBatch([SeqChunk(seq_id, start, part, sampling if last else None)]))
        return out[0]

    def _finish_reason(self, token_id: int, n: int, length: int, max_tokens: int) -> str | None:
        if token_id in self.eos_ids:
            return "stop"
        if n >= max_tokens or length >= self.cfg.max_position_embeddings:
            return "length"
        return None


def _is_ids(prompt) -> bool:
    return not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], dict)


class _StopMatcher:
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
