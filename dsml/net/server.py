"""The accepting side: a listener's connections, and who they are once authenticated.

:class:`ServerFactory` builds a :class:`~dsml.net.connection.Connection` per accepted
connection; each must authenticate first (docs/protocol.md, section 7).
:class:`TokenAuthenticator` checks the cluster token and grants every role (one token
speaks for clients, workers and the master alike); another authenticator may grant fewer
(the roles are then enforced per method, see :mod:`dsml.net.responders`).

The names the rest of dsml imported from here before the net layer was split
(``ServerProtocol``, ``ServerLimits``, ``Reply``, ``Response``, ``ConnectionLost``,
``BODY_CHUNK``) are kept as aliases.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConnectionLost
from ..protocol.codec import Head
from ..protocol.methods import ALL_ROLES, Role
from .answering import BODY_CHUNK, READ_SIZE, READ_SIZE_LARGE
from .calling import RESPONSE_MAX, Response
from .connection import Authenticate, Connection, ConnectionFactory
from .limits import Limits
from .responders import Call, Reply, Responders

if TYPE_CHECKING:
    from .tls import PeerCheck

#: Former names: a connection (accepted or dialled) and the connection limits.
ServerProtocol = Connection
ServerLimits = Limits


class TokenAuthenticator:
    """Checks an ``auth`` request's ``Token`` against the cluster token in constant time.

    A correct token grants ``roles`` (every role by default); a server without a token
    accepts any (for development only).
    """

    def __init__(self, token: str | None, roles: frozenset[Role] = ALL_ROLES) -> None:
        self._token = None if token is None else token.encode("utf-8")
        self.roles = roles

    def __call__(self, head: Head) -> frozenset[Role] | None:
        if self._token is not None:
            given = head.headers.get("token", "").encode("utf-8")
            if not hmac.compare_digest(given, self._token):
                return None
        return self.roles


class ServerFactory(ConnectionFactory):
    """Builds a :class:`Connection` per accepted connection; holds what they share.

    ``token`` is the cluster token (checked by a :class:`TokenAuthenticator`), unless
    ``authenticate`` decides instead; with ``peer_check`` (TLS) the peer's certificate
    decides and the token is not checked.  ``two_way=True`` makes each connection a two-way
    link (the master's: its workers' links carry orders back); ``on_lost`` hears of each
    two-way connection that closes.
    """

    def __init__(
        self,
        responders: Responders,
        clock: Any,
        token: str | None = None,
        limits: Limits | None = None,
        *,
        two_way: bool = False,
        on_lost: Callable[[Connection], None] | None = None,
        authenticate: Authenticate | None = None,
        peer_check: PeerCheck | None = None,
    ) -> None:
        super().__init__(
            responders,
            clock,
            limits,
            authenticate if authenticate is not None else TokenAuthenticator(token),
            two_way=two_way,
            dialled=None,
            on_lost=on_lost,
            peer_check=peer_check,
        )


__all__ = [
    "BODY_CHUNK",
    "READ_SIZE",
    "READ_SIZE_LARGE",
    "RESPONSE_MAX",
    "Call",
    "Connection",
    "ConnectionLost",
    "Reply",
    "Response",
    "ServerFactory",
    "ServerLimits",
    "ServerProtocol",
    "TokenAuthenticator",
]
