"""asyncio helpers that never lose a cancellation.

Python 3.10 and 3.11's `asyncio.wait_for` returns the awaited result when it completes in the same
loop iteration as a cancellation of the waiting task, and the cancellation is gone: a stream whose
client had disconnected then kept generating to its last token. `get_within` waits with
`asyncio.wait`, which always raises the cancellation.
"""

from __future__ import annotations

import asyncio


async def get_within(q: asyncio.Queue, timeout_s: float):
    """`await q.get()`, or `asyncio.TimeoutError` after `timeout_s`; a cancellation always raises
    (an item taken in that same instant is dropped: whoever cancelled reads no more)."""
    getter = asyncio.ensure_future(q.get())
    try:
        done, _ = await asyncio.wait({getter}, timeout=timeout_s)
    except asyncio.CancelledError:
        getter.cancel()
        raise
    if not done:
        getter.cancel()
        raise asyncio.TimeoutError
    return getter.result()
