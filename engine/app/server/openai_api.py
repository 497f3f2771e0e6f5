"""OpenAI's endpoints: `/v1/chat/completions` and `/v1/completions` on the shared request path
(`request_path.py`; requests into choices and bodies: `completions.py`), `/v1/models`, and vLLM's
`/tokenize` and `/detokenize`."""

from __future__ import annotations

import asyncio
import functools
import json
import os

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...serving.aio import get_within
from . import completions as C
from . import tools as T
from .request_path import ApiKind, RequestPath, StreamFailed, error_body, error_of, sse
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .tokenize import detokenize, tokenize

# an SSE comment this often while a stream waits (a long prefill); the environment may shorten it
KEEPALIVE_S = float(os.environ.get("HETPIPE_SSE_KEEPALIVE_S", "2.0"))


def _prepare(schema, plan):
    def prepare(raw: bytes, path: RequestPath):
        return plan(path.validate(raw, schema), path.gen, path.model_name), None
    return prepare


async def _events(path: RequestPath, plan: C.Plan, _, streams):
    """The SSE frames of one streamed request, keep-alive comments between."""
    for c in plan.choices:  # chat: the role first; completions: the echoed prompt, if any
        if plan.kind == "chat" or c.echo:
            yield sse(C.chunk_body(plan, c, role=True))
    calls = {c.index: T.StreamedCalls(plan.tool_format, plan.tools, plan.forced_call, plan.parallel_tool_calls)
             for c in plan.choices} if plan.tools else {}
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump():
        try:
            async for item in C.merged(plan, streams):
                await q.put(item)
            await q.put(end)
        except BaseException as e:
            await q.put(e)

    task = asyncio.ensure_future(pump())
    try:
        while (item := await _next(q)) is not end:
            if item is None:
                yield ": keep-alive\n\n"
                continue
            if isinstance(item, BaseException):
                code, message, param, ecode = error_of(item)
                yield sse(json.loads(error_body(code, message, param, ecode).body))
                yield "data: [DONE]\n\n"
                raise StreamFailed(code)
            for frame in _frames(path, plan, calls, *item):
                yield frame
        if plan.include_usage:
            yield sse(C.usage_body(plan))
        yield "data: [DONE]\n\n"
    finally:
        task.cancel()


async def _next(q: asyncio.Queue):
    """The next item, or None after KEEPALIVE_S without one."""
    try:
        return await get_within(q, KEEPALIVE_S)
    except asyncio.TimeoutError:
        return None


def _frames(path: RequestPath, plan: C.Plan, calls: dict, choice: C.Choice, chunk):
    """The frames one generated chunk of one choice makes (its text, its tool calls as they close)."""
    path.metrics.token(None)
    lp = C.logprobs_body(plan, path.gen, [chunk], offset=len(choice.text) - len(chunk.text))
    text, events = calls[choice.index].feed(chunk.text) if calls else (chunk.text, ())
    if text or lp is not None:
        yield sse(C.chunk_body(plan, choice, text=text, logprobs=lp))
    for event in events:
        yield sse(C.tool_call_chunk(plan, choice, event))
    if chunk.finish_reason:
        finish = chunk.finish_reason
        if calls:  # the text held since a call's marker: the rest of the calls, or content after all
            rest, events, made = calls[choice.index].finish()
            if rest:
                yield sse(C.chunk_body(plan, choice, text=rest))
            for event in events:
                yield sse(C.tool_call_chunk(plan, choice, event))
            finish = "tool_calls" if made else finish
        yield sse(C.chunk_body(plan, choice, finish=finish))


def _body(path: RequestPath, plan: C.Plan, _) -> dict:
    return C.response_body(plan, path.gen)


CHAT = ApiKind("chat", _prepare(ChatRequest, C.plan_chat), _events, _body, error_body)
COMPLETION = ApiKind("completion", _prepare(CompletionRequest, C.plan_completion), _events, _body, error_body)


def routes(path: RequestPath) -> list[Route]:
    def model_entry() -> dict:
        return {"id": path.model_name, "object": "model", "created": path.started, "owned_by": "hetpipe"}

    async def models(request: Request) -> Response:
        if not path.authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        return JSONResponse({"object": "list", "data": [model_entry()]})

    async def model(request: Request) -> Response:
        if not path.authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        if request.path_params["name"] != path.model_name:
            return error_body(404, f"the model {request.path_params['name']!r} does not exist", "model",
                              "model_not_found")
        return JSONResponse(model_entry())

    return [Route("/v1/chat/completions", path.route(CHAT), methods=["POST"]),
            Route("/v1/completions", path.route(COMPLETION), methods=["POST"]),
            Route("/tokenize", functools.partial(_tokens, path, TokenizeRequest, tokenize), methods=["POST"]),
            Route("/detokenize", functools.partial(_tokens, path, DetokenizeRequest, detokenize), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"])]


async def _tokens(path: RequestPath, schema, answer, request: Request) -> Response:
    """/tokenize and /detokenize: validated and answered on a worker thread."""
    if not path.authorized(request):
        return error_body(401, "invalid API key", None, "invalid_api_key")
    try:
        raw = (await request.receive())["body"]
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(path.pool, lambda: answer(path.validate(raw, schema), path.gen))
    except Exception as e:
        return error_body(*error_of(e))
    return JSONResponse(body)
