"""Handlers that declare themselves: the ``@responder`` decorator and the table it builds.

A node's handler objects mark each method that answers requests, with the roles that may
call it::

    @responder("file_upload", roles={Role.CLIENT, Role.WORKER})
    def _file_upload(self, head: Head, conn: Connection) -> Call: ...

:class:`Responders` collects the marked methods of one or more objects and binds each to
its wire spec (:class:`~dsml.protocol.methods.MethodSpec`: headers, payload limit), so one
table says, per method, what it needs, who may call it and what answers it; building it
fails when a method of the spec has no responder or a responder names no method.  A
connection answers a request only from :meth:`Responders.allowed` for the roles it holds.

A buffered method's responder is called ``fn(head, payload, conn)`` and returns a
:class:`Reply`, a Deferred of one, or the whole response already encoded (bytes, made with
``codec.ResponseShape``: for the hottest methods).  A streamed method's responder
(``spec.streamed``) is called ``fn(head, conn)`` and returns a :class:`Call` that takes the
payload chunk by chunk.  Raising :class:`~dsml.errors.DsmlError` answers with its code.
``auth`` is the connection's own method (docs/protocol.md, section 7): no responder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred

from ..errors import DsmlError
from ..protocol.codec import Head
from ..protocol.methods import MethodSpec, MethodTable, Role, roles_text

if TYPE_CHECKING:
    from .connection import Connection

#: The method every connection answers itself, before any role is known.
AUTH = "auth"

F = TypeVar("F", bound=Callable[..., Any])


@attrs.define
class Reply:
    """A successful answer: headers, then ``payload`` or ``body_length`` bytes of ``body``."""

    headers: dict[str, object] = attrs.field(factory=dict)
    payload: bytes = b""
    body: IO[bytes] | None = None
    body_length: int = 0


class Call(Protocol):
    """A request whose payload the responder takes chunk by chunk (a file upload)."""

    def data(self, chunk: bytes) -> None:
        """Take the next payload chunk; raise DsmlError to fail the request."""

    def end(self) -> Reply | Deferred[Reply]:
        """The payload is complete: answer, now or later."""

    def abort(self) -> None:
        """The request will not complete (peer gone, error): clean up, leave nothing."""


#: What a buffered method's responder returns.
Answer = Reply | bytes | Deferred[Reply]
#: A buffered method's responder, and a streamed one's.
AnswerFn = Callable[[Head, bytes, "Connection"], Answer]
OpenFn = Callable[[Head, "Connection"], Call]

_MARK = "__dsml_responder__"


@attrs.frozen
class _Mark:
    name: str
    roles: frozenset[Role]
    pipelined: bool


def responder(
    name: str, *, roles: Iterable[Role], pipelined: bool = False
) -> Callable[[F], F]:
    """Declare the decorated method the answer to requests of ``name``, for a peer that
    holds one of ``roles``.

    ``pipelined``: on a two-way link, later requests of this method are taken while one
    still waits for its answer (the answers still go back in request order).
    """
    allowed = frozenset(roles)
    if not allowed:
        raise ValueError(f"responder {name!r} names no role that may call it")

    def mark(fn: F) -> F:
        setattr(fn, _MARK, _Mark(name, allowed, pipelined))
        return fn

    return mark


@attrs.frozen
class Responder:
    """One method of a node: its wire spec, who may call it, and the bound function."""

    spec: MethodSpec
    roles: frozenset[Role]
    fn: Callable[..., Any]
    pipelined: bool = False

    @property
    def name(self) -> str:
        """The method's name."""
        return self.spec.name


class Responders:
    """The methods one node answers, each bound to its spec and the roles that may call it.

    ``Responders(methods, *handlers)`` collects the ``@responder`` methods of ``handlers``
    for the spec ``methods``; every method of ``methods`` but ``auth`` must have exactly one.
    """

    def __init__(self, methods: MethodTable, *handlers: object) -> None:
        found: list[Responder] = []
        for handler in handlers:
            cls = type(handler)
            for attr in dir(cls):
                mark = getattr(getattr(cls, attr, None), _MARK, None)
                if not isinstance(mark, _Mark):
                    continue
                spec = methods.get(mark.name)
                if spec is None or mark.name == AUTH:
                    raise ValueError(
                        f"{cls.__qualname__}.{attr} answers {mark.name!r}, "
                        "not a method of its table"
                    )
                found.append(Responder(spec, mark.roles, getattr(handler, attr), mark.pipelined))
        self._bind(methods, found)

    @classmethod
    def of(cls, methods: MethodTable, responders: Iterable[Responder]) -> Responders:
        """A table of responders already made (say, those of another table, wrapped)."""
        table = cls.__new__(cls)
        table._bind(methods, responders)
        return table

    def _bind(self, methods: MethodTable, responders: Iterable[Responder]) -> None:
        self.methods = methods
        found: dict[str, Responder] = {}
        for r in responders:
            if r.name in found:
                raise ValueError(f"{r.name!r} has two responders")
            if methods.get(r.name) is not r.spec:
                raise ValueError(f"{r.name!r} is bound to another table's spec")
            found[r.name] = r
        missing = sorted(n for n in methods.specs if n != AUTH and n not in found)
        if missing:
            raise ValueError(f"no responder for {', '.join(missing)}")
        self._by_name = found
        #: Methods whose requests may overlap on a two-way link.
        self.pipelined = frozenset(n for n, r in found.items() if r.pipelined)
        self._allowed: dict[frozenset[Role], Mapping[str, Responder]] = {}

    def __iter__(self) -> Iterator[Responder]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Responder | None:
        """The responder of ``name``, whoever may call it."""
        return self._by_name.get(name)

    def allowed(self, roles: frozenset[Role]) -> Mapping[str, Responder]:
        """The responders a connection holding ``roles`` may call, by method name."""
        table = self._allowed.get(roles)
        if table is None:
            table = self._allowed[roles] = {
                n: r for n, r in self._by_name.items() if r.roles & roles
            }
        return table

    def refusal(self, name: str, roles: frozenset[Role]) -> DsmlError:
        """The error for a request of ``name`` from a connection holding ``roles`` that
        :meth:`allowed` does not let through: ``forbidden``, or ``unknown-method``."""
        r = self._by_name.get(name)
        if r is None:
            return DsmlError(f"method {name!r} is not served here", "unknown-method")
        return DsmlError(
            f"{name} may be called by {roles_text(r.roles)}, not {roles_text(roles)}",
            "forbidden",
        )


#: The table of a link whose other side sends no requests (a pure client's link).
NO_REQUESTS = Responders(MethodTable())
