"""The connection limits of a dsml server: one frozen class, from the config file to the wire.

The ``limits`` section of the configuration (:mod:`dsml.config`) is read into
:class:`Limits`, and every dsml connection enforces that same object (docs/protocol.md,
section 8).  No Twisted here: the config module imports this one.
"""

from __future__ import annotations

from typing import Final

import attrs

#: Default connection limits (docs/protocol.md, section 8).
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_MAX_UNAUTHENTICATED: Final = 64
DEFAULT_AUTH_TIMEOUT: Final = 10.0
DEFAULT_HEAD_TIMEOUT: Final = 10.0
DEFAULT_IDLE_TIMEOUT: Final = 60.0
DEFAULT_PAYLOAD_TIMEOUT: Final = 60.0


@attrs.frozen
class Limits:
    """Connection limits every dsml server enforces (the ``limits`` section of the config)."""

    #: Most simultaneous connections a server accepts.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Most connections that have not yet presented the token.
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    #: Seconds a new connection has to authenticate before it is closed.
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    #: Seconds a peer has to finish a message's header block once it has started it.
    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    #: Seconds a connection may sit with no request in progress.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Seconds a payload transfer may go without any progress.
    payload_timeout: float = DEFAULT_PAYLOAD_TIMEOUT
