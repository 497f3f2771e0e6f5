"""`POST /v1/messages`, Anthropic's Messages API, on the chat path.

A request becomes a chat request (`system` a system message; `text` blocks text; an assistant's
`tool_use` blocks its tool calls; a user's `tool_result` blocks tool messages, before its text;
`tools` with their `input_schema` as chat tools; `tool_choice` auto/any/tool/none as auto/required/
named/none, `disable_parallel_tool_use` as `parallel_tool_calls: false`; `stop_sequences` as stop)
and is planned, run and parsed as chat is (`completions.py`, `tools.py`). The answer is a `message`
whose `content` holds a text block and any `tool_use` blocks, `stop_reason` one of `end_turn`,
`max_tokens`, `stop_sequence` (with the `stop_sequence` met) or `tool_use`; `output_config.format`
(a JSON schema) is structured output as chat's `response_format`; streamed, it is
Anthropic's event sequence (`message_start`, per block `content_block_start`, `content_block_delta`s
of `text_delta` or `input_json_delta`, `content_block_stop`, then `message_delta` with the stop
reason and usage, `message_stop`). Errors are in Anthropic's shape (`guard.anthropic_error`).

Refused by name: a final assistant message (Anthropic's prefill: continuing it is not done here),
image and document blocks, `thinking`, `output_config.effort` and the hosted service's own fields
(not in the schema). `cache_control` marks are taken: hetpipe's prefix cache keeps every prompt's
blocks without being asked. `temperature`, `top_p` and `top_k`, gone from the newest client's
signature, are still taken (older clients send them).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError
from starlette.responses import JSONResponse

from ...serving.generator import Generator
from . import blocks as B
from . import completions as C
from .guard import ParamError, anthropic_error, parse_json, validation_message
from .request_path import ApiKind, RequestPath, framed
from .schemas import FUNCTION_NAME, MAX_MESSAGES, MAX_NAME, MAX_PARTS, MAX_STOPS, MAX_TOOLS, Bool, ChatRequest, \
    StopString, Strict

class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: str | None = Field(default=None, max_length=16)


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list | None = None  # as a client echoes an answer back


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str = Field(max_length=MAX_NAME)
    name: str = Field(pattern=FUNCTION_NAME)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(max_length=MAX_NAME)
    content: str | Annotated[list[TextBlock], Field(max_length=MAX_PARTS)] = ""
    is_error: Bool = False
    cache_control: CacheControl | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class InputMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Field(max_length=MAX_PARTS)]


class ToolDef(Strict):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)
    disable_parallel_tool_use: Bool = False


class Metadata(Strict):
    user_id: str | None = Field(default=None, max_length=MAX_NAME)


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: OutputFormat | None = None  # structured output, as response_format json_schema


class MessagesRequest(Strict):
    model: str | None = Field(default=None, max_length=MAX_NAME)
    max_tokens: int = Field(ge=1, le=2**31 - 1)
    messages: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | Annotated[list[TextBlock], Field(max_length=MAX_PARTS)] | None = None
    stop_sequences: Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    stream: Bool = False
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1 << 20)
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    cache_control: CacheControl | None = None
    output_config: OutputConfig | None = None


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def _chat_messages(req: MessagesRequest) -> list[dict]:
    out = [{"role": "system", "content": _text(req.system)}] if req.system else []
    for i, m in enumerate(req.messages):
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        texts = "".join(b.text for b in blocks if b.type == "text")
        if m.role == "assistant":
            if i == len(req.messages) - 1:
                raise ParamError("a final assistant message (a prefill to continue) is not supported: end with a "
                                 "user message", f"messages.{i}")
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in blocks if b.type == "tool_use"]
            if any(b.type == "tool_result" for b in blocks):
                raise ParamError("tool_result blocks go in a user message", f"messages.{i}.content")
            out.append({"role": "assistant", "content": texts or None, "tool_calls": calls} if calls
                       else {"role": "assistant", "content": texts})
            continue
        if any(b.type == "tool_use" for b in blocks):
            raise ParamError("tool_use blocks go in an assistant message", f"messages.{i}.content")
        for b in blocks:
            if b.type == "tool_result":
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": ("Error: " if b.is_error else "") + _text(b.content)})
        if texts or not any(b.type == "tool_result" for b in blocks):
            out.append({"role": "user", "content": texts})
    return out


def plan(raw_body: dict, gen: Generator, model: str) -> tuple[C.Plan, MessagesRequest]:
    try:
        req = MessagesRequest.model_validate(raw_body)
    except ValidationError as e:
        raise ParamError(*validation_message(e)) from None
    chat: dict = {"model": req.model, "messages": _chat_messages(req), "max_tokens": req.max_tokens,
                  "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "stream": req.stream,
                  "stop": req.stop_sequences}
    if req.tools is not None:
        chat["tools"] = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                                           **({"description": t.description} if t.description else {})}}
                         for t in req.tools]
    if req.output_config is not None and req.output_config.format is not None:
        chat["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": req.output_config.format.schema_}}
    choice = req.tool_choice
    if choice is not None:
        if (choice.type == "tool") != (choice.name is not None):
            raise ParamError("tool_choice names a tool exactly when its type is 'tool'", "tool_choice.name")
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
            {"type": "function", "function": {"name": choice.name}}
        chat["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    try:
        chat_req = ChatRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as e:
        raise ParamError(*validation_message(e)) from None
    return C.plan_chat(chat_req, gen, model), req


def _stop(plan: C.Plan, finish: str | None) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence)."""
    chunks = plan.choices[0].chunks
    stop = chunks[-1].stop if chunks else None
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    return ("stop_sequence", stop) if stop is not None else ("end_turn", None)


def _usage(plan: C.Plan) -> dict:
    u = C.usage(plan)
    cached = u["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": u["prompt_tokens"] - cached, "output_tokens": u["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _shell(plan: C.Plan) -> dict:
    return {"id": "msg_" + plan.id, "type": "message", "role": "assistant", "model": plan.model, "content": [],
            "stop_reason": None, "stop_sequence": None}


def response_body(plan: C.Plan, req: MessagesRequest) -> dict:
    message, finish = C.chat_message(plan, plan.choices[0])
    content = [{"type": "text", "text": message["content"]}] if message.get("content") else []
    content += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                 "input": json.loads(c["function"]["arguments"])} for c in message.get("tool_calls", [])]
    reason, sequence = _stop(plan, finish)
    return {**_shell(plan), "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": _usage(plan)}


def _frame(kind: str, **body) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **body}, separators=(',', ':'))}\n\n"


def error_frame(status: int, message: str) -> str:
    return _frame("error", error=anthropic_error(status, message)["error"])


async def events(plan: C.Plan, req: MessagesRequest, streams):
    """Anthropic's event sequence of one streamed request (SSE frames): each output block a content block."""
    yield _frame("message_start", message={**_shell(plan), "usage": {**_usage(plan), "output_tokens": 0}})
    finish = None
    async for event in B.output_blocks(plan, streams):
        if event[0] == "end":
            finish = event[1]
            break
        step, n, kind, x = event
        if step == "open":
            block = {"type": "text", "text": ""} if kind == "text" else \
                {"type": "tool_use", "id": x.id, "name": x.name, "input": {}}
            yield _frame("content_block_start", index=n, content_block=block)
        elif step == "delta":
            delta = {"type": "text_delta", "text": x} if kind == "text" else {"type": "input_json_delta",
                                                                               "partial_json": x}
            yield _frame("content_block_delta", index=n, delta=delta)
        else:
            yield _frame("content_block_stop", index=n)
    reason, sequence = _stop(plan, finish)
    yield _frame("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                 usage={"output_tokens": C.usage(plan)["completion_tokens"]})
    yield _frame("message_stop")


def _prepare(raw: bytes, path: RequestPath):
    p, req = plan(parse_json(raw), path.gen, path.model_name)
    return p, path.check_model(req)


def _error(status: int, message: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse(anthropic_error(status, message), status)


API = ApiKind("messages", _prepare, framed(events, lambda code, message, param, ecode: error_frame(code, message)),
              lambda path, p, req: response_body(p, req), _error)
