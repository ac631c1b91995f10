"""Errors that carry a wire error code: the root of the one error hierarchy.

Anything raised as a :class:`DsmlError` inside a request handler becomes an ERROR
response with that code and message; the connection stays open.  The blocking client
raises the same class for an ERROR response, so callers see one error type end to end.

Every error with a wire code is a DsmlError subclass built as ``(message, code=None)``
(the class's own ``code`` when none is given).  The errors more than one part raises are
defined here, once: :class:`NotFound`, :class:`ChecksumMismatch` (the store, the clients)
and :class:`ConnectionLost` (the blocking client, the net layer's links).  A part's own
errors (``StoreError``, ``DirectoryError``, ``JobError``, ``TaskError``...) live beside it.
"""

from __future__ import annotations


class DsmlError(Exception):
    """An error with a wire ``code`` (``not-found``, ``bad-key``, ...) and a one-line message."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class NotFound(DsmlError):
    """The key does not exist."""

    code = "not-found"


class ChecksumMismatch(DsmlError):
    """Bytes did not hash to the sha256 they were meant to have."""

    code = "checksum-mismatch"


class ConnectionLost(DsmlError):
    """The peer closed the connection, or could not be reached, before it answered."""

    code = "connection"
