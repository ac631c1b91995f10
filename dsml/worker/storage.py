"""The worker's storage server (the seed's WorkerServer): requests in, store operations out.

The handler decides and the :class:`~dsml.worker.store.Store` keeps the bytes; the
connection (:mod:`dsml.net.connection`) moves them.  A file upload streams into the store's
temporary file while hashing; the fsync and rename run in a thread so the reactor keeps
serving, and the index commit comes back to the reactor thread.  Each method declares
who may call it (``@responder``); the worker's wiring builds the table
(:func:`storage_responders`).

Trust (docs/protocol.md, section 12): a write's version is the master's.  A ``Version``
header on a write is refused ``forbidden`` from anyone; a cluster worker (one with a
:class:`~dsml.worker.trust.MasterTrust`) stores a write only under the version of the
``Grant`` the master signed for its key, and passes the grant, never a version, down the
pipeline.  ``Forward`` hops go only to workers the master has registered: anything else
is refused ``forbidden`` before a connection to it is attempted (synchronously when the
peer table in hand says so, else once the master's fresh table does; a file upload
refused that way is drained, stores nothing, and is answered ``forbidden``).  A
standalone server numbers writes itself: one without trust (the storage tests), or a
worker whose store never registered with a master (:meth:`Store.mark_joined
<dsml.worker.store.Store.mark_joined>`: the first registration ends that for good, so
no restart while the master is away reopens it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import STORED_SOMEWHERE, ConnectionLost, DsmlError, OutcomeUnknown
from ..net.connection import Connection
from ..net.responders import Reply, Responders, responder
from ..net.server import Response
from ..protocol.codec import Head, ResponseShape
from ..protocol.limits import DEFAULT_VALUE_MAX
from ..protocol.methods import ALL_ROLES, Role, storage_methods
from .store import FileWriter, Store
from .store import IndexEntry as Entry
from .trust import MasterTrust

T = TypeVar("T")

#: Largest page a ``list`` request may ask for.
LIST_MAX = 10_000
LIST_DEFAULT = 1_000

RunInThread = Callable[[Callable[[], T]], "Deferred[T]"]

#: Told of every committed write and delete: (op, entry) with op "store" or "delete".
OnChange = Callable[[str, Entry], None]

#: Bytes of an upload held while the link to the next worker of its pipeline opens;
#: past this, reading from the client pauses until the link is up.
FORWARD_BUFFER = 8 * 1024 * 1024

#: Seconds the link to the next worker of a pipeline may take to open (connect and
#: authenticate): a worker that does not answer is out of the pipeline, fast, rather
#: than after the client's whole-payload deadline.
FORWARD_CONNECT_TIMEOUT = 5.0

#: Seconds the next worker of a pipeline may take no bytes at all while more wait to go
#: down to it (its link stalled: a pulled cable, a hung process): it is then out of the
#: pipeline, and the client's bytes flow again.
FORWARD_STALL = 10.0

#: Who may read and write the store: users, and workers (pipelines, replicas, task
#: inputs and outputs).
_READ_WRITE = frozenset({Role.CLIENT, Role.WORKER})


def entry_headers(entry: Entry) -> dict[str, object]:
    """The headers that describe a stored entry in a reply."""
    return {
        "Kind": entry.kind,
        "Size": entry.size,
        "Sha256": entry.sha256,
        "Version": entry.version,
    }


def entry_json(entry: Entry) -> dict[str, Any]:
    """One line of a ``list`` reply."""
    return {
        "key": entry.key,
        "kind": entry.kind,
        "size": entry.size,
        "sha256": entry.sha256,
        "version": entry.version,
        "mtime": entry.mtime,
    }


def storage_responders(
    handler: StorageHandler, task_logs: object, value_max: int = DEFAULT_VALUE_MAX
) -> Responders:
    """The storage server's table: the store's methods from ``handler``, ``task_log``
    from ``task_logs`` (:class:`~dsml.worker.runner.TaskLogs`)."""
    return Responders(storage_methods(value_max), handler, task_logs)


class StorageHandler:
    """Answers the store's methods of :func:`dsml.protocol.methods.storage_methods`.

    ``run_in_thread`` runs a blocking function off the reactor thread and returns a
    Deferred of its result (``deferToThreadPool`` in production; inline in tests).
    ``links`` (a :class:`dsml.net.links.Links`) lets uploads with a ``Forward`` header
    pass on down a pipeline; ``on_change`` hears of every committed write and delete.
    Store errors are DsmlErrors: they answer with their own code.
    """

    def __init__(
        self,
        store: Store,
        run_in_thread: RunInThread[Any],
        links: Any = None,
        on_change: OnChange | None = None,
        trust: MasterTrust | None = None,
    ) -> None:
        self.store = store
        self.run_in_thread = run_in_thread
        self.links = links
        self.on_change = on_change
        #: The master's grants and peers (None: a standalone server).
        self.trust = trust

    def _version_for(self, head: Head) -> int | None:
        """The version a write is stored under: its grant's (a cluster worker), or
        None (a standalone server numbers it).  A Version header is refused."""
        h = head.headers
        if "version" in h:
            raise DsmlError(
                "a write may not choose its Version: versions are the master's to issue "
                "(send the Grant that place answered)",
                "forbidden",
            )
        if self.trust is None:
            if "grant" in h:
                raise DsmlError("this server is not a cluster worker: no Grant", "bad-header")
            return None
        if "grant" not in h and not self.store.joined:
            return None  # never registered with a master: a standalone server
        return self.trust.version_of(h["key"], h.get("grant"))

    def _check_forward(self, forward: list[str]) -> Deferred[None] | None:
        """None if ``forward`` may be used now; a Deferred of the master's answer; or
        raises (``forbidden``, ``unavailable``)."""
        if not forward:
            return None
        if self.links is None:
            raise DsmlError("this server does not forward uploads", "bad-header")
        if self.trust is None:
            return None
        return self.trust.forward_check(forward)

    def changed(self, op: str, entry: Entry) -> None:
        """Tell the listener (the worker's reports to the master) of a committed change."""
        if self.on_change is not None:
            self.on_change(op, entry)

    # -- methods ----------------------------------------------------------------------

    @responder("ping", roles=ALL_ROLES)
    def _ping(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        return Reply()

    @responder("file_upload", roles=_READ_WRITE)
    def _file_upload(self, head: Head, conn: Connection) -> Upload:
        """Start a file upload (and its pipeline to the next workers, if Forward says so)."""
        forward = _forward_list(head)
        version = self._version_for(head)
        check = self._check_forward(forward)
        writer = self.store.begin_file(head.headers["key"], version)
        return Upload(self, writer, head, conn, forward, check)

    @responder("value_upload", roles=_READ_WRITE)
    def _value_upload(
        self, head: Head, payload: bytes, conn: Connection
    ) -> bytes | Deferred[Reply]:
        # Only an upload is passed on down a pipeline (file_upload: see _file_upload).
        forward = _forward_list(head)
        version = self._version_for(head)
        check = self._check_forward(forward)
        if check is None:
            return self._store_value(head, payload, forward, version)
        # Checked with the master first: stored only once every hop is known.
        return check.addCallback(
            lambda _: self._store_value(head, payload, forward, version, reply=True)
        )

    def _store_value(
        self, head: Head, payload: bytes, forward: list[str], version: int | None,
        reply: bool = False,
    ) -> Any:
        entry = self.store.put_value(head.headers["key"], payload, version)
        if self.on_change is not None:
            self.on_change("store", entry)
        local = Reply({"Version": entry.version, "Sha256": entry.sha256, "Size": entry.size})
        if forward:
            return self._forward_value(head, payload, forward, local)
        if reply:
            return local
        return _STORED.encode(head.id, (entry.version, entry.sha256, entry.size))

    def _forward_value(
        self, head: Head, payload: bytes, forward: list[str], local: Reply
    ) -> Deferred[Reply]:
        first, rest = forward[0], forward[1:]
        headers = _downstream_headers(head, rest)
        d = _opened_in_time(self.links.shared(first), getattr(self.links, "clock", None), first)
        d.addCallback(lambda link: link.request("value_upload", headers, payload))

        def done(response: Response) -> Reply:
            local.headers["Replicas"] = 1 + int(response.headers.get("replicas", "1"))
            return local

        return d.addCallbacks(done, _downstream_failed, errbackArgs=(first,))

    @responder("value_retrieve", roles=_READ_WRITE)
    def _value_retrieve(self, head: Head, payload: bytes, conn: Connection) -> bytes:
        entry, value = self.store.get_value(head.headers["key"])
        return _VALUE.encode(head.id, (entry.version,), value)

    @responder("file_retrieve", roles=_READ_WRITE)
    def _file_retrieve(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        entry, body = self.store.open_read(head.headers["key"])
        headers = entry_headers(entry)
        headers["Action"] = "write-file"
        return Reply(headers, body=body, body_length=entry.size)

    @responder("delete", roles={Role.CLIENT})
    def _delete(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        entry = self.store.delete(head.headers["key"])
        self.changed("delete", entry)
        return Reply({"Version": entry.version})

    @responder("stat", roles={Role.CLIENT})
    def _stat(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        entry = self.store.stat(head.headers["key"])
        headers = entry_headers(entry)
        headers["Mtime"] = f"{entry.mtime:.6f}"
        return Reply(headers)

    @responder("list", roles={Role.CLIENT})
    def _list(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        limit = int(head.headers.get("limit", LIST_DEFAULT))
        if not 1 <= limit <= LIST_MAX:
            raise DsmlError(f"Limit must be from 1 to {LIST_MAX}", "bad-header")
        entries = self.store.list(
            head.headers.get("prefix", ""), head.headers.get("after"), limit + 1
        )
        more = len(entries) > limit
        lines = [json.dumps(entry_json(e), ensure_ascii=False) for e in entries[:limit]]
        body = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
        return Reply({"More": 1} if more else {}, body)


#: The replies to value_upload and value_retrieve, the hottest requests.
_STORED = ResponseShape("Version", "Sha256", "Size")
_VALUE = ResponseShape("Version")


def _forward_list(head: Head) -> list[str]:
    forward = head.headers.get("forward")
    return forward.split(",") if forward else []


def _downstream_headers(head: Head, rest: list[str]) -> dict[str, object]:
    h = head.headers
    headers: dict[str, object] = {"Key": h["key"]}
    if "grant" in h:
        headers["Grant"] = h["grant"]  # each hop checks the master's grant itself
    if "sha256" in h:
        headers["Sha256"] = h["sha256"]
    if rest:
        headers["Forward"] = ",".join(rest)
    return headers


def _opened_in_time(opening: Deferred[T], clock: Any, addr: str) -> Deferred[T]:
    """``opening`` (a link to the next worker of a pipeline), failed ``unreachable`` if
    it is not open within FORWARD_CONNECT_TIMEOUT seconds of ``clock`` (None: no bound)."""
    if clock is None:
        return opening
    timer = clock.callLater(FORWARD_CONNECT_TIMEOUT, opening.cancel)

    def opened(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        elif isinstance(result, Failure) and result.check(CancelledError):
            return Failure(DsmlError(
                f"no link to {addr} within {FORWARD_CONNECT_TIMEOUT:g} s", "unreachable"
            ))
        return result

    return opening.addBoth(opened)


def _why(failure: Failure) -> str:
    e = failure.value
    return f"{e.message} [{e.code}]" if isinstance(e, DsmlError) else str(e)


def _downstream_failed(failure: Failure, addr: str) -> None:
    raise DsmlError(
        f"stored here, but forwarding to {addr} failed: {_why(failure)}", "replication-failed"
    )


class Upload:
    """One file upload in flight: chunks go to the store's temporary file and, in a
    pipeline, on to the next worker as they arrive (as HDFS does), the client's bytes
    read no faster than the next worker takes them."""

    def __init__(
        self,
        handler: StorageHandler,
        writer: FileWriter,
        head: Head,
        conn: Connection,
        forward: list[str],
        check: Deferred[None] | None = None,
    ) -> None:
        self.handler = handler
        self.writer = writer
        self.expected = head.headers.get("sha256")
        self.conn = conn
        self.down: Connection | None = None
        #: The next worker's outcome: fires with (True, its Response) or (False, the
        #: Failure), never an errback: an upload dropped with neither end() nor abort()
        #: (as a simulated crash drops it) must not log its failure as unhandled.
        self.down_done: Deferred[tuple[bool, Any]] | None = None
        self.down_addr = ""
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._paused = False
        self._aborted = False
        self._forward_failed = False
        links = handler.links
        self._clock = getattr(links, "clock", None)
        self._pacer = _ClientPacer(conn.transport, self._clock, self._stalled)
        #: The payload's length, and how much of it went down the pipeline: once all
        #: of it did, the next worker may have stored the write whatever it answers.
        self.length = head.length
        self._forwarded = 0
        #: Why the master refused the pipeline (its Forward): nothing is stored then.
        self._refusal: Failure | None = None
        if forward:
            self.down_addr = forward[0]
            self.down_done = Deferred()
            headers = _downstream_headers(head, forward[1:])
            if check is None:
                self._open_down(headers, head.length)
            else:
                # end() waits for the master's answer: a refusal answers forbidden.
                self._checked = Deferred()
                check.addCallbacks(
                    lambda _: self._open_down(headers, head.length), self._refused
                )
                check.addBoth(lambda _: self._checked.callback(None))  # type: ignore[union-attr]

    #: Fires once the master's table has answered for the Forward (None: no wait).
    _checked: Deferred[None] | None = None

    def _open_down(self, headers: dict[str, object], length: int) -> None:
        if self._aborted:
            return
        opening = _opened_in_time(
            self.handler.links.open(self.down_addr), self._clock, self.down_addr
        )
        opening.addCallbacks(self._down_ready, self._down_failed, (headers, length))

    def _stalled(self) -> None:
        """The next worker took no bytes for FORWARD_STALL seconds: out of the pipeline."""
        if self.down_done is not None and not self.down_done.called:
            self._down_failed(Failure(DsmlError(
                f"{self.down_addr} took no bytes for {FORWARD_STALL:g} s", "timeout"
            )))

    def _refused(self, failure: Failure) -> None:
        """The master's table does not list a hop: drain the client, store nothing."""
        self._refusal = failure
        self._forward_failed = True
        self._pending = []
        self._unpause()
        assert self.down_done is not None
        if not self.down_done.called:
            self.down_done.callback((False, failure))  # end() answers with the refusal

    # -- the next worker --------------------------------------------------------------

    def _down_ready(self, link: Connection, headers: dict[str, object], length: int) -> None:
        if self._aborted or self._forward_failed:
            link.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.down = link
        link.request("file_upload", headers, length).addCallbacks(
            self._down_answered, self._down_refused
        )
        transport = link.transport
        for chunk in self._pending:
            transport.write(chunk)  # type: ignore[union-attr]
            self._forwarded += len(chunk)
        self._pending = []
        if not self.writer_done:
            # Pace the client by the next worker (Twisted pauses a streaming producer
            # when the consumer's buffer fills and resumes it when drained).
            transport.registerProducer(self._pacer, True)  # type: ignore[union-attr]
        self._unpause()

    writer_done = False

    def _down_answered(self, response: Response) -> None:
        if self.down is not None:
            self.down.transport.loseConnection()  # type: ignore[union-attr]
        assert self.down_done is not None
        if not self.down_done.called:
            self.down_done.callback((True, response))

    def _down_refused(self, failure: Failure) -> None:
        """The next worker's request failed: its own error answer, or its link broke."""
        if failure.check(DsmlError) and not failure.check(ConnectionLost):
            self._down_said = failure.value  # type: ignore[assignment]
        self._down_failed(failure)

    #: The next worker's own error answer (it stored nothing, unless it says otherwise).
    _down_said: DsmlError | None = None

    def _down_failed(self, failure: Failure, *args: object) -> None:
        self._forward_failed = True
        self._pending = []
        self._pacer.release(resume=True)  # the client's bytes flow again
        self._release_client()
        if self.down is not None:
            self.down.transport.abortConnection()  # type: ignore[union-attr]
        self._unpause()
        assert self.down_done is not None
        if not self.down_done.called:
            self.down_done.callback((False, failure))

    def _unpause(self) -> None:
        if self._paused:
            self._paused = False
            self.conn.transport.resumeProducing()  # type: ignore[union-attr]

    def _release_client(self) -> None:
        self._pacer.release(resume=False)
        if self.down is not None and self.down.transport is not None:
            transport = self.down.transport
            if getattr(transport, "producer", None) is self._pacer:
                transport.unregisterProducer()  # type: ignore[union-attr]

    # -- the Call interface -----------------------------------------------------------

    def data(self, chunk: bytes) -> None:
        """Write and hash the next chunk; pass it down the pipeline."""
        if self._refusal is not None:
            return  # refused: the rest is drained, not stored
        self.writer.write(chunk)
        if self.down_done is None or self._forward_failed:
            return
        if self.down is not None:
            self.down.transport.write(chunk)  # type: ignore[union-attr]
            self._forwarded += len(chunk)
            return
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes > FORWARD_BUFFER and not self._paused:
            self._paused = True
            self.conn.transport.pauseProducing()  # type: ignore[union-attr]

    def end(self) -> Deferred[Reply]:
        """fsync and rename in a thread, commit to the index here; in a pipeline, answer
        once the next worker has answered too."""
        self.writer_done = True
        self._release_client()
        if self._checked is not None and not self._checked.called:
            return self._checked.addCallback(lambda _: self._finish())
        return self._finish()

    def _finish(self) -> Deferred[Reply]:
        if self._refusal is not None:
            self.writer.abort()
            return fail(self._refusal)
        local = self.handler.run_in_thread(self.writer.prepare)
        local.addCallback(self._commit)
        local.addErrback(self._failed)
        if self.down_done is None:
            return local
        local.addErrback(self._bound_down)
        # Both outcomes, whichever fails: the answer says what may have been stored.
        both = DeferredList([local, self.down_done], consumeErrors=True)
        return both.addCallback(self._outcome)

    def _outcome(self, results: list[tuple[bool, Any]]) -> Reply:
        """The pipeline's answer (docs/protocol.md, section 12): OK when this copy and
        the rest are stored; ``replication-failed`` when this copy is (the write will
        be visible) but a later hop failed; ``outcome-unknown`` when this copy failed
        but a later worker may have stored it; else this copy's error (nothing stored
        anywhere)."""
        (local_ok, local), (_, (down_ok, down)) = results
        if local_ok and down_ok:
            local.headers["Replicas"] = 1 + int(down.headers.get("replicas", "1"))
            return local  # type: ignore[no-any-return]
        if local_ok:
            _downstream_failed(down, self.down_addr)
        if down_ok or self._down_may_have_stored(down):
            raise OutcomeUnknown(
                f"not stored here ({_why(local)}), but {self.down_addr} may have stored "
                "it: the write may or may not become visible"
            )
        local.raiseException()
        raise AssertionError("unreachable")

    def _down_may_have_stored(self, failure: Failure) -> bool:
        """Whether the next worker may hold the write although it failed ``failure``:
        it said so, or it did not answer (its link broke, or it was given up on) after
        the whole payload went down it."""
        e = failure.value
        if isinstance(e, DsmlError) and e.code in STORED_SOMEWHERE:
            return True
        if self._down_said is not None:
            return False  # its own answer: nothing stored there or further on
        return self.down is not None and self._forwarded >= self.length

    def _bound_down(self, failure: Failure) -> Failure:
        """This copy failed: the next worker's answer (which only says whether the write
        may be stored there) is waited for FORWARD_STALL seconds at most."""
        down_done = self.down_done
        if self._clock is not None and down_done is not None and not down_done.called:
            timer = self._clock.callLater(FORWARD_STALL, self._down_failed, Failure(
                DsmlError(f"no answer from {self.down_addr} within {FORWARD_STALL:g} s",
                          "timeout")
            ))

            def answered(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                return result

            down_done.addBoth(answered)
        return failure

    def _commit(self, _: object) -> Reply:
        entry = self.writer.commit(self.expected)
        self.handler.changed("store", entry)
        return Reply({"Size": entry.size, "Sha256": entry.sha256, "Version": entry.version})

    def _failed(self, failure: Any) -> None:
        self.writer.abort()
        failure.raiseException()

    def abort(self) -> None:
        """The upload will not complete: remove its temporary file, cut the pipeline."""
        self._aborted = True
        self.writer.abort()
        self._release_client()
        if self.down is not None:
            self.down.transport.abortConnection()  # type: ignore[union-attr]


@implementer(IPushProducer)
class _ClientPacer:
    """Pauses and resumes the client's upload as the next worker of the pipeline takes
    the bytes; never closes it.

    This, not the client's transport, is the producer registered on the link to the next
    worker: Twisted stops a consumer's producer when that consumer's connection is lost,
    and the death of the next worker must not close the client's connection (the client
    is owed the replication-failed answer :meth:`Upload._down_failed` prepares).
    """

    def __init__(
        self,
        transport: Any,
        clock: Any = None,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.on_stall = on_stall
        #: The client's reading is paused by this pacer.
        self.paused = False
        #: Out of the pipeline: this pacer neither pauses nor resumes any more.
        self.released = False
        self._timer: Any = None

    def pauseProducing(self) -> None:
        """The next worker is behind: stop reading from the client (and watch that the
        next worker takes bytes again within FORWARD_STALL seconds)."""
        if self.released:
            return
        self.paused = True
        self.transport.pauseProducing()
        if self.clock is not None and self.on_stall is not None and self._timer is None:
            self._timer = self.clock.callLater(FORWARD_STALL, self._stalled)

    def resumeProducing(self) -> None:
        """The next worker caught up: read from the client again."""
        if self.released:
            return
        self._stop_timer()
        self.paused = False
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The next worker's link closed: Upload._down_failed answers the client."""

    def release(self, resume: bool) -> None:
        """The next worker's part is over (failed, or the client's payload is whole):
        stop watching it; with ``resume`` the client's reading goes on if this paused it."""
        self._stop_timer()
        if self.released:
            return
        self.released = True
        if resume and self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _stalled(self) -> None:
        self._timer = None
        if not self.released and self.on_stall is not None:
            self.on_stall()
