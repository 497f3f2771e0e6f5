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

from ...core.errors import CapacityError, GrammarFailed, InternalError, QueueFull, RequestFailed, StageFailure, UserError
from ...serving.aio import get_within
from ...serving.generator import Generator
from ...compose.allocator import release_free_memory
from . import completions as C
from . import messages as M
from . import responses as R
from . import tools as T
from .events import EventStream, until_disconnect
from .guard import (BodyGuard, ModelNotFound, ParamError, ServerLimits, anthropic_error, parse_json,
                    validation_message)
from .metrics import Metrics
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .status import StatusCache
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
    if isinstance(e, (StageFailure, CapacityError, InternalError)):
        return 503, f"the pipeline cannot serve this request: {e}", None, "stage_unavailable"
    if isinstance(e, RequestFailed):  # logged where it happened
        return 500, f"this request failed: {e}", None, "request_failed"
    print(f"hetpipe serve: internal error: {e!r}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return 500, f"internal error: {type(e).__name__}", None, None


def create_app(gen: Generator, *, model_name: str, api_key: str | None = None,
               cors_origins: tuple[str, ...] = (), limits: ServerLimits | None = None) -> Starlette:
    api = _Api(gen, model_name, api_key)
    headers = ["authorization", "content-type", "x-api-key", "anthropic-version"]
    middleware = [Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=headers)] if cors_origins else []
    routes = [Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/completions", api.completion, methods=["POST"]),
              Route("/v1/responses", api.responses, methods=["POST"]),
              Route("/v1/messages", api.messages, methods=["POST"]),
              Route("/tokenize", functools.partial(api.tokens, schema=TokenizeRequest, answer=tokenize),
                    methods=["POST"]),
              Route("/detokenize", functools.partial(api.tokens, schema=DetokenizeRequest, answer=detokenize),
                    methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{name:path}", api.model, methods=["GET"]),
              Route("/health", api.health, methods=["GET"]),
              Route("/metrics", api.metrics_page, methods=["GET"]),
              Route("/", api.page, methods=["GET"])]
    # innermost: CORS preflights never wait on a body
    middleware.append(Middleware(BodyGuard, limits=limits or ServerLimits()))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: api.not_found, Exception: api.crashed})


class _Api:
    """The endpoints of one server: its generator, model name and key, the stages' status, the
    metrics, and the worker threads that prepare requests."""

    def __init__(self, gen: Generator, model_name: str, api_key: str | None):
        self.gen, self.model_name, self.api_key = gen, model_name, api_key
        self.status = StatusCache(gen)
        self.metrics = Metrics(gen, self.status.cached)
        self.pool = ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="hetpipe-prepare")
        self.pool.submit(gen.grammars.warm)  # llguidance's view of the vocabulary, built now, not by a request
        self.started = int(time.time())

    def check_model(self, req):
        """`req`, if it names this server's model or none."""
        if req.model is not None and req.model != self.model_name:
            raise ModelNotFound(f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                                "model", "model_not_found")
        return req

    def validate(self, raw: bytes, schema):
        """The body parsed and validated as `schema`, naming this server's model (or none)."""
        try:
            req = schema.model_validate(parse_json(raw))
        except ValidationError as e:
            raise ParamError(*validation_message(e)) from None
        return self.check_model(req)

    def prepare(self, raw: bytes, kind: str):
        """On a worker thread: the body parsed, validated, tokenized, its grammar compiled. The
        Responses API's plan comes with its request (its answer's shape needs it)."""
        if kind in ("responses", "messages"):
            plan, req = (R if kind == "responses" else M).plan(parse_json(raw), self.gen, self.model_name)
            return plan, self.check_model(req)
        req = self.validate(raw, ChatRequest if kind == "chat" else CompletionRequest)
        return (C.plan_chat if kind == "chat" else C.plan_completion)(req, self.gen, self.model_name), None

    async def tokens(self, request: Request, schema, answer) -> Response:
        """/tokenize and /detokenize: validated and answered on a worker thread."""
        if not self.authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        try:
            raw = (await request.receive())["body"]
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self.pool, lambda: answer(self.validate(raw, schema), self.gen))
        except Exception as e:
            return error_body(*error_of(e))
        return JSONResponse(body)

    def authorized(self, request: Request) -> bool:
        """The key as `Authorization: Bearer KEY`, or as Anthropic's clients send it, `x-api-key: KEY`."""
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = request.headers.get("x-api-key", "")
        return hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def generate(self, request: Request, kind: str) -> Response:
        self.metrics.watch_loop()
        if not self.authorized(request):
            self.metrics.requests.labels("401").inc()
            return _error(kind, 401, "invalid API key (send it as `Authorization: Bearer KEY` or `x-api-key: KEY`)",
                          None, "invalid_api_key")
        loop, refused, size, began = asyncio.get_running_loop(), None, 0, time.perf_counter()
        try:
            raw = (await request.receive())["body"]  # the whole body, in one message (BodyGuard read it)
            size = len(raw)
            plan, api_req = await loop.run_in_executor(self.pool, self.prepare, raw, kind)
            del raw  # a large body is freed now, not when the response ends
            streams = C.start(plan, self.gen)
        except Exception as e:
            code, message, param, ecode = error_of(e)
            self.metrics.requests.labels(str(code)).inc()
            refused = _error(kind, code, message, param, ecode)
        if size >= RELEASE_AFTER_BYTES or time.perf_counter() - began >= RELEASE_AFTER_S:
            loop.run_in_executor(self.pool, _give_back)  # what a heavy request took goes back to the OS
        if refused is not None:
            return refused
        self.metrics.prompt_tokens.inc(plan.prompt_tokens)
        if plan.stream:
            frames = (self._block_events(kind, plan, api_req, streams) if api_req is not None
                      else self._events(plan, streams))
            return EventStream(frames, on_end=lambda code: self._finished(plan, streams, code))
        try:
            await until_disconnect(request.receive, self._collect(plan, streams))
        except asyncio.CancelledError:
            self._finished(plan, streams, 499)  # the client went away: cancelled (nginx's "client closed request")
            return Response(status_code=499)
        except Exception as e:
            code, message, param, ecode = error_of(e)
            self._finished(plan, streams, code)
            return _error(kind, code, message, param, ecode)
        self._finished(plan, streams, 200)
        body = {"responses": R.response_body, "messages": M.response_body}.get(kind)
        return JSONResponse(body(plan, api_req) if body else C.response_body(plan, self.gen))

    async def _collect(self, plan: C.Plan, streams) -> None:
        async for _ in C.merged(plan, streams):
            self.metrics.token(None)

    async def _events(self, plan: C.Plan, streams):
        """The SSE frames of one streamed request, keep-alive comments between."""
        for c in plan.choices:  # chat: the role first; completions: the echoed prompt, if any
            if plan.kind == "chat" or c.echo:
                yield _sse(C.chunk_body(plan, c, role=True))
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
                self.metrics.token(None)
                lp = C.logprobs_body(plan, self.gen, [chunk], offset=len(choice.text) - len(chunk.text))
                text, events = calls[choice.index].feed(chunk.text) if calls else (chunk.text, ())
                if text or lp is not None:
                    yield _sse(C.chunk_body(plan, choice, text=text, logprobs=lp))
                for event in events:
                    yield _sse(C.tool_call_chunk(plan, choice, event))
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                    if calls:  # the text held since a call's marker: the rest of the calls, or content after all
                        rest, events, made = calls[choice.index].finish()
                        if rest:
                            yield _sse(C.chunk_body(plan, choice, text=rest))
                        for event in events:
                            yield _sse(C.tool_call_chunk(plan, choice, event))
                        finish = "tool_calls" if made else finish
                    yield _sse(C.chunk_body(plan, choice, finish=finish))
            if plan.include_usage:
                yield _sse(C.usage_body(plan))
            yield "data: [DONE]\n\n"
        finally:
            task.cancel()

    async def _block_events(self, kind: str, plan: C.Plan, api_req, streams):
        """The Responses or the Messages API's events; a failure midway ends them with an `error` event."""
        try:
            async for frame in (R if kind == "responses" else M).events(plan, api_req, streams):
                yield frame
        except Exception as e:
            code, message, param, ecode = error_of(e)
            yield R.error_frame(message, param, ecode) if kind == "responses" else M.error_frame(code, message)
            raise _StreamFailed(code) from None

    def _finished(self, plan: C.Plan, streams, code: int) -> None:
        for s in streams:
            s.close()
            if s.timing.first is not None:
                self.metrics.ttft.observe(s.timing.ttft_ms / 1000)
            for g in s.timing.gaps:
                self.metrics.itl.observe(g)
        self.metrics.requests.labels(str(code)).inc()

    async def chat(self, request: Request) -> Response:
        return await self.generate(request, "chat")

    async def completion(self, request: Request) -> Response:
        return await self.generate(request, "completion")

    async def responses(self, request: Request) -> Response:
        return await self.generate(request, "responses")

    async def messages(self, request: Request) -> Response:
        return await self.generate(request, "messages")

    def model_entry(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "hetpipe"}

    async def models(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        return JSONResponse({"object": "list", "data": [self.model_entry()]})

    async def model(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        if request.path_params["name"] != self.model_name:
            return error_body(404, f"the model {request.path_params['name']!r} does not exist", "model",
                              "model_not_found")
        return JSONResponse(self.model_entry())

    async def health(self, request: Request) -> Response:
        self.metrics.watch_loop()
        stages = await asyncio.to_thread(self.status.refresh)
        engine_error = self.gen.engine.error
        ok = engine_error is None and not self.gen.engine.lost_stages and all(s.state == "ok" for s in stages)
        waiting, running, _ = self.gen.engine.load()
        body = {"status": "ok" if ok else "unavailable", "model": self.model_name,
                "stages": [s.to_json() for s in stages], "queue_depth": waiting, "running": running,
                "tokens_per_s": self.metrics.tokens_per_s()}
        if engine_error is not None:
            body["error"] = f"the serving engine stopped: {engine_error!r}"
        elif self.gen.engine.lost_stages:
            body["error"] = f"{self.gen.engine.lost_error}; serving resumes once a stage takes its place"
        return JSONResponse(body, 200 if ok else 503)

    async def metrics_page(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        await asyncio.to_thread(self.status.refresh)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def not_found(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_body(404, f"no such endpoint: {request.method} {request.url.path}", None, "not_found")
        return error_body(exc.status_code, str(exc.detail))

    async def crashed(self, request: Request, exc: Exception) -> Response:
        code, message, param, ecode = error_of(exc)
        return error_body(code, message, param, ecode)


def _error(kind: str, status: int, message: str, param: str | None, code: str | None) -> JSONResponse:
    """An error answer in the shape of the request's API: Anthropic's for /v1/messages, else OpenAI's."""
    if kind == "messages":
        return JSONResponse(anthropic_error(status, message), status)
    return error_body(status, message, param, code)


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
