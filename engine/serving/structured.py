"""Structured output: JSON (any object, or one JSON schema) enforced while decoding, with llguidance.

The coordinator keeps each constrained request's grammar state (an `llguidance.LLMatcher`). For
every sampling step it computes the mask of tokens the grammar allows next, as numpy int32 words
(bit i of word w: token 32w + i), on a worker thread as soon as the token before is consumed (off
the engine thread), and the mask travels with the step to the last stage, where the
sampling happens (`engine.core.sampling.apply_allowed`). The sampled token comes back and advances
the matcher; once the grammar is complete the request ends with finish reason "stop". Neither
framework is needed: the stages see only a bitmask.

A schema is refused at submit (`UserError`) when it is over SCHEMA_LIMITS, when llguidance cannot
compile it within LIMITS, or when its first steps already run out of budget (the first mask, and
the mask after one allowed token, are computed then, off the engine thread). A grammar that runs
out of budget later ends its request with `GrammarFailed`, never the engine: LIMITS keep each
later step to milliseconds.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..core.errors import GrammarFailed, UserError
from .text import Tokenizer

# compact, one-line JSON as OpenAI's models write it: `{"a": 1, "b": [2, 3]}`. Free whitespace would
# let a small model pad with newlines until it runs out of tokens
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}
MAX_SCHEMA_BYTES = 128 << 10  # a JSON schema's compact JSON
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in a schema
MASKS = ThreadPoolExecutor(2, thread_name_prefix="hetpipe-mask")  # next masks, computed while the engine goes on


def _limits():
    """llguidance's budgets: its defaults, but at most 20,000 lexer states and a fifth of its initial
    regex fuel, so that a hostile schema is refused after ~20 MB and ~0.2 s rather than 300 MB and
    seconds (the defaults), and no later step can spend seconds building states. A 200-property
    schema with patterns, formats and enums compiles in 0.05 s within them."""
    import llguidance

    return llguidance.LLParserLimits(max_lexer_states=20_000, initial_lexer_fuel=200_000, verbose_errors=False)


def check_schema(schema) -> None:
    """A schema within SCHEMA_LIMITS, or a `UserError` saying which."""
    if not isinstance(schema, dict):
        raise UserError("response_format: a JSON schema is a JSON object")
    depth, stack = 0, [(schema, 1)]
    while stack:
        value, d = stack.pop()
        depth = max(depth, d)
        if depth > MAX_SCHEMA_DEPTH:
            raise UserError(f"response_format: the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise UserError(f"response_format: the JSON schema is {size} bytes; at most {MAX_SCHEMA_BYTES}")


class Grammars:
    """Compiles `response_format`s for one tokenizer. Building llguidance's view of the vocabulary
    takes about a second, so it is done once, on first use, and shared by every request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._lltok = None
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Build llguidance's view of the vocabulary now (about a second, without the GIL)."""
        self._tok()

    def _tok(self):
        import llguidance

        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(self.tokenizer.to_json(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_ids)
            return self._lltok

    def grammar(self, schema: dict | None) -> str:
        """The llguidance grammar of a JSON schema (None: any JSON object). A schema llguidance
        cannot compile, or one over SCHEMA_LIMITS, is the user's error, said in one line."""
        import llguidance

        if schema is not None:
            check_schema(schema)
        return self._compiled(lambda: llguidance.LLMatcher.grammar_from_json_schema(
            ANY_OBJECT if schema is None else schema, defaults=JSON_OPTIONS), "response_format: the JSON schema")

    def lark(self, text: str) -> str:
        """The llguidance grammar of a Lark-syntax grammar (ours: tool calls), checked as `grammar` is."""
        import llguidance

        return self._compiled(lambda: llguidance.LLMatcher.grammar_from_lark(text), "tools: their grammar")

    def _compiled(self, compile_grammar, what: str) -> str:
        """`compile_grammar()`, validated against this vocabulary within the limits; else one line."""
        import llguidance

        try:
            grammar = compile_grammar()
        except (ValueError, TypeError) as e:
            raise UserError(f"{what} is not valid: {_one_line(e)}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tok(), limits=_limits())
        if error and not error.startswith("WARNING"):
            raise UserError(f"{what} cannot be enforced: {_one_line(error)}")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        """A fresh grammar state, its first mask computed and one step tried (see the module):
        a grammar that fails there is refused with a `UserError`."""
        import llguidance

        matcher = llguidance.LLMatcher(self._tok(), grammar, log_level=0, limits=_limits())
        if matcher.is_error():
            raise UserError(f"response_format: {_one_line(matcher.get_error())}")
        c = Constraint(matcher, self.vocab_size)
        try:
            c.probe()
        except GrammarFailed as e:
            raise UserError(f"response_format: the JSON schema cannot be enforced: {e}") from None
        return c


class Constraint:
    """One request's grammar state. Used by the engine thread only, once submitted.

    The mask for the next step is computed on a worker thread (`MASKS`) as soon as a token is
    consumed: llguidance runs without the GIL while the engine thread hands the token to its
    client, checks stop strings and schedules the next batch; `mask()` then only collects it."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.words = (vocab_size + 31) // 32
        self._next: np.ndarray | Future | None = None  # the next mask, computed ahead (at submit, or after a token)
        self._done = False

    def mask(self) -> np.ndarray:
        """The tokens allowed next, as int32 bitmask words; `GrammarFailed` if the grammar ran out
        of budget or allows nothing."""
        if self._next is not None:
            out, self._next = self._next, None
            return out.result() if isinstance(out, Future) else out
        return _compute_mask(self.matcher, self.words)

    def probe(self) -> None:
        """Compute the first mask (kept for the first step), then, on a copy, take its first allowed
        token and compute the mask after it: the steps where a schema too hard for the budget fails."""
        self._next = _compute_mask(self.matcher, self.words)
        bits = np.unpackbits(self._next.view(np.uint8), bitorder="little")
        trial = self.matcher.deep_copy()
        token = int(np.flatnonzero(bits)[0])
        if not trial.consume_token(token) or trial.is_error():
            raise GrammarFailed(_one_line(trial.get_error()))
        if not trial.is_stopped():
            _compute_mask(trial, self.words)

    def copy(self) -> Constraint:
        """An independent state at the same point (another choice of the same request; made before
        it runs, when no mask is being computed)."""
        if isinstance(self._next, Future):
            self._next = self._next.result()
        c = Constraint(self.matcher.deep_copy(), 0)
        c.words, c._next = self.words, None if self._next is None else self._next.copy()
        return c

    def masks_along(self, draft: list[int]) -> tuple[np.ndarray, int]:
        """Speculative decoding: the masks of a draft's positions, (kept + 1, words), walked on a copy
        of the grammar state, and how many of the draft's tokens to keep: a draft ends before a token
        the grammar refuses or one that completes it."""
        rows, trial = [self.mask()], self.matcher.deep_copy()
        for t in draft:
            if not (int(rows[-1][t >> 5]) >> (t & 31)) & 1 or not trial.consume_token(t) or trial.is_error() \
                    or trial.is_stopped():
                break
            try:
                rows.append(_compute_mask(trial, self.words))
            except GrammarFailed:
                break
        return np.stack(rows), len(rows) - 1

    def consume(self, token_id: int) -> None:
        """Advance past a sampled token (a token the grammar refuses is an error, never silently
        kept), and start computing the next mask."""
        if isinstance(self._next, Future):
            self._next.result()  # a mask computed for a step that did not sample (never the case now)
        if not self.matcher.consume_token(token_id) or self.matcher.is_error():
            raise GrammarFailed(f"structured output stopped: token {token_id} broke the grammar: "
                                f"{_one_line(self.matcher.get_error())}")
        self._done = self.matcher.is_stopped()
        self._next = None if self._done else MASKS.submit(_compute_mask, self.matcher, self.words)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the output may follow."""
        return self._done


def _compute_mask(matcher, words: int) -> np.ndarray:
    out = np.zeros(words, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
    if matcher.is_error():
        raise GrammarFailed(f"structured output stopped: the grammar ran out of budget "
                            f"({_one_line(matcher.get_error())}); simplify the schema")
    if not out.any():
        raise GrammarFailed("structured output stopped: the grammar allows no next token")
    return out


def _one_line(text) -> str:
    return " ".join(str(text).split())[:300]
