"""The ASGI app of `hetpipe serve` (Starlette): OpenAI's endpoints, `/health`, `/metrics`, the page.

Every error a client can cause or meet is answered in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with its status (400 bad values, malformed JSON
or a prompt past the context, 401 bad key, 404 unknown model or path, 408 a body too slow, 413 a
body too large, 429 queue full, 503 a stage lost beyond recovery); anything else is a 500 with one
line, its traceback logged here, never sent. A client that disconnects, streaming or not, has its
requests cancelled on every stage at once.

A request's own work (parsing, validation, the chat template, tokenizing, compiling its grammar)
runs on a small pool of worker threads (`PREPARE_WORKERS`); the event loop only reads bodies,
submits and writes responses (`guard.py` bounds what a body may be).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ...core.errors import GrammarFailed, QueueFull, RequestFailed, StageFailure, UserError
from ...serving.aio import get_within
from ...serving.generator import Generator
from ..allocator import release_free_memory
from . import completions as C
from . import responses as R
from . import tools as T
from .events import EventStream, until_disconnect
from .guard import BodyGuard, ModelNotFound, ParamError, ServerLimits, parse_json, validation_message
from .metrics import Metrics, stage_name
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .status import StageStatus
from .tokenize import detokenize, tokenize

# an SSE comment this often while a stream waits (a long prefill); the environment may shorten it
KEEPALIVE_S = float(os.environ.get("HETPIPE_SSE_KEEPALIVE_S", "2.0"))
PREPARE_WORKERS = 4  # threads preparing requests (the tokenizer and llguidance run there without the GIL)
RELEASE_AFTER_BYTES = 1 << 20  # a body this large, or a request prepared this slowly (a grammar's
RELEASE_AFTER_S = 0.1  # lexer, built and dropped), has the memory it took handed back to the OS after it


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def error_of(e: BaseException) -> tuple[int, str, str | None, str | None]:
    """(status, message, param, code) for an exception met while serving a request."""
    if isinstance(e, ParamError):
        return e.status, str(e), e.param, e.code
    if isinstance(e, QueueFull):
        return 429, str(e), None, "queue_full"
    if isinstance(e, GrammarFailed):
        return 400, str(e), "response_format", "structured_output_failed"
    if isinstance(e, UserError):
        return 400, str(e), None, None
    if isinstance(e, StageFailure):
        return 503, f"the pipeline cannot serve this request: {e}", None, "stage_unavailable"
    if isinstance(e, RequestFailed):  # logged where it happened
        return 500, f"this request failed: {e}", None, "request_failed"
    print(f"hetpipe serve: internal error: {e!r}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return 500, f"internal error: {type(e).__name__}", None, None


def create_app(gen: Generator, *, model_name: str, api_key: str | None = None,
               cors_origins: tuple[str, ...] = (), limits: ServerLimits | None = None) -> Starlette:
    status = StageStatus(gen)
    metrics = Metrics(gen, status.cached)
    limits = limits or ServerLimits()
    pool = ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="hetpipe-prepare")
    pool.submit(gen.grammars.warm)  # llguidance's view of the vocabulary, built now rather than by a first request

    def validate(raw: bytes, schema):
        """The body parsed and validated as `schema`, naming this server's model (or none)."""
        try:
            req = schema.model_validate(parse_json(raw))
        except ValidationError as e:
            raise ParamError(*validation_message(e)) from None
        if req.model is not None and req.model != model_name:
            raise ModelNotFound(f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                                "model", "model_not_found")
        return req

    def prepare(raw: bytes, kind: str):
        """On a worker thread: the body parsed, validated, tokenized, its grammar compiled. The
        Responses API's plan comes with its request (its answer's shape needs it)."""
        if kind == "responses":
            plan, req = R.plan(parse_json(raw), gen, model_name)
            if req.model is not None and req.model != model_name:
                raise ModelNotFound(f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                                    "model", "model_not_found")
            return plan, req
        req = validate(raw, ChatRequest if kind == "chat" else CompletionRequest)
        return (C.plan_chat if kind == "chat" else C.plan_completion)(req, gen, model_name), None

    async def tokens(request: Request, schema, answer) -> Response:
        """/tokenize and /detokenize: validated and answered on a worker thread."""
        if not authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        try:
            raw = (await request.receive())["body"]
            body = await asyncio.get_running_loop().run_in_executor(pool, lambda: answer(validate(raw, schema), gen))
        except Exception as e:
            return error_body(*error_of(e))
        return JSONResponse(body)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    async def generate(request: Request, kind: str) -> Response:
        metrics.watch_loop()
        if not authorized(request):
            metrics.requests.labels("401").inc()
            return error_body(401, "invalid API key (send it as `Authorization: Bearer KEY`)", None,
                              "invalid_api_key")
        loop, refused, size, began = asyncio.get_running_loop(), None, 0, time.perf_counter()
        try:
            raw = (await request.receive())["body"]  # the whole body, in one message (BodyGuard read it)
            size = len(raw)
            plan, api_req = await loop.run_in_executor(pool, prepare, raw, kind)
            del raw  # a large body is freed now, not when the response ends
            streams = C.start(plan, gen)
        except Exception as e:
            code, message, param, ecode = error_of(e)
            metrics.requests.labels(str(code)).inc()
            refused = error_body(code, message, param, ecode)
        if size >= RELEASE_AFTER_BYTES or time.perf_counter() - began >= RELEASE_AFTER_S:
            loop.run_in_executor(pool, _give_back)  # what a heavy request took goes back to the OS
        if refused is not None:
            return refused
        metrics.prompt_tokens.inc(plan.prompt_tokens)
        if plan.stream:
            frames = _response_events(plan, api_req, streams) if kind == "responses" else _events(plan, streams)
            return EventStream(frames, on_end=lambda code: _finished(plan, streams, code))
        try:
            await until_disconnect(request.receive, _collect(plan, streams))
        except asyncio.CancelledError:
            _finished(plan, streams, 499)  # the client went away: cancelled (nginx's "client closed request")
            return Response(status_code=499)
        except Exception as e:
            code, message, param, ecode = error_of(e)
            _finished(plan, streams, code)
            return error_body(code, message, param, ecode)
        _finished(plan, streams, 200)
        return JSONResponse(R.response_body(plan, api_req) if kind == "responses" else C.response_body(plan, gen))

    async def _collect(plan: C.Plan, streams) -> None:
        async for _ in C.merged(plan, streams):
            metrics.token(None)

    async def _events(plan: C.Plan, streams):
        """The SSE frames of one streamed request, keep-alive comments between."""
        for c in plan.choices:  # chat: the role first; completions: the echoed prompt, if any
            if plan.kind == "chat" or c.echo:
                yield _sse(C.chunk_body(plan, c, role=True))
        calls = {c.index: T.StreamedCalls(plan.tool_format, plan.tools, plan.forced_call)
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
            while True:
                try:
                    item = await get_within(q, KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is end:
                    break
                if isinstance(item, BaseException):
                    code, message, param, ecode = error_of(item)
                    yield _sse(json.loads(error_body(code, message, param, ecode).body))
                    yield "data: [DONE]\n\n"
                    raise _StreamFailed(code)
                choice, chunk = item
                metrics.token(None)
                lp = C.logprobs_body(plan, gen, [chunk], offset=len(choice.text) - len(chunk.text))
                text = calls[choice.index].feed(chunk.text) if calls else chunk.text
                if text or lp is not None:
                    yield _sse(C.chunk_body(plan, choice, text=text, logprobs=lp))
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                    if calls:  # the text held since a call's marker: calls, or content after all
                        rest, made = calls[choice.index].finish()
                        if rest:
                            yield _sse(C.chunk_body(plan, choice, text=rest))
                        for body in C.tool_call_chunks(plan, choice, made):
                            yield _sse(body)
                        finish = "tool_calls" if made else finish
                    yield _sse(C.chunk_body(plan, choice, finish=finish))
            if plan.include_usage:
                yield _sse(C.usage_body(plan))
            yield "data: [DONE]\n\n"
        finally:
            task.cancel()

    async def _response_events(plan: C.Plan, api_req, streams):
        """The Responses API's events; a failure midway ends them with an `error` event."""
        try:
            async for frame in R.events(plan, api_req, streams):
                yield frame
        except Exception as e:
            code, message, param, ecode = error_of(e)
            yield R.error_frame(message, param, ecode)
            raise _StreamFailed(code) from None

    def _finished(plan: C.Plan, streams, code: int) -> None:
        for s in streams:
            s.close()
            if s.timing.first is not None:
                metrics.ttft.observe(s.timing.ttft_ms / 1000)
            for g in s.timing.gaps:
                metrics.itl.observe(g)
        metrics.requests.labels(str(code)).inc()

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completion(request: Request) -> Response:
        return await generate(request, "completion")

    async def responses(request: Request) -> Response:
        return await generate(request, "responses")

    def model_entry() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "hetpipe"}

    async def models(request: Request) -> Response:
        if not authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        return JSONResponse({"object": "list", "data": [model_entry()]})

    async def model(request: Request) -> Response:
        if not authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        if request.path_params["name"] != model_name:
            return error_body(404, f"the model {request.path_params['name']!r} does not exist", "model",
                              "model_not_found")
        return JSONResponse(model_entry())

    async def health(request: Request) -> Response:
        metrics.watch_loop()
        stages = await asyncio.to_thread(status.refresh)
        engine_error = gen.engine.error
        ok = engine_error is None and not gen.engine.lost_stages and all(s["state"] == "ok" for s in stages)
        body = {"status": "ok" if ok else "unavailable", "model": model_name,
                "stages": [{"stage": stage_name(s), **s} for s in stages],
                "queue_depth": len(gen.engine.scheduler.waiting), "running": len(gen.engine.scheduler.running),
                "tokens_per_s": metrics.tokens_per_s()}
        if engine_error is not None:
            body["error"] = f"the serving engine stopped: {engine_error!r}"
        elif gen.engine.lost_stages:
            body["error"] = f"{gen.engine.lost_error}; serving resumes once a stage takes its place"
        return JSONResponse(body, 200 if ok else 503)

    async def metrics_page(request: Request) -> Response:
        if not authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        await asyncio.to_thread(status.refresh)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_body(404, f"no such endpoint: {request.method} {request.url.path}", None, "not_found")
        return error_body(exc.status_code, str(exc.detail))

    async def crashed(request: Request, exc: Exception) -> Response:
        code, message, param, ecode = error_of(exc)
        return error_body(code, message, param, ecode)

    started = int(time.time())
    middleware = [Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["authorization", "content-type"])] if cors_origins else []
    routes = [Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completion, methods=["POST"]),
              Route("/v1/responses", responses, methods=["POST"]),
              Route("/tokenize", functools.partial(tokens, schema=TokenizeRequest, answer=tokenize), methods=["POST"]),
              Route("/detokenize", functools.partial(tokens, schema=DetokenizeRequest, answer=detokenize),
                    methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_page, methods=["GET"]),
              Route("/", page, methods=["GET"])]
    middleware.append(Middleware(BodyGuard, limits=limits))  # innermost: CORS preflights never wait on a body
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: not_found, Exception: crashed})


def _give_back() -> None:
    """Free what a heavy request left (a refused request's traceback holds its frames in a cycle:
    the collector frees them), then hand the freed memory back to the OS."""
    gc.collect()
    release_free_memory()


class _StreamFailed(Exception):
    """A stream ended with an error event; its status code, for the metrics."""

    def __init__(self, code: int):
        self.code = code


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


PAGE = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
