"""Recovery policy: how long to wait for a lost stage's replacement, and what the engine redoes.

The pipeline does the socket work (`Pipeline.replace`: hello, identity check, load the lost layer
range); this module decides when to try, how long the whole recovery may take (the replacement's
load included), and what counts as done. The engine then frees every live sequence on every stage
and prefills it again from its token ids (`Engine._recover`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..core.pipeline import Pipeline

RETRY_S = 0.2  # between rounds of attempts while a lost stage has no replacement


@dataclass(slots=True)
class RecoveryEvent:
    """One recovery: which stages were lost, when it began, and how it ended."""

    lost: list[str]  # the lost stages, by address (or backend and layers)
    detected: float  # time.monotonic() when the engine began it
    ok: bool = False
    seconds: float = 0.0
    replaced_by: list[str] | None = None
    error: str = ""
    unreplaced: list[int] | None = None  # indices of the stages no one took the place of (not ok)


def recover(pipeline: Pipeline, lost: list[int], timeout_s: float, log=print) -> RecoveryEvent:
    """Put a stage in place of each lost one within `timeout_s` in all; never raises."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    names = [_name(pipeline.stages[i]) for i in lost]
    event = RecoveryEvent(names, t0)
    pipeline.abandon()  # the batches in flight are rebuilt from token ids, not waited for
    todo, replaced = list(lost), []
    while todo:
        for i in list(todo):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            where = pipeline.replace(i, left)
            if where is not None:
                log(f"recovered: layers {pipeline.stages[i].info.layer_range} on {where}")
                todo.remove(i)
                replaced.append(where)
        left = deadline - time.monotonic()
        if todo and left <= 0:
            gone = ", ".join(f"{names[lost.index(i)]} (layers {pipeline.stages[i].info.layer_range})" for i in todo)
            event.error = f"lost {gone}; no stage took its place within {timeout_s:.0f} s"
            event.seconds, event.unreplaced = time.monotonic() - t0, todo
            return event
        if todo:
            time.sleep(min(RETRY_S, left))
    event.ok, event.replaced_by, event.seconds = True, replaced, time.monotonic() - t0
    return event


def _name(stage) -> str:
    """A remote stage's address; an in-process one's backend and layers."""
    return getattr(stage, "address", None) or f"{stage.info.backend}:{stage.info.layer_range}"
