"""`hetpipe serve`: the app on uvicorn, saying `serving http://HOST:PORT` once it listens."""

from __future__ import annotations

import sys
from pathlib import Path

from ...core.errors import UserError
from ...serving.generator import Generator

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
          cors_origins: tuple[str, ...] = ()) -> None:
    import uvicorn

    from .app import create_app

    app = create_app(gen, model_name=model_name, api_key=api_key, cors_origins=cors_origins)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                print(f"serving http://{shown}:{bound[1]}", flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = Server(config)
    server.run()
    if not server.started:
        raise UserError(f"could not listen on {host}:{port} (is the port in use?)")
    print("hetpipe serve: stopped", file=sys.stderr, flush=True)
