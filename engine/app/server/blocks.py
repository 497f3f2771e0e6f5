"""A streamed answer as a sequence of output blocks, for the APIs that stream blocks rather than
deltas of one message: the Responses API's output items and Anthropic's content blocks.

A block is text or a tool call; one is open at a time, numbered in order from 0:
`("open", n, "text", None)`, `("open", n, "call", Call)`, then `("delta", n, kind, piece)` (text, or
a piece of the call's arguments), then `("close", n, kind, text or Call)`; the last event is
`("end", finish_reason, calls)`, the finish reason `tool_calls` where complete calls were made.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from . import completions as C
from . import tools as T


async def _pieces(plan: C.Plan, streams) -> AsyncIterator[tuple]:
    """The first choice's stream as ("text", piece), the call events of `tools.StreamedCalls`, and
    ("end", finish_reason, calls)."""
    calls = T.StreamedCalls(plan.tool_format, plan.tools, plan.forced_call, plan.parallel_tool_calls) \
        if plan.tools else None
    async for _, chunk in C.merged(plan, streams):
        text, events = calls.feed(chunk.text) if calls else (chunk.text, [])
        if text:
            yield "text", text
        for event in events:
            yield event
        if chunk.finish_reason:
            made = []
            if calls:
                rest, events, made = calls.finish()
                if rest:
                    yield "text", rest
                for event in events:
                    yield event
            yield "end", "tool_calls" if made else chunk.finish_reason, made


async def output_blocks(plan: C.Plan, streams) -> AsyncIterator[tuple]:
    """The block events of the first choice's stream (see the module)."""
    n, kind, payload = -1, None, None  # the open block

    def close():
        return ("close", n, kind, payload) if kind else None

    async for event in _pieces(plan, streams):
        if event[0] == "end":
            if kind:
                yield close()
            yield event
            return
        if event[0] == "text" and kind != "text" or event[0] == "call":
            if kind:
                yield close()
            n, kind = n + 1, "text" if event[0] == "text" else "call"
            payload = "" if kind == "text" else event[2]
            yield "open", n, kind, None if kind == "text" else payload
            if kind == "call":
                continue
        if kind == "text":
            payload += event[1]
            yield "delta", n, "text", event[1]
        else:
            yield "delta", n, "call", event[2]
