"""Structured output: JSON (any object, or one JSON schema) enforced while decoding, with llguidance.

The coordinator keeps each constrained request's grammar state (an `llguidance.LLMatcher`). Before
every sampling step it computes the mask of tokens the grammar allows next, as numpy int32 words
(bit i of word w: token 32w + i), and the mask travels with the step to the last stage, where the
sampling happens (`engine.core.sampling.apply_allowed`). The sampled token comes back and advances
the matcher; once the grammar is complete the request ends with finish reason "stop". Neither
framework is needed: the stages see only a bitmask.
"""

from __future__ import annotations

import threading

import numpy as np

from ..core.errors import UserError
from .text import Tokenizer

# compact, one-line JSON as OpenAI's models write it: `{"a": 1, "b": [2, 3]}`. Free whitespace would
# let a small model pad with newlines until it runs out of tokens
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


class Grammars:
    """Compiles `response_format`s for one tokenizer. Building llguidance's view of the vocabulary
    takes about a second, so it is done once, on first use, and shared by every request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._lltok = None
        self._lock = threading.Lock()

    def _tok(self):
        import llguidance

        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(self.tokenizer.to_json(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_ids)
            return self._lltok

    def grammar(self, schema: dict | None) -> str:
        """The llguidance grammar of a JSON schema (None: any JSON object). A schema llguidance
        cannot compile is the user's error, said in one line."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT if schema is None else schema,
                                                                    defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise UserError(f"response_format: the JSON schema is not valid: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tok())
        if error and not error.startswith("WARNING"):
            raise UserError(f"response_format: the JSON schema cannot be enforced: {_one_line(error)}")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        import llguidance

        matcher = llguidance.LLMatcher(self._tok(), grammar, log_level=0)
        if matcher.is_error():
            raise UserError(f"response_format: {_one_line(matcher.get_error())}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state. Used by the engine thread only."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.words = (vocab_size + 31) // 32

    def mask(self) -> np.ndarray:
        """The tokens allowed next, as int32 bitmask words."""
        out = np.zeros(self.words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        return out

    def consume(self, token_id: int) -> None:
        """Advance past a sampled token; a token the grammar refuses is an error (never silently kept)."""
        if not self.matcher.consume_token(token_id) or self.matcher.is_error():
            raise RuntimeError(f"structured output: token {token_id} broke the grammar: "
                               f"{_one_line(self.matcher.get_error())}")

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the output may follow."""
        return self.matcher.is_stopped()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]
