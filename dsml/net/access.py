"""Who owns a job, and who may act on it: the job's owner, an admin, or the system.

A job records the principal that submitted it (:func:`principal`): over TLS the name of
the user certificate of the connection; without TLS (token mode) every token holder is
one principal, :data:`TOKEN_OWNER`.  Cancelling a job and reading its logs (and whatever
else is the job's own: a failed attempt's stderr tail) is for its owner and the admins
(``cluster.admins``, by default :data:`DEFAULT_ADMINS`) only (:func:`may_act_on`); the
master's and the workers' own identities may do what the system needs, and a token
connection may do everything (it is every principal at once).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Final

__all__ = ["DEFAULT_ADMINS", "TOKEN_OWNER", "may_act_on", "principal"]

#: The owner of a job submitted without TLS (any holder of the cluster token).
TOKEN_OWNER: Final = "token"

#: The users that may act on every job when ``cluster.admins`` is not set.
DEFAULT_ADMINS: Final = ("admin",)


def principal(conn: Any) -> str:
    """The owner a job submitted on ``conn`` gets: its certificate's name, or
    :data:`TOKEN_OWNER` on a connection without TLS."""
    ident = getattr(conn, "identity", None)
    return TOKEN_OWNER if ident is None else str(ident.name)


def may_act_on(conn: Any, owner: str | None, admins: Collection[str]) -> bool:
    """Whether the peer of ``conn`` may act on a job of ``owner`` (cancel it, read its
    logs): its owner, an admin, the master or a worker; anyone on a token connection.
    ``owner`` None (not known here) is for admins only."""
    ident = getattr(conn, "identity", None)
    if ident is None:
        return True
    if ident.kind != "user":
        return True
    return ident.name in admins or (owner is not None and ident.name == owner)
