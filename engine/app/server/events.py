"""Server-sent events with disconnects watched: the response side of a streamed request.

A stream's frames are written as they come while a second task listens for the client going away;
whichever ends first ends the other, so a disconnect cancels the generator at once (and with it
the request on every stage), not at its next write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable


class EventStream:
    """An ASGI response writing `text/event-stream` frames from `events`; `on_end(status)` is called
    once it ends: 200, the code of a `.code`-carrying error that ended it, or 499 (client gone)."""

    def __init__(self, events: AsyncIterator[str], on_end: Callable[[int], None]):
        self.events, self.on_end = events, on_end

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        code = 499

        async def write():
            nonlocal code
            try:
                async for frame in self.events:
                    await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})
                code = 200
            except Exception as e:
                code = getattr(e, "code", 500)
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnect(receive, write())
        except asyncio.CancelledError:
            pass  # the client went away: the events generator was closed with the writer
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()
            self.on_end(code)


async def until_disconnect(receive, work: Awaitable) -> object:
    """Run `work` while listening for `http.disconnect`; a disconnect cancels it (CancelledError)."""
    task = asyncio.ensure_future(work)

    async def listen():
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    listener = asyncio.ensure_future(listen())
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if not task.done():
        while not task.done():  # again until it ends: a cancellation swallowed inside must not hang us
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
        raise asyncio.CancelledError("the client disconnected")
    return task.result()
