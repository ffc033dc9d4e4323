"""What can go wrong in loop's own terms: errors the domain raises and every caller can act on.

Pure Python: nothing here knows HTTP. The API maps each kind to a status and its `{"error": …}` body
(loop/api/errors.py); the CLI and the scheduler read the same message and code. `code` is a stable machine-readable
name (`run_in_progress`, `feedback_consumed`, …); the message says what to do instead.
"""

from __future__ import annotations


class LoopError(Exception):
    """A request loop refuses, with a message that says what to fix and a stable `code`."""

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s  # a transient refusal: when trying again makes sense


class Invalid(LoopError):
    """The request cannot be carried out as asked (an empty batch, a value out of range)."""


class NotFound(LoopError):
    """What the request names does not exist."""


class Conflict(LoopError):
    """It clashes with the current state (a run in progress, feedback already consumed)."""


class Unavailable(LoopError):
    """A part loop needs (vLLM, the training worker, the database) cannot serve right now."""


class UpstreamTimeout(LoopError):
    """vLLM did not answer in time."""
