"""`hetpipe serve`: the app on uvicorn, saying `serving http://HOST:PORT` once it listens.

A stage lost beyond recovery does not stop the server: `/health` says 503 and requests get 503
until a stage takes its place, then serving resumes by itself (`engine.serving.engine`). If the
serving engine itself dies (a bug), the server stops and `hetpipe serve` exits with code 1, so a
supervisor restarts it: it never stays up refusing everything while the stages are fine.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from ...core.errors import StageFailure, UserError
from ...serving.generator import Generator
from .guard import GuardedH11, ServerLimits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """A server reachable beyond this machine needs a key, as the daemons need CURVE keys."""
    if api_key is None and not insecure and host not in LOOPBACK and not host.startswith("127."):
        raise UserError(f"refusing to serve on {host} without an API key: anyone who reaches it could use this "
                        "machine (give --api-key or --api-key-file, or --insecure on a trusted network)")


def read_api_key(key: str | None, key_file: str | None) -> str | None:
    if key is not None and key_file is not None:
        raise UserError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read the API key file: {e}") from None
    if key is not None and not key:
        raise UserError("the API key is empty")
    return key


def serve(gen: Generator, *, host: str, port: int, model_name: str, api_key: str | None,
          cors_origins: tuple[str, ...] = (), limits: ServerLimits | None = None) -> None:
    import uvicorn

    from .app import create_app

    limits = limits or ServerLimits()
    app = create_app(gen, model_name=model_name, api_key=api_key, cors_origins=cors_origins, limits=limits)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                print(f"serving http://{shown}:{bound[1]}", flush=True)

    # h11's own limit on a request's headers (16 KiB) stays; GuardedH11 adds their read timeout
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off",
                            http=GuardedH11.with_timeout(limits.read_timeout_s))
    server = Server(config)

    def engine_died(e: BaseException) -> None:
        print(f"hetpipe serve: the serving engine stopped: {e!r}; exiting", file=sys.stderr, flush=True)
        server.should_exit = True

    gen.engine.on_fatal = engine_died
    # the model and the tokenizer are loaded: their objects leave the collector's generations, so a
    # full collection (which may run on the event loop) no longer walks them
    gc.collect()
    gc.freeze()
    server.run()
    if not server.started:
        raise UserError(f"could not listen on {host}:{port} (is the port in use?)")
    if gen.engine.error is not None:
        raise StageFailure(f"the serving engine stopped: {gen.engine.error!r}")
    print("hetpipe serve: stopped", file=sys.stderr, flush=True)
