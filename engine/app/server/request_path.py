"""The request path every generation API shares: the key, the body read and prepared on a worker
thread, the streams started, then a streamed or a whole answer, metrics and errors on the way.

What sets one API apart is an `ApiKind` (`openai_api.py`: chat and completions; `responses.py`;
`messages.py`): how its body becomes a plan, how its stream is framed, its whole answer, its error
shape. Every error a client can cause or meet is answered in its API's shape with its status (400
bad values, malformed JSON or a prompt past the context, 401 bad key, 404 unknown model, 429 queue
full, 503 a stage lost beyond recovery); anything else is a 500 with one line, its traceback
logged here, never sent. A client that disconnects, streaming or not, has its requests cancelled
on every stage at once.

A request's own work (parsing, validation, the chat template, tokenizing, compiling its grammar)
runs on a small pool of worker threads (`PREPARE_WORKERS`); the event loop only reads bodies,
submits and writes responses (`guard.py` bounds what a body may be).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...compose.allocator import release_free_memory
from ...core.errors import CapacityError, GrammarFailed, InternalError, QueueFull, RequestFailed, StageFailure, UserError
from ...serving.generator import Generator
from . import completions as C
from .events import EventStream, until_disconnect
from .guard import ModelNotFound, ParamError, parse_json, validation_message
from .metrics import Metrics
from .status import StatusCache

PREPARE_WORKERS = 4  # threads preparing requests (the tokenizer and llguidance run there without the GIL)
RELEASE_AFTER_BYTES = 1 << 20  # a body this large, or a request prepared this slowly (a grammar's
RELEASE_AFTER_S = 0.1  # lexer, built and dropped), has the memory it took handed back to the OS after it


@dataclass(frozen=True)
class ApiKind:
    """One generation API on the shared path."""

    name: str
    # on a worker thread: (the plan, the API's own request or None) from the raw body
    prepare: Callable[[bytes, RequestPath], tuple[C.Plan, object]]
    # a streamed answer's frames
    events: Callable[[RequestPath, C.Plan, object, list], AsyncIterator[str]]
    body: Callable[[RequestPath, C.Plan, object], dict]  # a whole answer
    error: Callable[[int, str, str | None, str | None], Response]  # an error in the API's shape


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`."""
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


class StreamFailed(Exception):
    """A stream ended with an error event; its status code, for the metrics."""

    def __init__(self, code: int):
        self.code = code


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def framed(events, error_frame: Callable[[int, str, str | None, str | None], str]):
    """An API's `events` whose failure midway ends the stream with the API's own error event."""
    async def frames(path: RequestPath, plan: C.Plan, api_req, streams):
        try:
            async for frame in events(plan, api_req, streams):
                yield frame
        except Exception as e:
            code, message, param, ecode = error_of(e)
            yield error_frame(code, message, param, ecode)
            raise StreamFailed(code) from None
    return frames


class RequestPath:
    """One server's generator, model name and key, the stages' status, the metrics, and the worker
    threads that prepare requests; `route(api)` is an API's endpoint."""

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

    def authorized(self, request: Request) -> bool:
        """The key as `Authorization: Bearer KEY`, or as Anthropic's clients send it, `x-api-key: KEY`."""
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = request.headers.get("x-api-key", "")
        return hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def route(self, api: ApiKind):
        """The endpoint of `api`."""
        async def endpoint(request: Request) -> Response:
            return await self.serve(request, api)
        return endpoint

    async def serve(self, request: Request, api: ApiKind) -> Response:
        self.metrics.watch_loop()
        if not self.authorized(request):
            self.metrics.requests.labels("401").inc()
            return api.error(401, "invalid API key (send it as `Authorization: Bearer KEY` or `x-api-key: KEY`)",
                             None, "invalid_api_key")
        loop, refused, size, began = asyncio.get_running_loop(), None, 0, time.perf_counter()
        try:
            raw = (await request.receive())["body"]  # the whole body, in one message (BodyGuard read it)
            size = len(raw)
            plan, api_req = await loop.run_in_executor(self.pool, api.prepare, raw, self)
            del raw  # a large body is freed now, not when the response ends
            streams = C.start(plan, self.gen)
        except Exception as e:
            code, message, param, ecode = error_of(e)
            self.metrics.requests.labels(str(code)).inc()
            refused = api.error(code, message, param, ecode)
        if size >= RELEASE_AFTER_BYTES or time.perf_counter() - began >= RELEASE_AFTER_S:
            loop.run_in_executor(self.pool, _give_back)  # what a heavy request took goes back to the OS
        if refused is not None:
            return refused
        self.metrics.prompt_tokens.inc(plan.prompt_tokens)
        if plan.stream:
            return EventStream(api.events(self, plan, api_req, streams),
                               on_end=lambda code: self._finished(plan, streams, code))
        try:
            await until_disconnect(request.receive, self._collect(plan, streams))
        except asyncio.CancelledError:
            self._finished(plan, streams, 499)  # the client went away: cancelled (nginx's "client closed request")
            return Response(status_code=499)
        except Exception as e:
            code, message, param, ecode = error_of(e)
            self._finished(plan, streams, code)
            return api.error(code, message, param, ecode)
        self._finished(plan, streams, 200)
        return JSONResponse(api.body(self, plan, api_req))

    async def _collect(self, plan: C.Plan, streams) -> None:
        async for _ in C.merged(plan, streams):
            self.metrics.token(None)

    def _finished(self, plan: C.Plan, streams, code: int) -> None:
        for s in streams:
            s.close()
            if s.timing.first is not None:
                self.metrics.ttft.observe(s.timing.ttft_ms / 1000)
            for g in s.timing.gaps:
                self.metrics.itl.observe(g)
        self.metrics.requests.labels(str(code)).inc()


def _give_back() -> None:
    """Free what a heavy request left (a refused request's traceback holds its frames in a cycle:
    the collector frees them), then hand the freed memory back to the OS."""
    gc.collect()
    release_free_memory()
