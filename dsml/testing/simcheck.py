"""The checks of a nemesis run on its settled simulated cluster (:class:`Checker`).

After the faults heal (:mod:`dsml.testing.nemesis`): every live worker registered and
every client call ended; every key read once more through a new client; every
acknowledged job ended once, with at most one success per task and exactly that
attempt's outputs stored; replication restored and the directory matching the stores
with no stale copy left; nothing logged as a bug.  The reads against the writes are
:func:`dsml.testing.history.check_history`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from ..errors import DsmlError
from .history import Violation, check_history, seq_of
from .sim import SimTimeout
from .sim.tasks import output_bytes

if TYPE_CHECKING:
    from .nemesis import Run

#: A client call still pending this long (simulated seconds) is a hang.
HANG = 600.0
#: How long the cluster may take to settle after the faults heal.
SETTLE = 300.0
#: No client call may take longer (simulated seconds): a fault costs a call at most a
#: connect timeout (10 s) or TCP's user timeout (15 s, on the links the client and the
#: workers dial) and a stalled hop (10 s), not the 60 s payload deadline a write once
#: waited on a dead next hop (mutation ``hop-stall``: seed 2 finds it in 3 simulated
#: minutes, a 69 s upload, over the nemesis's per-socket TCP and 2 MiB/s links).
SLOW_CALL = 45.0
#: Seconds past the heartbeat timeout within which a silent worker must be declared dead
#: (a mid-transfer cut or a power cut after a write starts up to 5 s after its episode).
DETECT = 8.0



def monotonic(sim: Any, name: str, wall: float) -> list[float]:
    """The monotonic (shared) times at which machine ``name``'s wall clock read ``wall``,
    in order: several if a step back made it read that again; the moment of the step if
    a step forward skipped it."""
    if sim.walls is None:
        return [wall]
    segments = [(float("-inf"), sim.walls_at_start.get(name, 0.0))]
    segments += [(t, offset) for t, who, offset in sim.wall_steps if who == name]
    found = []
    for i, (begin, offset) in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else float("inf")
        at = wall - offset
        if begin <= at < end:
            found.append(at)
        elif not found and at < begin:
            found.append(begin)  # skipped by the step forward at ``begin``
    return found or [wall]


class Checker:
    """The invariants, over a finished run's history and its settled cluster."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.sim = run.sim
        self.violations: list[Violation] = []

    def fail(self, checker: str, message: str, key: str = "") -> None:
        self.violations.append(Violation(checker, message, key))

    def live(self) -> list[str]:
        return [w for w in self.run.workers if w not in self.run.dead]

    def settle(self) -> None:
        """Every live worker registered again, every client call ended."""
        sim = self.sim
        sim.until(lambda: sim.master is not None, timeout=5, what="the master")
        sim.wait_registered(self.live(), timeout=SETTLE)
        sim.until(lambda: all(op.end is not None for op in self.run.ops), timeout=HANG,
                  what="every client call to end")

    def final_reads(self) -> None:
        """Read every key once more, after healing, through a new client."""
        client = self.sim.client("checker")
        for key in sorted(self.run.seqs):
            op = self.run._op("checker", "get" if key.startswith("v/") else "download", key, -1)
            d = client.get(key) if key.startswith("v/") else client.download(key)
            d.addCallbacks(lambda data, op=op: self.run._done(op, "ok", seq=seq_of(data)),
                           lambda f, op=op: self.run._read_error(op, f))
            self.sim.until(lambda op=op: op.end is not None, timeout=120,
                           what=f"the final read of {key}")
            if op.outcome != "ok":
                self.fail("durability", f"after healing, {key} cannot be read: {op.detail}",
                          key)

    def check_history(self) -> None:
        self.violations += check_history(self.run.ops)

    def check_jobs(self) -> None:
        """Every acknowledged job ends once; at most one success per task; the stored
        outputs of a succeeded task are its succeeded attempt's."""
        sim = self.sim
        final = {"succeeded", "failed", "cancelled"}
        for job, first, second in self.run.reissued:
            self.fail("jobs", f"job id {job} acknowledged twice: the job of {first} was "
                      f"acknowledged, then lost, and its id given to the job of {second}")
        client = sim.client("job-checker")
        for job, (_, _n, outputs) in sorted(self.run.jobs.items()):
            try:
                sim.until(lambda job=job: sim.job(job).state in final, timeout=SETTLE,
                          what=f"job {job} to end")
            except DsmlError as e:
                self.fail("jobs", f"acknowledged job {job} is not known: {e}")
                continue
            except SimTimeout:
                self.fail("jobs", f"job {job} did not end: {sim.job(job).state}")
                continue
            view = sim.job(job)
            taken = {}
            for r in sim.results:
                if r.taken and not r.reason:
                    taken[r.attempt_id] = taken.get(r.attempt_id, 0) + 1
            for t in view.tasks:
                wins = [a for a in t.attempts if a.state == "succeeded"]
                if len(wins) > 1:
                    self.fail("jobs", f"job {job} task {t.index}: {len(wins)} successes")
                if t.state == "succeeded" and len(wins) != 1:
                    self.fail("jobs", f"job {job} task {t.index} succeeded without a "
                              "succeeded attempt")
                if view.state == "succeeded" and t.state != "succeeded":
                    self.fail("jobs", f"job {job} succeeded but task {t.index} is {t.state}")
                if t.state != "succeeded" or len(wins) != 1:
                    continue
                a = wins[0]
                key = outputs[t.index]
                want = output_bytes(a.worker, a.id, key)
                d = client.download(key)
                got: list[Any] = []
                d.addBoth(got.append)
                sim.until(lambda got=got: bool(got), timeout=120, what=f"output {key}")
                if isinstance(got[0], Failure):
                    self.fail("outputs", f"job {job} task {t.index}: output {key} unreadable: "
                              f"{got[0].getErrorMessage()}", key)
                elif got[0] != want:
                    self.fail("outputs", f"job {job} task {t.index}: {key} holds "
                              f"{got[0][:60]!r}, not attempt {a.id}'s output", key)

    def check_store(self) -> None:
        """Replication restored; the directory and the stores agree; no stale copies."""
        sim = self.sim
        live = self.live()
        want = min(sim.replication, len(live))

        # A key whose every copy is on a worker that died for good has nothing to repair
        # from: if it was acknowledged, the durability and output checks report it; if not
        # (an attempt's upload that failed half-way), it is a legitimate loss.
        def short() -> dict[str, list[str]]:
            return {k: sorted(ws) for k, ws in sim.replicas(live=True).items()
                    if 0 < len(ws) < want}

        try:
            sim.until(lambda: not short(), timeout=SETTLE, what="replication")
        except SimTimeout:
            self.fail("replication", f"under-replicated after {SETTLE:g} s: {short()}")

        master = sim.master
        assert master is not None

        def agreed() -> list[str]:
            problems = []
            rows = master.directory.list("", None, 10**9)
            current = {}
            for key, _size, _sha, version, holders in rows:
                current[key] = version
                for w in holders:
                    if w not in sim.workers or w in self.run.dead:
                        continue
                    entry = sim.stored(w).get(key)
                    if entry is None or entry.version != version:
                        have = "nothing" if entry is None else f"version {entry.version}"
                        problems.append(f"{w} should hold {key} v{version}, has {have}")
            for w in sim.workers:
                for key, entry in sim.stored(w).items():
                    if key in current and entry.version < current[key]:
                        problems.append(f"{w} keeps a stale copy of {key}: v{entry.version} "
                                        f"< v{current[key]}")
            return problems

        try:
            sim.until(lambda: not agreed(), timeout=SETTLE, what="the stores to match")
        except SimTimeout:
            for p in agreed()[:10]:
                self.fail("store", p)

    def check_calls(self) -> None:
        """Every client call ended within :data:`SLOW_CALL` (the final reads aside)."""
        slow = [op for op in self.run.ops if op.end is not None and op.client != "checker"
                and op.end - op.start > SLOW_CALL]
        for op in slow[:5]:
            self.fail("slow-call", f"{op.end - op.start:.1f} s: {op.line()}", op.key)

    def check_acks(self) -> None:
        """Right after a master restart (within a heartbeat timeout of it) no write is
        acknowledged with fewer copies than the replication factor while that many
        workers were up: the restarted master must wait for them, not place on the
        first to register."""
        grace = self.sim.heartbeat_timeout
        want = self.sim.replication
        for op in self.run.ops:
            if op.kind not in ("set", "upload") or op.outcome != "ok" or op.end is None:
                continue
            fields = dict((f[0], f[1:]) for f in op.detail.split() if f[:1] in "vru")
            copies, up = int(fields.get("r", want)), int(fields.get("u", "p0")[1:] or 0)
            if copies < want <= up and any(
                t <= op.end <= t + grace for t in self.run.master_starts
            ):
                self.fail("under-replicated-ack", f"{op.line()}: {copies} of {want} copies "
                          f"with {up} workers up, {grace:g} s after a master restart", op.key)

    def check_losses(self) -> None:
        """An attempt is lost only when its worker met a fault: one lost while nothing
        happened to its worker (only to the master) was a finished or running task
        thrown away, to be run again."""
        faults: dict[str, list[tuple[float, float]]] = {}
        for e in self.run.episodes:
            for w in (e.target, e.other):
                if w and w != "master":
                    faults.setdefault(w, []).append((e.start, e.start + e.length))
        slack = 2 * self.sim.heartbeat_timeout
        # An attempt whose run order never reached its worker (the master crashed or
        # was cut right after sending it) is lost rightly: only those that ran count.
        started = {e.attempt_id for e in self.sim.task_events if e.what in ("start", "adopt")}
        for job in sorted(self.run.jobs):
            try:
                view = self.sim.job(job)
            except Exception:
                continue
            for t in view.tasks:
                for a in t.attempts:
                    if a.state != "lost" or a.ended is None or a.id not in started:
                        continue
                    # The master stamps attempts by its wall clock: the widest reading.
                    readings = monotonic(self.sim, "master", a.ended)
                    ended = readings[-1]
                    began = monotonic(self.sim, "master", a.started)[0]
                    if any(w == a.worker and abs(t - x) < 1e-6
                           for t, w in self.run.lone_deaths for x in readings):
                        continue  # the last live worker fell silent: it dies, by design
                    hit = any(s - slack <= ended and began <= e + slack
                              for s, e in faults.get(a.worker, []))
                    if not hit:
                        self.fail("needless-loss", f"job {job} task {t.index}: attempt {a.id} "
                                  f"on {a.worker} lost at {ended:.1f} s ({a.reason}) though "
                                  "nothing happened to its worker")

    def check_detection(self) -> None:
        """A worker that crashed, lost power, died, was cut off or paused for longer
        than the heartbeat timeout is declared dead within :data:`DETECT` seconds of its
        fault, when the master ran throughout and two other workers were heard (the
        failure detector times silence on the monotonic clock: no step of a wall clock
        may hasten or delay a verdict)."""
        timeout = self.sim.heartbeat_timeout
        episodes = self.run.episodes
        window = DETECT + timeout

        def touched(name: str, begin: float, end: float) -> bool:
            return any(
                name in (e.target, e.other) and e.kind not in ("slow-disk", "clock-jump")
                and e.start < end and begin < e.start + max(e.length, 0.1)
                for e in episodes
            )

        for e in episodes:
            if e.kind not in ("crash", "power", "death", "cut", "pause") or e.length < window:
                continue
            end = e.start + window
            others = [w for w in self.live() if w != e.target and w not in self.run.dead
                      and not touched(w, e.start - timeout, end)]
            if touched("master", e.start - timeout, end) or len(others) < 2:
                continue
            if any(e.start <= t <= end for t in self.run.master_starts):
                continue
            if not any(w == e.target and e.start <= t <= end for t, w in self.run.deaths):
                self.fail("detection", f"{e.target} not declared dead within {window:g} s "
                          f"of its fault: {e}")

    def check_blocking(self) -> None:
        """The blocking client never takes an answer for another request's (the late
        reply of a call that timed out read by the next one)."""
        for op in self.run.ops:
            if op.client == "b1" and "does not answer request" in op.detail:
                self.fail("client-desync", op.line())
                return

    def check_logs(self) -> None:
        import gc

        gc.collect()  # a Deferred dropped with its failure logs it when collected
        for m in self.sim.failures.messages()[:5]:
            self.fail("bug-logged", m[:300])
        for f in self.sim.net.errors[:5]:
            self.fail("callback-raised", f.getErrorMessage()[:300])
