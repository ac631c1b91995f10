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


class OutcomeUnknown(DsmlError):
    """A write failed in a way that leaves its outcome open: some worker may have stored
    it (a later hop of its pipeline failed, the connection dropped after the whole write
    was sent, or the master's commit failed or went unanswered), so it may or may not
    become visible.  Any other error of a write means it will not become visible
    (docs/protocol.md, section 12, "What a write's answer guarantees")."""

    code = "outcome-unknown"


#: Error codes of a first worker's answer to a write that mean a worker stored it.
STORED_SOMEWHERE = frozenset({"replication-failed", "outcome-unknown"})


def outcome_unknown(key: str, why: object) -> OutcomeUnknown:
    """The error for a write of ``key`` whose outcome is not known, saying ``why``."""
    return OutcomeUnknown(
        f"the write of {key!r} may or may not become visible: {why}"
    )
