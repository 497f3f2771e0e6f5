"""Tool calling on /v1/chat/completions: the tools into the prompt, calls out of the text.

The format is the one the model's chat template teaches, read from the template itself:
- `hermes` (Hermes, Qwen): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one per call;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- `llama3` (Llama 3.x JSON): `{"name": ..., "parameters": {...}}`, one call;
- `generic`, for a template that knows no tools: hetpipe's own documented format, Hermes' tags,
  taught by a system message listing the tools (`GENERIC_PROMPT`); tool results go back as user
  messages in `<tool_response>` tags.
A template that knows tools gets them as its `tools` variable, and the messages as transformers
passes them (a call's `arguments` as an object, as vLLM hands them over).

Under `tool_choice` `required`, a named function, or a function with `strict: true` when a call is
required, decoding is constrained by an llguidance grammar of the calls (`call_grammar`), so the
arguments always parse and validate. Under `auto` the text is free and calls are parsed out of it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from . import partial_json as PJ
from .guard import ParamError
from .schemas import ChatRequest, Message, Tool

GENERIC_PROMPT = ("You can call functions. These are available, as JSON schemas:\n{tools}\n"
                  "To call one, answer with <tool_call>{{\"name\": \"NAME\", \"arguments\": {{...}}}}</tool_call> "
                  "for each call, and nothing else.")
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPENERS = {"hermes": "<tool_call>", "generic": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "{"}
MARKERS = ("<tool_call>", "[TOOL_CALLS]")  # matched as one token where the vocabulary has them as special tokens


@dataclass(slots=True)
class Call:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self):
        self.id = self.id or "call_" + secrets.token_hex(12)

    def to_json(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def template_format(template: str | None) -> str:
    t = template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "tools" in t and ("<|python_tag|>" in t or '"parameters"' in t):
        return "llama3"
    return "generic"


def active(req: ChatRequest) -> bool:
    """Whether the tools take part: some are given and tool_choice is not `none`."""
    return bool(req.tools) and req.tool_choice != "none"


def check_messages(messages: list[Message]) -> None:
    for i, m in enumerate(messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ParamError("content may be null only in an assistant message with tool_calls",
                             f"messages.{i}.content")
        if m.tool_calls and m.role != "assistant":
            raise ParamError("only an assistant message has tool_calls", f"messages.{i}.tool_calls")
        if m.role == "tool" and not m.tool_call_id:
            raise ParamError("a tool message needs the tool_call_id it answers", f"messages.{i}.tool_call_id")
        for j, c in enumerate(m.tool_calls or []):
            _arguments(c.function.arguments, f"messages.{i}.tool_calls.{j}.function.arguments")


def render(req: ChatRequest, fmt: str) -> tuple[list[dict], list[dict] | None]:
    """(messages for the chat template, its `tools` variable or None)."""
    check_messages(req.messages)
    tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in req.tools or []]
    if not active(req):
        tools = []
    out = []
    for m in req.messages:
        entry: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            entry["name"] = m.name
        if fmt == "generic":
            if m.tool_calls:
                entry["content"] += "".join(f"<tool_call>{json.dumps(_wire_call(c))}</tool_call>" for c in m.tool_calls)
            if m.role == "tool":
                entry = {"role": "user", "content": f"<tool_response>{m.text()}</tool_response>"}
        else:
            if m.tool_calls:
                entry["content"] = m.text() or None
                entry["tool_calls"] = [{"id": c.id, "type": "function", "function": _wire_call(c)}
                                       for c in m.tool_calls]
            if m.role == "tool":
                entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    if fmt != "generic":
        return out, tools or None
    if tools:
        preamble = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out, None


def _wire_call(c) -> dict:
    return {"name": c.function.name, "arguments": json.loads(c.function.arguments)}


def _arguments(text: str, param: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise ParamError("a tool call's arguments are a JSON object, as text", param) from None
    if not isinstance(value, dict):
        raise ParamError("a tool call's arguments are a JSON object, as text", param)
    return value


# -- constrained decoding --------------------------------------------------------------------------

def forced(req: ChatRequest) -> list[Tool] | None:
    """The tools a call must be made to (`required`, or a named function), or None (free text)."""
    if not active(req):
        return None
    if req.tool_choice == "required":
        return list(req.tools)
    if req.tool_choice is not None and not isinstance(req.tool_choice, str):
        named = [t for t in req.tools if t.function.name == req.tool_choice.function.name]
        if not named:
            raise ParamError(f"tool_choice names {req.tool_choice.function.name!r}, which tools do not define",
                             "tool_choice")
        return named
    return None


def call_grammar(tools: list[Tool], fmt: str, parallel: bool, *, lazy: bool = False,
                 special: dict[str, int] | None = None) -> str:
    """A Lark grammar (llguidance's, JSON schemas inline) that admits only calls of `tools` whose
    arguments follow their schemas, in `fmt`'s layout: one call, or with `parallel` one or more.

    `lazy` (tool_choice `auto`): free text is allowed, and once a call's opening marker is written
    the rest must be valid calls (llguidance's lazy lexeme ends the text at the marker's first
    occurrence, as llama.cpp's lazy grammars and vLLM's structural tags do). `special` maps a
    marker that is one special token of the vocabulary to its id (it is matched as that token)."""
    key = "parameters" if fmt == "llama3" else "arguments"
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name}, key: t.function.parameters},
                      "required": ["name", key], "additionalProperties": False} for t in tools]}
    special = special or {}

    def lit(text: str) -> str:
        return f"<[{special[text]}]>" if text in special else json.dumps(text)

    head = ["start: TEXT | head ", 'TEXT: /(.|\\n)*/']  # the lazy preamble: free text, then a marker
    if fmt == "llama3":  # a call is the whole answer, from its first character
        rule = "start: call" if not lazy else "start: call | FREE\nFREE: /([^{](.|\\n)*)?/"
        return f"{rule}\ncall: %json {json.dumps(one)}"
    if fmt == "mistral":
        opener = "[TOOL_CALLS]"
        many = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        body, rules = "calls", f"calls: %json {json.dumps(many)}"
    else:
        opener, sep = "<tool_call>", "\n" if fmt == "hermes" else ""
        block = f"{json.dumps(sep)} call {json.dumps(sep + '</tool_call>')}" if sep else 'call "</tool_call>"'
        more = f' ("\\n"? {lit(opener)} {block})*' if parallel else ""
        body, rules = block + more, f"call: %json {json.dumps(one)}"
    if not lazy:
        return f"start: {lit(opener)} {body}\n{rules}"
    marker = f"head: TEXT {lit(opener)}" if opener in special else f"head[lazy]: TEXT {lit(opener)}"
    return f"%llguidance {{}}\n{head[0]}{body}\n{marker}\n{head[1]}\n{rules}"


# -- parsing ---------------------------------------------------------------------------------------

def parse(text: str, fmt: str, tools: list[Tool]) -> tuple[str | None, list[Call]]:
    """(the text that is not a call, or None when nothing is left; the calls), calls only to
    functions `tools` defines with object arguments; text that does not parse stays text."""
    names = {t.function.name for t in tools}
    found: list[tuple[object, str]] = []  # (parsed call, the text it came from)
    if fmt in ("hermes", "generic"):
        for m in HERMES_CALL.finditer(text):
            found.append((_json(m.group(1)), m.group(0)))
    elif fmt == "mistral" and "[TOOL_CALLS]" in text:
        head, _, rest = text.partition("[TOOL_CALLS]")
        items = _json(rest.strip())
        if isinstance(items, list):
            found = [(x, "") for x in items]
            text = head if all(_call(x, names, fmt) for x in items) else text
    elif fmt == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        parts = [_json(p) for p in body.split(";")] if body.startswith("{") else []
        if parts and all(_call(x, names, fmt) for x in parts):
            found, text = [(x, "") for x in parts], ""
    calls = []
    for value, source in found:
        call = _call(value, names, fmt)
        if call is None:
            continue
        calls.append(call)
        if source:
            text = text.replace(source, "", 1)
    if not calls:
        return text, []
    text = text.strip()
    return text or None, calls


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(value, names: set[str], fmt: str) -> Call | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("parameters" if fmt == "llama3" and "parameters" in value else "arguments", {})
    if isinstance(args, str):
        args = _json(args)
    if not isinstance(args, dict):
        return None
    return Call(value["name"], json.dumps(args))


class StreamedCalls:
    """A streamed answer's text with tools. Content passes through until a call's opening marker;
    from there the text is held and read as it grows (`partial_json`): a call is announced once its
    `name` is complete (`("call", index, Call)`), and its `arguments` object goes out in pieces as
    it is written (`("arguments", index, text)`); the pieces joined are the arguments' JSON text.
    Text after a call's marker is never content; `finish` says which calls are complete."""

    def __init__(self, fmt: str, tools: list[Tool], forced_call: bool, parallel: bool = True):
        self.fmt, self.tools, self.parallel = fmt, tools, parallel
        self.names = {t.function.name for t in tools}
        self.opener = OPENERS[fmt]
        self.text, self.sent, self.held = "", 0, forced_call  # a forced call is held from its first token
        self.calls: list[Call] = []  # announced, with the arguments text sent so far
        self.ends: list[int | None] = []  # each announced call's arguments end (None: still open)
        self.args_at: list[int | None] = []  # where each announced call's arguments start, once seen
        self.scans: dict[int, PJ.Scan] = {}  # the held text's values as read so far, by start (it only grows)

    def feed(self, piece: str) -> tuple[str, list[tuple]]:
        """(the part of `piece` to stream as content now, the call events it completes)."""
        self.text += piece
        if self.held:
            return "", self._events()
        at = self.text.find(self.opener, self.sent)
        if at >= 0 and (self.fmt != "llama3" or not self.text[:at].strip()):
            self.held = True
            out, self.sent = self.text[self.sent : at], at
            return out, self._events()
        # keep back what could be the start of the marker
        keep = next((k for k in range(min(len(self.opener) - 1, len(self.text) - self.sent), 0, -1)
                     if self.opener.startswith(self.text[-k:])), 0)
        if self.fmt == "llama3" and not self.text.strip():
            keep = len(self.text) - self.sent
        out, self.sent = self.text[self.sent : len(self.text) - keep], len(self.text) - keep
        return out, []

    def _starts(self, held: str) -> list[int]:
        """Where each call object begins in the held text."""
        if self.fmt == "mistral":
            j = PJ.skip_ws(held, len(self.opener))
            return PJ.object_starts(held, j + 1, ",", self.scans) if held[j : j + 1] == "[" else []
        if self.fmt == "llama3":
            j = PJ.skip_ws(held, 0)
            return PJ.object_starts(held, j + len("<|python_tag|>") * held.startswith("<|python_tag|>", j), ";",
                                    self.scans)
        starts, at = [], 0
        while (at := held.find(self.opener, at)) >= 0:
            j = PJ.skip_ws(held, at + len(self.opener))
            if held[j : j + 1] != "{":
                break
            starts.append(j)
            end = PJ.value_end(held, j, self.scans)
            if end is None:
                break
            at = end
        return starts

    def _events(self) -> list[tuple]:
        held, events = self.text[self.sent :], []
        key = "parameters" if self.fmt == "llama3" else "arguments"
        for n, start in enumerate(self._starts(held)):
            if n >= len(self.calls):
                fields, _ = PJ.members(held, start, self.scans)
                name = fields.get("name")
                if not (self.parallel or n == 0) or name is None or name[1] is None:
                    break
                if (value := _json(held[name[0] : name[1]])) not in self.names:
                    break
                self.calls.append(Call(value, ""))
                self.ends.append(None)
                self.args_at.append(None)
                events.append(("call", n, self.calls[n]))
            if self.ends[n] is not None:
                continue
            if self.args_at[n] is None:
                arguments = PJ.members(held, start, self.scans)[0].get(key)
                if arguments is None or held[arguments[0]] != "{":
                    continue  # not written yet, or not an object (`finish` reads it whole)
                self.args_at[n] = arguments[0]
            at = self.args_at[n]
            end = PJ.value_end(held, at, self.scans)
            text = held[at : end or len(held)]
            if piece := text[len(self.calls[n].arguments) :]:
                events.append(("arguments", n, piece))
                self.calls[n].arguments = text
            self.ends[n] = end
        return events

    def finish(self) -> tuple[str, list[tuple], list[Call]]:
        """(content still to stream, the call events still to send, the complete calls). A call
        announced but cut off (max_tokens) is not among the complete ones."""
        rest = self.text[self.sent :]
        events = self._events() if self.held else []
        if self.calls:
            done = [c for c, end in zip(self.calls, self.ends) if end is not None and _json(c.arguments) is not None]
            return "", events, done if len(done) == len(self.calls) else []
        left, calls = parse(rest, self.fmt, self.tools)
        calls = calls if self.parallel else calls[:1]
        for n, call in enumerate(calls):  # calls that could not be read as they came (arguments as a string)
            events += [("call", n, call), ("arguments", n, call.arguments)]
        return (left or "") if calls else rest, events, calls
