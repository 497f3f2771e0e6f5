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

from .guard import ParamError
from .schemas import ChatRequest, Message, Tool

GENERIC_PROMPT = ("You can call functions. These are available, as JSON schemas:\n{tools}\n"
                  "To call one, answer with <tool_call>{{\"name\": \"NAME\", \"arguments\": {{...}}}}</tool_call> "
                  "for each call, and nothing else.")
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPENERS = {"hermes": "<tool_call>", "generic": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "{"}


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


def call_grammar(tools: list[Tool], fmt: str, parallel: bool) -> str:
    """A Lark grammar (llguidance's, JSON schemas inline) that admits only calls of `tools` whose
    arguments follow their schemas, in `fmt`'s layout: one call, or with `parallel` one or more."""
    key = "parameters" if fmt == "llama3" else "arguments"
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name}, key: t.function.parameters},
                      "required": ["name", key], "additionalProperties": False} for t in tools]}
    if fmt == "mistral":
        many = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return f'start: "[TOOL_CALLS]" calls\ncalls: %json {json.dumps(many)}'
    if fmt == "llama3":
        return f"start: call\ncall: %json {json.dumps(one)}"
    sep = "\\n" if fmt == "hermes" else ""
    block = f'"<tool_call>{sep}" call "{sep}</tool_call>"'
    return f"start: {block}{'(' + block + ')*' if parallel else ''}\ncall: %json {json.dumps(one)}"


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
    """A chat stream's text with tools: content passes through until a call's opening marker;
    from there the text is held, and parsed at the end into calls (`finish`)."""

    def __init__(self, fmt: str, tools: list[Tool], forced_call: bool):
        self.fmt, self.tools = fmt, tools
        self.opener = OPENERS[fmt]
        self.text, self.sent, self.held = "", 0, forced_call  # a forced call is held from its first token

    def feed(self, piece: str) -> str:
        """The part of `piece` to stream as content now."""
        self.text += piece
        if self.held:
            return ""
        at = self.text.find(self.opener, self.sent)
        if at >= 0 and (self.fmt != "llama3" or not self.text[:at].strip()):
            self.held = True
            out, self.sent = self.text[self.sent : at], at
            return out
        # keep back what could be the start of the marker
        keep = next((k for k in range(min(len(self.opener) - 1, len(self.text) - self.sent), 0, -1)
                     if self.opener.startswith(self.text[-k:])), 0)
        if self.fmt == "llama3" and not self.text.strip():
            keep = len(self.text) - self.sent
        out, self.sent = self.text[self.sent : len(self.text) - keep], len(self.text) - keep
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """(content still to stream, the calls)."""
        rest = self.text[self.sent :]
        left, calls = parse(rest, self.fmt, self.tools)
        return (left or "") if calls else rest, calls
