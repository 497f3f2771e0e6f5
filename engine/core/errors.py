"""Errors a user caused: the CLI prints these as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from a user (model, ranges, options, prompt): a clear one-line message."""


class StageFailure(RuntimeError):
    """A stage answered a request with an error, or did not answer in time."""


class QueueFull(UserError):
    """The engine's queue is at its limit: retry later (HTTP 429)."""
