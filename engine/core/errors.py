"""The errors that cross module boundaries, by kind: what the CLI and the server answer for each.

`UserError`: bad input; the CLI prints one line and exits 2, the server answers 400.
`StageFailure`: the pipeline (a stage) could not serve; the server answers 503.
`RequestFailed`: one request failed on its own (a bug met with its data); it ends, the engine serves on.
"""


class UserError(Exception):
    """Bad input from a user (model, ranges, options, prompt): a clear one-line message."""


class StageFailure(RuntimeError):
    """A stage answered a request with an error, or did not answer in time."""


class QueueFull(UserError):
    """The engine's queue is at its limit: retry later (HTTP 429)."""


class GrammarFailed(UserError):
    """Structured output ran past the grammar engine's budget mid-generation: the request ends with
    this error of its own (the schema is too hard to enforce), never as a lost stage."""


class RequestFailed(RuntimeError):
    """One request failed where its own data was packed, sent or sampled; it alone ends."""


class BatchTooLarge(ValueError):
    """A micro-batch's message would pass the wire's limits: the engine sends it in parts."""
