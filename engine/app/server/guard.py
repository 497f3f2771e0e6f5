"""The door of `hetpipe serve`: what a request may be before any work is done for it.

- `BodyGuard` (ASGI middleware): ambiguous framing (Transfer-Encoding with Content-Length, or two
  Content-Lengths) is a 400; a body over the cap is a 413, refused from its Content-Length before
  it is read, or as soon as a chunked body passes the cap; a body not in within the read timeout
  is a 408. The body is read whole here and handed on.
- `GuardedH11` (uvicorn's HTTP/1.1 protocol): a connection whose request headers are not in within
  the read timeout is closed.
- `parse_json`: the one place the server parses a body. Every way it can fail (not UTF-8, not JSON,
  NaN, an integer of a thousand digits, nesting past MAX_DEPTH, a lone surrogate, more than
  MAX_JSON_VALUES values) is a `ParamError`, a 400, never a 500. It runs on a worker thread: its
  cost is bounded by the counts checked first, so it never holds the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass

from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...core.errors import UserError

MAX_REQUEST_BYTES = 8 << 20  # the default body cap (--max-request-bytes)
READ_TIMEOUT_S = 30.0  # the default time for a request's headers, and then its body, to arrive (--read-timeout)
MAX_JSON_VALUES = 1 << 18  # commas and colons in a body: bounds the work of parsing it (a 128k-id prompt fits)
MAX_DEPTH = 64  # nesting of JSON objects and arrays
MAX_INT_DIGITS = 32  # an integer literal longer than this fits no field


@dataclass(slots=True)
class ServerLimits:
    max_request_bytes: int = MAX_REQUEST_BYTES
    read_timeout_s: float = READ_TIMEOUT_S

    def __post_init__(self):
        if self.max_request_bytes < 1024:
            raise UserError("--max-request-bytes must be at least 1024")
        if not self.read_timeout_s > 0:
            raise UserError("--read-timeout must be > 0 seconds")


class ParamError(UserError):
    """A 400 naming the parameter at fault."""

    status = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class ModelNotFound(ParamError):
    status = 404


# -- the body ---------------------------------------------------------------------------------------

class BodyGuard:
    """ASGI middleware: framing, the body cap and the body's read timeout (see the module)."""

    def __init__(self, app, limits: ServerLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        lengths = [v for k, v in headers if k == b"content-length"]
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if len(lengths) > 1 or (lengths and chunked):
            return await _refuse(send, 400, "ambiguous framing: Transfer-Encoding with Content-Length, or two "
                                            "Content-Lengths", scope["path"])
        if lengths:
            try:
                declared = int(lengths[0])
            except ValueError:
                return await _refuse(send, 400, "Content-Length is not a number", scope["path"])
            if declared > self.limits.max_request_bytes:
                return await _refuse(send, 413, self._too_large(), scope["path"])
        body, why = await self._read(receive)
        if why is not None:
            return await _refuse(send, *why, scope["path"])
        return await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> tuple[bytes, tuple[int, str] | None]:
        """The whole body, or (b"", (status, why)) if it is too large or too slow."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.read_timeout_s
        parts, size = [], 0
        while True:
            task = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                task.cancel()
                return b"", (408, f"the request body did not arrive within {self.limits.read_timeout_s:g} s")
            message = task.result()
            if message["type"] == "http.disconnect":
                return b"", (400, "the client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_request_bytes:
                return b"", (413, self._too_large())
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), None

    def _too_large(self) -> str:
        return f"the request body is larger than {self.limits.max_request_bytes} bytes (--max-request-bytes)"


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body read already (once, keeping no reference: a large
    body is freed as soon as the app drops it), then the connection's own messages (a disconnect,
    which the app watches for)."""
    pending = [body]

    async def replayed():
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replayed


ANTHROPIC_PATHS = ("/v1/messages",)  # errors there come in Anthropic's shape
ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict:
    """An error body as Anthropic's API writes it."""
    return {"type": "error", "error": {"type": ANTHROPIC_KINDS.get(status, "api_error"), "message": message}}


async def _refuse(send, status: int, message: str, path: str = "") -> None:
    kind = {400: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error"}[status]
    body = json.dumps(anthropic_error(status, message) if path in ANTHROPIC_PATHS else
                      {"error": {"message": message, "type": kind, "param": None,
                                 "code": {413: "request_too_large", 408: "request_timeout"}.get(status)}}).encode()
    # the connection closes after it: the rest of the request was not read
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a header timeout: a connection waiting for a request's headers
    for longer than the read timeout (set on the class: `with_timeout`) is closed."""

    header_timeout_s = READ_TIMEOUT_S
    _header_timer = None

    @classmethod
    def with_timeout(cls, seconds: float) -> type[GuardedH11]:
        return type("GuardedH11", (cls,), {"header_timeout_s": seconds})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._waiting():
            self._arm()
        super().data_received(data)
        if not self._waiting():
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting(self) -> bool:
        """No request being handled: the next bytes are a request's headers."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self._waiting() and not self.transport.is_closing():
            self.transport.close()


# -- the JSON ---------------------------------------------------------------------------------------

def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a `ParamError` saying why not (see the module)."""
    values = raw.count(b",") + raw.count(b":")
    if values > MAX_JSON_VALUES:
        raise ParamError(f"the request holds more than {MAX_JSON_VALUES} JSON values")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamError(f"the request body is not UTF-8: {e.reason} at byte {e.start}") from None
    try:
        body = json.loads(text or "null", parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise ParamError(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, and what the hooks raise
        raise ParamError(f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ParamError("the request body must be a JSON object")
    _check_tree(body)
    return body


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits fits no field")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_tree(body: dict) -> None:
    """Nesting within MAX_DEPTH, and every string (keys too) valid Unicode: no lone surrogates."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ParamError(f"the request body nests deeper than {MAX_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for s in (key, item):
                if isinstance(s, str) and not s.isascii():
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ParamError("the request holds a lone surrogate (\\ud800-\\udfff) in a string; "
                                         "strings must be valid Unicode") from None
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))


# the names pydantic puts in an error's location for a union's alternatives: not parameters
TYPE_TAGS = {"str", "int", "float", "bool"}
TAG_PREFIXES = ("dict[", "list[", "function-", "constrained-", "Annotated", "tagged-union[")


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """pydantic's most telling error as one line, and the parameter it names: of a union's
    alternatives, a bad value (out of range) before a wrong type."""
    errors = e.errors()
    err = max(errors, key=lambda x: (not x["type"].endswith("_type"), len(x["loc"])))
    loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and (x in TYPE_TAGS or x.startswith(TAG_PREFIXES)))]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        return f"unsupported field {param!r}: hetpipe does not implement it", param
    if err["type"] == "missing":
        return f"missing field {param!r}", param
    return f"{param}: {err['msg']}" if param else err["msg"], param
