"""A history of client calls, and the checker of reads against writes.

Shared by the simulated nemesis (:mod:`dsml.testing.nemesis`) and the real multi-host
runs (:mod:`dsml.testing.netload`): each client call is an :class:`Op` (a write's
outcome ok / failed / unknown, a read's write number), and :func:`check_history` names
every :class:`Violation` of the guarantees in the README and docs/protocol.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from ..errors import DsmlError

if TYPE_CHECKING:
    from .faultplan import Episode

#: Errors after which a request other than a write (a remove, a submit, a cancel) may
#: still have been carried out: it was sent, and its answer did not come.
UNANSWERED = frozenset({"connection", "timeout", "outcome-unknown", "internal"})


def write_outcome(e: BaseException, kind: str = "set") -> str:
    """How a call that raised ``e`` ended for its caller.  A write (``set``, ``upload``)
    is "unknown" only when the client says so (``outcome-unknown``) or raised something
    that is not a dsml answer: any other dsml error promises the write never becomes
    visible (docs/protocol.md).  Another request (``remove``, ``submit``, ...) is
    "unknown" when its answer did not come (:data:`UNANSWERED`)."""
    if not isinstance(e, DsmlError):
        return "unknown"
    if kind in ("set", "upload"):
        return "unknown" if e.code == "outcome-unknown" else "failed"
    return "unknown" if e.code in UNANSWERED else "failed"


@attrs.define
class Op:
    """One client operation: what it asked, when, and how it ended."""

    id: int
    client: str
    kind: str  # set, upload, remove, get, download, submit, cancel
    key: str
    seq: int  # the write's number on its key (writes), the number read (reads; -1 absent)
    start: float
    end: float | None = None
    outcome: str = "pending"  # ok, failed, unknown (writes); ok, error (reads)
    detail: str = ""
    #: The order of its start and end among all starts and ends (many happen at one
    #: simulated instant: this says which came first).
    began: int = 0
    ended: int = -1

    def line(self) -> str:
        end = "   ...  " if self.end is None else f"{self.end:8.2f}"
        return (f"#{self.id:<5} {self.client} {self.start:8.2f}-{end} {self.kind:<8} "
                f"{self.key:<14} seq={self.seq:<4} {self.outcome:<8} {self.detail}")


@attrs.define
class Violation:
    checker: str
    message: str
    key: str = ""


def seq_of(data: bytes) -> int:
    """The write number a stored value or file starts with (``key=SEQ;``)."""
    head = data[:200].split(b";", 1)[0]
    try:
        return int(head.rsplit(b"=", 1)[1])
    except (IndexError, ValueError):
        return -2  # not anything this workload wrote


def check_history(ops: Sequence[Op]) -> list[Violation]:
    """Reads against writes, key by key (each key has one writer, writing in turn): no
    acknowledged write lost, no write answered "failed" ever read, reads never going
    back, every call ended.  Used on the simulated runs and on the real multi-host ones
    (:mod:`dsml.testing.netload`)."""
    out: list[Violation] = []

    def fail(checker: str, message: str, key: str = "") -> None:
        out.append(Violation(checker, message, key))

    hung = [op for op in ops if op.end is None]
    for op in hung:
        fail("hang", f"a client call never ended: {op.line()}", op.key)
    writes: dict[str, list[Op]] = {}
    reads: dict[str, list[Op]] = {}
    for op in ops:
        if op.kind in ("set", "upload", "remove"):
            writes.setdefault(op.key, []).append(op)
        elif op.kind in ("get", "download") and op.outcome == "ok":
            reads.setdefault(op.key, []).append(op)
    for key, rs in reads.items():
        ws = {w.seq: w for w in writes.get(key, [])}
        for r in rs:
            acked = [w.seq for w in ws.values()
                     if w.outcome == "ok" and 0 <= w.ended < r.began]
            floor = max(acked, default=0)
            if r.seq == -1:
                got = None
                # absent: no write acknowledged before, or the newest such is a remove
                # (or a later remove that was not answered failed)
                ok = floor == 0 or ws[floor].kind == "remove" or any(
                    w.kind == "remove" and w.seq > floor and w.outcome != "failed"
                    and w.began < r.ended for w in ws.values()
                )
            else:
                got = ws.get(r.seq)
                ok = got is not None and got.kind != "remove" and r.seq >= floor and (
                    got.outcome != "failed") and got.began < r.ended
            if not ok:
                what = "absent" if r.seq == -1 else f"write {r.seq}"
                why = (f"{r.client} read {what} of {key} at {r.start:.2f}-{r.end:.2f}, but "
                       f"write {floor} was acknowledged before it began")
                if got is not None and got.outcome == "failed":
                    why = f"{r.client} read write {r.seq} of {key}, answered failed"
                    fail("failed-visible", why, key)
                else:
                    fail("durability", why, key)
        # monotonic: a read that begins after another ended never sees an older write
        done = sorted(rs, key=lambda r: r.ended)
        for r in rs:
            for prev in done:
                if prev.ended >= r.began:
                    break
                if prev.seq > r.seq and not _removed_between(ws, r.seq, prev.seq):
                    fail("monotonic", f"{r.client} read {r.seq} of {key} at "
                         f"{r.start:.2f} after {prev.client} read {prev.seq} "
                         f"(ended {prev.end:.2f})", key)
                    break
    return out


def _removed_between(ws: dict[int, Op], low: int, high: int) -> bool:
    # Reading "absent" (-1) after a remove at a higher number is a newer state.
    return low == -1 and any(w.kind == "remove" and w.seq > high for w in ws.values())


@attrs.define
class Outcome:
    """What one run found."""

    seed: int
    minutes: float
    episodes: list[Episode]
    ops: list[Op]
    violations: list[Violation]
    jobs: int
    sim_seconds: float
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for op in self.ops:
            h.update(op.line().encode())
        for v in self.violations:
            h.update(f"{v.checker}:{v.message}".encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            out[op.outcome] = out.get(op.outcome, 0) + 1
        return out

    def report(self, history: bool = True) -> str:
        lines = [
            f"seed {self.seed}: {'ok' if self.ok else 'FAILED'}, {len(self.ops)} operations "
            f"{self.counts()}, {self.jobs} jobs, {len(self.episodes)} faults, "
            f"{self.sim_seconds:.0f} simulated s in {self.wall_seconds:.1f} s "
            f"(x{self.sim_seconds / max(self.wall_seconds, 1e-9):.0f}), digest {self.digest}"
        ]
        if self.ok:
            return "\n".join(lines)
        lines.append("faults:")
        lines += [f"  {e}" for e in self.episodes]
        lines.append("violations:")
        lines += [f"  [{v.checker}] {v.message}" for v in self.violations]
        if history:
            keys = {v.key for v in self.violations if v.key}
            shown = [op for op in self.ops if op.key in keys] if keys else self.ops[-40:]
            lines.append(f"history ({'of ' + ', '.join(sorted(keys)) if keys else 'last 40'}):")
            lines += [f"  {op.line()}" for op in shown]
        return "\n".join(lines)
