"""The errors that cross module boundaries, by kind: what the CLI and the server answer for each.

Every one is a `HetpipeError` whose `kind` names it on the wire: a stage daemon's ERROR frame
carries the kind and the coordinator raises the same type again (`rebuild`), so no code reads an
error's text to decide what to do.

| kind         | type             | raised when                                      | CLI / server      |
|--------------|------------------|--------------------------------------------------|-------------------|
| `input`      | `UserError`      | bad input: model, ranges, options, prompt, batch | exit 2 / 400      |
| `capacity`   | `CapacityError`  | a stage's limit: KV cache, sequences, call size  | exit 1 / 503      |
| `cache_miss` | `CacheMiss`      | a stage no longer holds prefix blocks it was named | prefilled again |
| `lost`       | `StageFailure`   | a stage did not answer, or refused the connection | recovered / 503  |
| `internal`   | `InternalError`  | a bug or a backend failure on a stage            | 503               |
"""

from __future__ import annotations


class HetpipeError(Exception):
    """Base of hetpipe's own errors; `kind` is how an ERROR frame names it."""

    kind = "internal"


class UserError(HetpipeError):
    """Bad input from a user (model, ranges, options, prompt) or a batch a stage refuses: a clear
    one-line message."""

    kind = "input"


class CapacityError(HetpipeError):
    """A stage is at one of its limits (KV cache, live sequences, tokens in one call)."""

    kind = "capacity"


class CacheMiss(HetpipeError):
    """A batch names prefix-cache blocks the stage no longer holds (it dropped them, or another
    coordinator's traffic evicted them): the coordinator prefills its sequences again."""

    kind = "cache_miss"


class StageFailure(HetpipeError, RuntimeError):
    """A stage is lost: it did not answer in time, refused the connection, or answered nonsense."""

    kind = "lost"


class InternalError(HetpipeError, RuntimeError):
    """A bug or a backend failure on a stage: the batch fails, the stage serves on."""

    kind = "internal"


class QueueFull(UserError):
    """The engine's queue is at its limit: retry later (HTTP 429)."""


class GrammarFailed(UserError):
    """Structured output ran past the grammar engine's budget mid-generation: the request ends with
    this error of its own (the schema is too hard to enforce), never as a lost stage."""


class RequestFailed(HetpipeError, RuntimeError):
    """One request failed where its own data was packed, sent or sampled; it alone ends."""


class BatchTooLarge(HetpipeError, ValueError):
    """A micro-batch's message would pass the wire's limits: the engine sends it in parts."""

    kind = "capacity"


WIRE_KINDS: dict[str, type[HetpipeError]] = {
    e.kind: e for e in (UserError, CapacityError, CacheMiss, StageFailure, InternalError)}


def rebuild(kind: object, message: str, lost: type[StageFailure] = StageFailure) -> HetpipeError:
    """The error an ERROR frame of `kind` names; an unknown or missing kind is a lost stage (`lost`:
    the coordinator's own subclass of `StageFailure`)."""
    cls = WIRE_KINDS.get(kind) if isinstance(kind, str) else None
    return lost(message) if cls is None or cls is StageFailure else cls(message)


def kind_of(e: BaseException) -> str:
    """The wire kind of any exception: hetpipe's own say theirs, anything else is internal."""
    return e.kind if isinstance(e, HetpipeError) else "internal"
