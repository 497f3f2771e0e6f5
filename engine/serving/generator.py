"""The coordinator's API: tokenize, submit to the serving engine, stream chunks back, detokenized.

    with Generator(model_dir, pipeline) as gen:                  # closes the engine and the pipeline
    for piece in gen.stream("Hello", max_tokens=32):             # synchronous
        print(piece.text, end="")
    async for piece in gen.astream("Hello", max_tokens=32): ...   # asyncio
    result = gen.generate("Hello", max_tokens=32)                 # joins stream()
    results = gen.generate_batch(["Hi", "Bye"], max_tokens=32)    # many at once, batched

Every call may come from any thread at any time: requests join the running batch (continuous
batching, see `engine.Engine`). Leaving a stream early cancels its request and frees its KV caches.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.config import ModelConfig
from ..core.errors import StageFailure, UserError
from ..core.pipeline import Pipeline
from ..core.sampling import SamplingParams
from .aio import get_within
from .engine import Engine, EngineConfig
from .request import Request
from .output import GenerationChunk, Timing, percentiles
from .structured import Constraint, Grammars, check_schema
from .text import Tokenizer

__all__ = ["AsyncStream", "GenerationChunk", "GenerationResult", "Generator", "Stream", "Timing"]

GRAMMAR_CACHE = 64  # compiled grammars kept, by schema
CONSUMER_CHECK_S = 1.0  # a stream waiting for its next token checks this often that the engine lives


@dataclass(slots=True)
class GenerationResult:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[dict]
    finish_reason: str
    cached_tokens: int  # prompt tokens found in the prefix cache (not prefilled again)
    ttft_ms: float
    decode_tokens_per_s: float
    stages: list[dict]
    profile: dict  # ttft, inter-token latency percentiles, per-stage compute and wire time (see output.Profile)
    prompt_logprobs: list[dict] | None = None  # where asked: per prompt token, as `logprobs` (the first: None)
    speculative: dict | None = None  # speculative decoding: {"drafted", "accepted"} draft tokens (None: off)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class Generator:
    """Text in, text out, over a pipeline, which it owns: `close()` (or leaving a `with` block)
    closes the engine, joining its thread, and then the pipeline.

    Engine options (`inflight`, `max_seqs`, `max_queue`, `max_batch_tokens`, `prefill_with_decode`,
    `recovery_timeout_s`, `prefix_cache`, `speculative`: a `SpeculativeConfig`) are `EngineConfig`'s
    fields. `pipeline=None`: tokenizing only.
    """

    def __init__(self, model_dir: str | Path, pipeline: Pipeline | None, **engine_opts):
        self.pipeline = pipeline
        self.engine = None
        try:
            self.cfg = ModelConfig.load(model_dir)
            self.tokenizer = Tokenizer(model_dir)
            self.eos_ids = self.tokenizer.eos_ids | set(self.cfg.eos_token_ids)
            self.grammars = Grammars(self.tokenizer, self.cfg.vocab_size, self.eos_ids)
            self._grammar_cache: dict[str, str | UserError] = {}  # by schema: its grammar, or why it was refused
            self._grammar_lock = threading.Lock()  # requests are prepared on several threads
            if pipeline is not None:
                self.engine = Engine(pipeline, self.tokenizer, eos_ids=self.eos_ids,
                                     context=self.cfg.max_position_embeddings, vocab_size=self.cfg.vocab_size,
                                     position_limit=self._position_limit(), config=EngineConfig(**engine_opts))
        except BaseException:
            if pipeline is not None:
                pipeline.close()  # it was given to us: nobody else will close it
            raise
        if self.engine is not None:
            # a Generator dropped without close() is closed when collected (not at exit: see LocalPipeline)
            self._finalizer = weakref.finalize(self, _close, self.engine, pipeline)
            self._finalizer.atexit = False
        self.last_timing: Timing | None = None  # of the latest request submitted

    def _position_limit(self) -> tuple[int, str] | None:
        if self.cfg.context_limit is None:
            return None
        return (self.cfg.context_limit, "the model's LongRoPE switches to its long factors there, which hetpipe "
                                         "does not implement yet")

    def prompt_ids(self, prompt: str | list[dict] | Sequence[int], chat: bool = False) -> list[int]:
        """Text, a chat message list, or token ids. With `chat`, text becomes one user turn."""
        if not isinstance(prompt, (str, list, tuple)):
            raise UserError("a prompt is text, a list of chat messages, or a list of token ids")
        if not prompt and not isinstance(prompt, str):
            raise UserError("empty prompt")
        if _is_ids(prompt):
            return list(prompt)
        if isinstance(prompt, list):
            return self.tokenizer.apply_chat_template(prompt)
        if not isinstance(prompt, str):
            raise UserError("a prompt is text, a list of chat messages, or a list of token ids")
        if chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def stream(self, prompt, *, chat: bool = False, max_tokens: int = 128, sampling: SamplingParams | None = None,
               stop: Sequence[str] = (), ignore_eos: bool = False, json_schema: dict | bool | None = None,
               constraint: Constraint | None = None, prompt_logprobs: int | None = None, speculate: bool = True,
               prediction: Sequence[int] | None = None) -> Stream:
        """Submit now; iterate for one `GenerationChunk` per token, the last with `finish_reason`.

        `json_schema`: structured output, enforced while decoding: True for any JSON object, or a
        JSON schema the output will follow. The request ends ("stop") when the JSON is complete.
        `constraint`: the same, made ahead by `constraint()` (on another thread, say).
        `prompt_logprobs`: the first chunk also scores each prompt token given those before it,
        with this many alternatives (the prompt is then computed whole, not taken from the cache).
        `speculate=False`: this request does not speculate though the engine does (`SpeculativeConfig`).
        `prediction`: token ids the output is expected to repeat (OpenAI's Predicted Outputs): drafts
        verified several a step, whether or not the engine speculates otherwise.

        Closing the stream early (`close()`, leaving a for loop over it, or dropping it) cancels
        the request. `Stream.timing` holds its clock readings.
        """
        q: queue.SimpleQueue = queue.SimpleQueue()
        return Stream(self, self._submit(prompt, chat, max_tokens, sampling, stop, ignore_eos, json_schema, constraint,
                                         q.put, prompt_logprobs, speculate, prediction), q)

    def astream(self, prompt, *, chat: bool = False, max_tokens: int = 128,
                sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                ignore_eos: bool = False, json_schema: dict | bool | None = None,
                constraint: Constraint | None = None, prompt_logprobs: int | None = None, speculate: bool = True,
                prediction: Sequence[int] | None = None) -> AsyncStream:
        """`stream` for asyncio, called on the event loop: submitted at once (bad input raises
        here, before any chunk), then `async for` the chunks the engine thread hands this loop.

        `aclose()` (or cancelling the task iterating it, or dropping it) cancels the request.
        """
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue = asyncio.Queue()

        def deliver(item):
            try:
                loop.call_soon_threadsafe(aq.put_nowait, item)
            except RuntimeError:
                pass  # the loop has closed: nobody is listening any more

        return AsyncStream(self, self._submit(prompt, chat, max_tokens, sampling, stop, ignore_eos, json_schema,
                                              constraint, deliver, prompt_logprobs, speculate, prediction), aq)

    def generate(self, prompt, *, chat: bool = False, **kw) -> GenerationResult:
        """Run `stream()` to the end and collect the result (same arguments)."""
        prompt_ids = self.prompt_ids(prompt, chat)
        st = self.stream(prompt_ids, **kw)
        return self._result(prompt_ids, list(st), st.request, kw.get("sampling"))

    def generate_batch(self, prompts: Sequence, *, chat: bool = False, max_tokens: int | Sequence[int] = 128,
                       sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                       stop: Sequence[str] = (), ignore_eos: bool = False) -> list[GenerationResult]:
        """Generate for every prompt at once (one batch); `max_tokens` and `sampling` may be per prompt.

        Results come back in the order of `prompts`. If any request fails, the others are cancelled
        and the error is raised.
        """
        n = len(prompts)
        max_tokens = _per_prompt(max_tokens, n, "max_tokens")
        sampling = _per_prompt(sampling, n, "sampling")
        ids = [self.prompt_ids(p, chat) for p in prompts]
        streams: list[Stream] = []
        try:
            for i in range(n):
                streams.append(self.stream(ids[i], max_tokens=max_tokens[i], sampling=sampling[i], stop=stop,
                                           ignore_eos=ignore_eos))
            return [self._result(ids[i], list(st), st.request, sampling[i]) for i, st in enumerate(streams)]
        finally:
            for st in streams:
                st.close()  # after a failure, the others are cancelled

    def close(self) -> None:
        """Finish the batches in flight, end other requests, join the engine thread, close the pipeline."""
        if self.engine is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def grammar_constraint(self, lark: str) -> Constraint:
        """A fresh grammar state for a grammar in llguidance's Lark syntax (`%json {...}` inlines a
        JSON schema): tool calls' constrained decoding. Compiled once per grammar, like `constraint`."""
        return self._cached_constraint("lark:" + lark, lambda: self.grammars.lark(lark))

    def constraint(self, json_schema: dict | bool) -> Constraint:
        """A fresh grammar state for structured output (the grammar compiled once per schema; its
        first step computed now). A schema over the limits or too hard to enforce is a `UserError`.
        Takes up to seconds for a hard schema, without the GIL: call it off an event loop."""
        if json_schema is not True and not isinstance(json_schema, dict):
            raise UserError("json_schema is True (any JSON object) or a JSON schema (a dict)")
        if json_schema is not True:
            check_schema(json_schema)  # before json.dumps walks it
        key = "" if json_schema is True else json.dumps(json_schema, sort_keys=True)
        return self._cached_constraint(key, lambda: self.grammars.grammar(None if json_schema is True else json_schema))

    def _cached_constraint(self, key: str, compile_grammar) -> Constraint:
        with self._grammar_lock:
            grammar = self._grammar_cache.get(key)
        if isinstance(grammar, UserError):  # refused before: refused again at once, not after seconds
            raise grammar
        try:
            if grammar is None:
                grammar = compile_grammar()
            return self.grammars.constraint(grammar)
        except UserError as e:
            grammar = UserError(str(e))  # without its traceback, whose frames hold the matcher (and its memory)
            raise
        finally:
            with self._grammar_lock:
                if grammar is not None and key not in self._grammar_cache:
                    if len(self._grammar_cache) >= GRAMMAR_CACHE:
                        self._grammar_cache.pop(next(iter(self._grammar_cache)))
                    self._grammar_cache[key] = grammar

    def _submit(self, prompt, chat, max_tokens, sampling, stop, ignore_eos, json_schema, constraint,
                deliver, prompt_logprobs=None, speculate=True, prediction=None) -> Request:
        if self.engine is None:
            raise UserError("this Generator has no pipeline to generate with")
        ids = self.prompt_ids(prompt, chat)
        if constraint is None and json_schema not in (None, False):
            constraint = self.constraint(json_schema)
        req = self.engine.submit(ids, max_tokens=max_tokens, sampling=sampling, stop=stop, ignore_eos=ignore_eos,
                                 constraint=constraint, prompt_logprobs=prompt_logprobs, speculate=speculate,
                                 prediction=prediction, deliver=deliver)
        self.last_timing = req.timing
        return req

    def _check_engine(self) -> None:
        if self.engine.error is not None:
            raise StageFailure(f"the serving engine stopped: {self.engine.error!r}")

    def _result(self, prompt_ids, chunks: list[GenerationChunk], req: Request, sampling) -> GenerationResult:
        top_wanted = sampling is not None and sampling.logprobs > 1
        logprobs = []
        for c in chunks:
            entry = {"token_id": c.token_id, "logprob": c.logprob}
            if top_wanted:
                entry["top"] = [{"token_id": i, "logprob": lp} for i, lp in c.top]
            logprobs.append(entry)
        return GenerationResult(
            text="".join(c.text for c in chunks),
            prompt_token_ids=prompt_ids,
            token_ids=[c.token_id for c in chunks],
            logprobs=logprobs,
            finish_reason=chunks[-1].finish_reason,
            cached_tokens=req.cached_tokens,
            ttft_ms=req.timing.ttft_ms,
            decode_tokens_per_s=req.timing.decode_tokens_per_s,
            stages=(stages := self.pipeline.describe()),
            profile={"ttft_ms": req.timing.ttft_ms, **percentiles("itl_ms", [g * 1000 for g in req.timing.gaps]),
                     **req.profile.to_json(stages)},
            prompt_logprobs=None if chunks[0].prompt_logprobs is None else [
                {"token_id": t, "logprob": lp, "top": [{"token_id": i, "logprob": v} for i, v in top]}
                for t, lp, top in chunks[0].prompt_logprobs],
            speculative=req.speculative,
        )


class Stream:
    """The chunks of one request, as they come. Not finished and dropped: the request is cancelled.

    `timing` (clock readings) and `profile` (per-stage compute and wire time) fill in as it runs.
    """

    def __init__(self, gen: Generator, req: Request, q: queue.SimpleQueue):
        self.gen, self.request, self._q = gen, req, q
        self.seq_id, self.timing, self.profile = req.seq_id, req.timing, req.profile
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self) -> GenerationChunk:
        if self._finished:
            raise StopIteration
        while True:
            try:
                item = self._q.get(timeout=CONSUMER_CHECK_S)
                break
            except queue.Empty:
                self.gen._check_engine()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = item.finish_reason is not None
        return item

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self.gen.engine.cancel(self.seq_id)

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncStream(Stream):
    """`Stream` for asyncio: `async for` its chunks. Cancelled like a `Stream` when closed early,
    also when the task iterating it is cancelled (the chunk it was waiting for never comes)."""

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._finished:
            raise StopAsyncIteration
        while True:
            try:
                item = await get_within(self._q, CONSUMER_CHECK_S)
                break
            except asyncio.TimeoutError:
                self._check_engine()
            except BaseException:  # cancelled while waiting: nobody will read the rest
                self.close()
                raise
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = item.finish_reason is not None
        return item

    def _check_engine(self) -> None:
        try:
            self.gen._check_engine()
        except BaseException:
            self._finished = True
            raise

    async def aclose(self) -> None:
        self.close()


def _close(engine: Engine, pipeline: Pipeline) -> None:
    engine.close()
    pipeline.close()
    spec = engine.config.speculative
    if spec is not None and spec.draft is not None:
        spec.draft.close()  # the draft model's stage, owned with the pipeline


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _is_ids(prompt) -> bool:
    return not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], dict)
