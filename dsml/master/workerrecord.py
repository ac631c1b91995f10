"""A worker as the master's membership sees it (:class:`WorkerRecord`), its states, and
what a process runs (:class:`Versions`).  The rules that move a record from state to
state are :mod:`dsml.master.membership`'s, which re-exports every name here."""

from __future__ import annotations

from typing import Final

import attrs

from .jobs.model import Room

__all__ = ["ALIVE", "DEAD", "SUSPECT", "Versions", "WorkerRecord"]

#: States of a :class:`WorkerRecord` (see :mod:`dsml.master.membership`).
ALIVE: Final = "alive"
SUSPECT: Final = "suspect"
DEAD: Final = "dead"


@attrs.frozen
class Versions:
    """What a process runs: the dsml release and the wire protocol version."""

    dsml: str
    protocol: int

    def __str__(self) -> str:
        return f"dsml {self.dsml} (protocol {self.protocol})"


@attrs.define(eq=False)
class WorkerRecord:
    """One registration of one worker: a name at an incarnation, on one connection.

    A new incarnation gets a new record; the old record keeps describing the old one (dead),
    so a listener holding it never sees it change identity.  Times are monotonic seconds.
    """

    #: The worker's name (its key in the configuration).
    name: str
    #: Which start of that worker this is; higher is newer.
    incarnation: int
    #: Where its storage server listens.
    host: str
    port: int
    #: Task slots it declared, and how many were free at the last heartbeat.
    slots: int
    free_slots: int
    #: What it stores, and its free disk, as of the last heartbeat (bytes).
    stored_bytes: int
    stored_files: int
    free_disk: int
    #: ``alive``, ``suspect`` or ``dead``.
    state: str
    #: Monotonic time of the last heartbeat (or of the registration).
    last_heartbeat: float
    #: Monotonic time of the registration.
    registered_at: float
    #: The connection it registered on (opaque to this module).
    conn: object = attrs.field(default=None, repr=False)
    #: Monotonic time of its death, and why (``connection lost``, ...); None while live.
    died_at: float | None = None
    dead_reason: str | None = None
    #: Memory it offers tasks (bytes; 0: none declared) and its GPUs' ids.
    mem: int = 0
    gpus: tuple[str, ...] = ()
    #: What it runs function tasks with (:func:`dsml.fnrun.runtime`), "" if unknown.
    fn_runtime: str = ""

    @property
    def room(self) -> Room:
        """All it offers tasks: CPUs (its slots), memory, GPUs."""
        return Room(self.slots, self.mem, len(self.gpus))

    def seconds_since_heartbeat(self, now: float) -> float:
        """Seconds from the last heartbeat to ``now`` (a monotonic time)."""
        return now - self.last_heartbeat

    @property
    def live(self) -> bool:
        """True while the worker is alive or suspect, i.e. not dead."""
        return self.state != DEAD
