"""Text: the tokenizer and chat template, the incremental detokenizer, and stop strings.

`tokenizers` does the BPE; jinja2 renders the chat template with the same environment
transformers' `apply_chat_template` uses, so both give the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from ..core.errors import UserError


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer in {model_dir}: tokenizer.json not found")
        self._tok = HFTokenizer.from_file(str(path))
        # encode_batch_fast (tokenizers >= 0.20) tokenizes without the GIL and without offsets: a
        # long prompt tokenized on a worker thread does not stall the server's event loop
        self._batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        self.max_token_bytes = _max_token_bytes(path)
        cfg_path = model_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        self.bos_token = _content(self.config.get("bos_token"))
        self.eos_token = _content(self.config.get("eos_token"))
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_id is not None
        self.eos_ids = self._eos_ids(model_dir)

    def _eos_ids(self, model_dir: Path) -> set[int]:
        ids = set()
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            ids.add(self._tok.token_to_id(self.eos_token))
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode(text)
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def _encode(self, text: str) -> list[int]:
        return self._batch([text], add_special_tokens=False)[0].ids

    def at_least_tokens(self, text: str) -> int:
        """A lower bound on the tokens `text` makes, from its length alone (no token covers more than
        `max_token_bytes` bytes): a prompt far past the context is refused without tokenizing it.
        0 where a normalizer may shorten text first."""
        if not self.max_token_bytes:
            return 0
        return len(text.encode("utf-8", "surrogatepass")) // self.max_token_bytes

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` holds it (llguidance builds its vocabulary from it)."""
        return self._tok.to_str()

    def special_id(self, text: str) -> int | None:
        """The id of `text` where it is one special token of the vocabulary, else None."""
        for i, added in self._tok.get_added_tokens_decoder().items():
            if added.special and added.content == text:
                return i
        return None

    def token_text(self, token_id: int) -> str:
        """One token's text as OpenAI's logprobs show it (special tokens included)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Render the model's chat template and tokenize it as transformers does (no extra BOS);
        `tools` (function definitions) go in as transformers passes them, as the `tools` variable."""
        if not self.chat_template:
            raise UserError("this model has no chat template: give the prompt as plain text")
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            **({"tools": tools} if tools is not None else {}),
        )
        return self._encode(text)


def _max_token_bytes(path: Path) -> int:
    """The most bytes of text one token stands for (0: unknown, because a normalizer may shorten
    text). Byte-level vocabularies spell one byte per character; others are bounded by their
    UTF-8 length (SentencePiece's '▁' is 3 bytes for one space, '<0x41>' 6 for one byte)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    normalizer = spec.get("normalizer")
    steps = (normalizer.get("normalizers") or [normalizer]) if isinstance(normalizer, dict) else []
    for n in steps:
        pattern = str((n.get("pattern") or {}).get("String", "?"))
        grows = n.get("type") == "Prepend" or (n.get("type") == "Replace"
                                               and len(str(n.get("content", ""))) >= len(pattern))
        if not grows:
            return 0
    model = spec.get("model") or {}
    vocab = model.get("vocab") or {}
    words = list(vocab) if isinstance(vocab, dict) else [w[0] for w in vocab if isinstance(w, list) and w]
    words += [t.get("content", "") for t in spec.get("added_tokens") or []]
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    return max((len(w) if byte_level else len(w.encode("utf-8")) for w in words), default=0)


def _content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that never split a UTF-8 character.

    Decodes a short window of recent tokens (vLLM's prefix/read offsets) and holds back output
    while the window ends in an incomplete byte sequence (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tok.decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            piece = text[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tok.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


class StopMatcher:
    """Finds stop strings across streamed pieces; holds back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str, final: bool) -> tuple[str, str | None]:
        """(the text to pass on now, the stop string found: the text ends before it)."""
        if not self.stops:
            return piece, None
        self.pending += piece
        found = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            cut, stop = min(found, key=lambda f: f[0])
            out, self.pending = self.pending[:cut], ""
            return out, stop
        if final:
            out, self.pending = self.pending, ""
            return out, None
        # hold back the longest tail that may begin a stop string (found from each stop's first
        # character: a few places, not every length)
        tail = self.pending[-max(len(s) - 1 for s in self.stops):] if max(len(s) for s in self.stops) > 1 else ""
        keep = 0
        for s in self.stops:
            i = tail.find(s[0])
            while 0 <= i and len(tail) - i > keep:
                if s.startswith(tail[i:]):
                    keep = len(tail) - i
                    break
                i = tail.find(s[0], i + 1)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, None
