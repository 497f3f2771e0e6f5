"""The ASGI app of `hetpipe serve` (Starlette): each API's routes, `/health`, `/metrics`, the page.

The routes of each API live with it: OpenAI's chat, completions, models and vLLM's tokenize
(`openai_api.py`), OpenAI's Responses API (`responses.py`), Anthropic's Messages API
(`messages.py`); the path they share, from the key to the answer and its errors, is
`request_path.py`. Here: the service's own routes, the app and its middleware (`guard.py`: the
door every body passes).
"""

from __future__ import annotations

import asyncio
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ...serving.generator import Generator
from . import messages as M
from . import openai_api
from . import responses as R
from .guard import BodyGuard, ServerLimits
from .request_path import RequestPath, error_body, error_of

PAGE = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def create_app(gen: Generator, *, model_name: str, api_key: str | None = None,
               cors_origins: tuple[str, ...] = (), limits: ServerLimits | None = None) -> Starlette:
    path = RequestPath(gen, model_name, api_key)
    headers = ["authorization", "content-type", "x-api-key", "anthropic-version"]
    middleware = [Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=headers)] if cors_origins else []
    routes = [*openai_api.routes(path),
              Route("/v1/responses", path.route(R.API), methods=["POST"]),
              Route("/v1/messages", path.route(M.API), methods=["POST"]),
              *service_routes(path)]
    # innermost: CORS preflights never wait on a body
    middleware.append(Middleware(BodyGuard, limits=limits or ServerLimits()))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: not_found, Exception: crashed})


def service_routes(path: RequestPath) -> list[Route]:
    """`/health` (the stages now, the queue; 503 while a stage is lost), `/metrics` and the page."""
    async def health(request: Request) -> Response:
        path.metrics.watch_loop()
        stages = await asyncio.to_thread(path.status.refresh)
        engine = path.gen.engine
        ok = engine.error is None and not engine.lost_stages and all(s.state == "ok" for s in stages)
        waiting, running, _ = engine.load()
        body = {"status": "ok" if ok else "unavailable", "model": path.model_name,
                "stages": [s.to_json() for s in stages], "queue_depth": waiting, "running": running,
                "tokens_per_s": path.metrics.tokens_per_s()}
        if engine.error is not None:
            body["error"] = f"the serving engine stopped: {engine.error!r}"
        elif engine.lost_stages:
            body["error"] = f"{engine.lost_error}; serving resumes once a stage takes its place"
        return JSONResponse(body, 200 if ok else 503)

    async def metrics(request: Request) -> Response:
        if not path.authorized(request):
            return error_body(401, "invalid API key", None, "invalid_api_key")
        await asyncio.to_thread(path.status.refresh)
        return Response(path.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    return [Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
            Route("/", page, methods=["GET"])]


async def not_found(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        return error_body(404, f"no such endpoint: {request.method} {request.url.path}", None, "not_found")
    return error_body(exc.status_code, str(exc.detail))


async def crashed(request: Request, exc: Exception) -> Response:
    return error_body(*error_of(exc))
