"""`POST /v1/responses`, OpenAI's Responses API, on the chat path.

A request is turned into a chat request (`instructions` a system message, `input` a string or
items: messages, `function_call`s and `function_call_output`s; flat function tools into chat
tools) and planned, run and parsed as chat is (`completions.py`, `tools.py`); the answer is a
`response` object whose `output` holds a message and any `function_call` items, or, streamed, the
Responses event sequence: `response.created`, `response.in_progress`, per output item
`response.output_item.added` (a message: `response.content_part.added`, `response.output_text.delta`
per token, `response.output_text.done`, `response.content_part.done`; a call:
`response.function_call_arguments.delta` and `.done`), `response.output_item.done`, then
`response.completed` with the usage. Nothing is stored: `store: true` and `previous_response_id`
are refused by name.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from ...serving.generator import Generator
from . import completions as C
from . import blocks as B
from .guard import ParamError, parse_json, validation_message
from .request_path import ApiKind, RequestPath, error_body, framed
from .schemas import FUNCTION_NAME, MAX_MESSAGES, MAX_NAME, MAX_TOOLS, Bool, ChatRequest, Strict


class InputText(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # output_text as a client echoes it back


class InputMessage(Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[InputText], Field(max_length=256)]
    id: str | None = Field(default=None, max_length=MAX_NAME)
    status: str | None = Field(default=None, max_length=32)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(max_length=MAX_NAME)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    id: str | None = Field(default=None, max_length=MAX_NAME)
    status: str | None = Field(default=None, max_length=32)


class FunctionCallOutput(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=MAX_NAME)
    output: str
    id: str | None = Field(default=None, max_length=MAX_NAME)
    status: str | None = Field(default=None, max_length=32)


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class NamedChoice(Strict):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class ResponsesRequest(Strict):
    model: str | None = Field(default=None, max_length=MAX_NAME)
    input: str | Annotated[list[InputMessage | FunctionCallItem | FunctionCallOutput], Field(min_length=1,
                                                                                             max_length=MAX_MESSAGES)]
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: Bool = True
    max_output_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: Bool = False
    store: Bool | None = None  # nothing is kept: left out or false only
    previous_response_id: str | None = None  # refused: nothing is stored to continue from
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=MAX_NAME)


def plan(raw_body: dict, gen: Generator, model: str) -> tuple[C.Plan, ResponsesRequest]:
    try:
        req = ResponsesRequest.model_validate(raw_body)
    except ValidationError as e:
        raise ParamError(*validation_message(e)) from None
    if req.previous_response_id is not None:
        raise ParamError("stored responses are not kept here: previous_response_id cannot be continued; "
                         "send the whole input", "previous_response_id")
    if req.store:
        raise ParamError("responses are not stored here: give store: false", "store")
    messages: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, InputMessage):
            text = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
            messages.append({"role": item.role, "content": text})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    chat = {"model": req.model, "messages": messages, "temperature": req.temperature, "top_p": req.top_p,
            "stream": req.stream, "parallel_tool_calls": req.parallel_tool_calls, "max_tokens": req.max_output_tokens}
    if req.tools is not None:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if req.tool_choice is not None:
        chat["tool_choice"] = req.tool_choice if isinstance(req.tool_choice, str) else \
            {"type": "function", "function": {"name": req.tool_choice.name}}
    try:
        chat_req = ChatRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as e:
        raise ParamError(*validation_message(e)) from None
    return C.plan_chat(chat_req, gen, model), req


def _usage(plan: C.Plan) -> dict:
    u = C.usage(plan)
    return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"], "input_tokens_details": u["prompt_tokens_details"],
            "output_tokens_details": {"reasoning_tokens": 0}}


def _shell(plan: C.Plan, req: ResponsesRequest, status: str) -> dict:
    return {"id": "resp_" + plan.id, "object": "response", "created_at": plan.created, "status": status,
            "model": plan.model, "output": [], "instructions": req.instructions, "error": None,
            "incomplete_details": None, "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "tool_choice": req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None
            else req.tool_choice.model_dump(), "parallel_tool_calls": req.parallel_tool_calls,
            "temperature": req.temperature, "top_p": req.top_p, "max_output_tokens": req.max_output_tokens,
            "previous_response_id": None, "store": False, "metadata": req.metadata or {}, "usage": None,
            "text": {"format": {"type": "text"}}}


def output_items(plan: C.Plan, choice: C.Choice) -> list[dict]:
    message, _ = C.chat_message(plan, choice)
    items = []
    if message.get("content"):
        items.append({"type": "message", "id": "msg_" + secrets.token_hex(12), "status": "completed",
                      "role": "assistant",
                      "content": [{"type": "output_text", "text": message["content"], "annotations": []}]})
    for call in message.get("tool_calls", []):
        items.append({"type": "function_call", "id": "fc_" + secrets.token_hex(12), "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items


def _status(choice: C.Choice) -> tuple[str, dict | None]:
    if choice.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def response_body(plan: C.Plan, req: ResponsesRequest) -> dict:
    choice = plan.choices[0]
    status, why = _status(choice)
    return {**_shell(plan, req, status), "output": output_items(plan, choice), "usage": _usage(plan),
            "incomplete_details": why, "completed_at": int(time.time())}


def error_frame(message: str, param: str | None, code: str | None) -> str:
    body = {"type": "error", "code": code, "message": message, "param": param}
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


async def events(plan: C.Plan, req: ResponsesRequest, streams):
    """The Responses event sequence of one streamed request (SSE frames): each output block an item."""
    seq = iter(range(1 << 62))

    def frame(kind: str, **body) -> str:
        body = {"type": kind, "sequence_number": next(seq), **body}
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"

    yield frame("response.created", response=_shell(plan, req, "in_progress"))
    yield frame("response.in_progress", response=_shell(plan, req, "in_progress"))
    items, ids = [], {}
    async for event in B.output_blocks(plan, streams):
        if event[0] == "end":
            break
        step, n, kind, x = event
        if step == "open":
            ids[n] = ("msg_" if kind == "text" else "fc_") + secrets.token_hex(12)
            item = ({"type": "message", "id": ids[n], "status": "in_progress", "role": "assistant", "content": []}
                    if kind == "text" else {"type": "function_call", "id": ids[n], "call_id": x.id, "name": x.name,
                                            "arguments": "", "status": "in_progress"})
            yield frame("response.output_item.added", output_index=n, item=item)
            if kind == "text":
                yield frame("response.content_part.added", item_id=ids[n], output_index=n, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})
        elif step == "delta" and kind == "text":
            yield frame("response.output_text.delta", item_id=ids[n], output_index=n, content_index=0, delta=x)
        elif step == "delta":
            yield frame("response.function_call_arguments.delta", item_id=ids[n], output_index=n, delta=x)
        elif kind == "text":
            part = {"type": "output_text", "text": x, "annotations": []}
            yield frame("response.output_text.done", item_id=ids[n], output_index=n, content_index=0, text=x)
            yield frame("response.content_part.done", item_id=ids[n], output_index=n, content_index=0, part=part)
            items.append({"type": "message", "id": ids[n], "status": "completed", "role": "assistant",
                          "content": [part]})
            yield frame("response.output_item.done", output_index=n, item=items[-1])
        else:
            yield frame("response.function_call_arguments.done", item_id=ids[n], output_index=n, arguments=x.arguments)
            items.append({"type": "function_call", "id": ids[n], "call_id": x.id, "name": x.name,
                          "arguments": x.arguments, "status": "completed"})
            yield frame("response.output_item.done", output_index=n, item=items[-1])
    status, why = _status(plan.choices[0])
    final = {**_shell(plan, req, status), "output": items, "usage": _usage(plan), "incomplete_details": why,
             "completed_at": int(time.time())}
    yield frame("response.completed" if status == "completed" else "response.incomplete", response=final)


def _prepare(raw: bytes, path: RequestPath):
    p, req = plan(parse_json(raw), path.gen, path.model_name)
    return p, path.check_model(req)


API = ApiKind("responses", _prepare,
              framed(events, lambda code, message, param, ecode: error_frame(message, param, ecode)),
              lambda path, p, req: response_body(p, req), error_body)
