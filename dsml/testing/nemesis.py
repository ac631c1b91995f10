"""A seeded nemesis over the simulated cluster: faults, a workload, a history, checkers.

    .venv/bin/python -m dsml.testing.nemesis --seed 7 --minutes 5
    .venv/bin/python -m dsml.testing.nemesis --seeds 1-40 --minutes 3
    .venv/bin/python -m dsml.testing.nemesis --seed 7 --shrink
    .venv/bin/python -m dsml.testing.nemesis --budget 120         # as many seeds as fit

One run (:func:`run`) builds a :class:`~dsml.testing.sim.SimCluster` (the production
master and workers on one fake clock), draws a fault schedule from the seed
(:func:`schedule`: worker crashes and power losses with restarts, SIGSTOP/SIGCONT of a
worker or the master past the heartbeat timeout, cable cuts, pairwise and one-way
partitions, short link stalls, master crashes, one permanent worker death) and a
workload from the same seed (clients writing values and files, reading them back,
overwriting, deleting, submitting jobs with outputs and cancelling them), records every
client operation as ok / failed / unknown, heals every fault at the end, lets the
cluster settle, and checks (:class:`Checker`):

- **no acknowledged write lost**: every read (and the final read of every key, after
  healing) returns the last write acknowledged before it began or a later one that was
  not answered "failed"; reads never go back in version (a read that begins after
  another ended never returns an older write);
- **failed means absent**: a write answered "failed" is never read, ever;
- **jobs**: every acknowledged job reaches one final state; each task has at most one
  succeeded attempt (and the master took at most one success), and each stored output
  of a succeeded task is exactly what that attempt wrote;
- **the store matches the directory**: after healing, every live key has its
  replication (or as many copies as there are live workers), each listed copy is in
  its worker's store at the directory's version, and no stale copy is left;
- **nothing logged as a bug** (an unhandled error, a ``[critical]`` traceback), no
  protocol callback raised, every client call ended.

Everything is driven by the simulation's clock and two ``random.Random`` streams (faults
and workload) drawn from the seed, so a seed replays the same run: :attr:`Outcome.digest`
hashes the history to show it (run with ``PYTHONHASHSEED=0``, as ``__main__`` does, for
identical runs across processes).  :func:`shrink` removes fault episodes one at a time
while the same checker still fails, and prints the smallest schedule found.

Links: each end gives up on a dead path as its socket options say (the links dsml
dials and the master's worker links in 15 s; an accepted storage connection only by the
application's own deadlines; see :mod:`dsml.testing.sim.tcp`), and carries
:data:`BANDWIDTH` bytes a second, so transfers take time; half of the cuts and pauses
wait for bytes streaming to their worker's storage port, to land mid-transfer.

Disks: slow (the thread pool finishes late), full, failing (I/O errors), and losing
power (:mod:`dsml.testing.sim.disk` keeps only what the store made durable; most power
cuts come right after the worker acknowledged a value, before its one-second sync).  An
old incarnation of a worker replays its link byte for byte.

Clocks: every machine has a wall clock of its own, minutes off the others
(:func:`~dsml.testing.faultplan.wall_offsets`), that steps now and then (``clock-jump``,
at most :data:`~dsml.testing.faultplan.CLOCK_STEP` seconds either way, two minutes,
unless ``--clock-steps`` says otherwise); the shared clock is the monotonic one.  A
process's timers run on the clock :func:`dsml.clocks.timer_clock` picks, as the daemons'
reactors do (the monotonic one); its node stamps records (jobs, attempts, tombstones)
by its wall clock, the ``now`` it is given.  A worker out for longer than the heartbeat
timeout is declared dead within :data:`~dsml.testing.simcheck.DETECT` seconds more
(checker ``detection``), and no live worker is declared dead (``needless-loss``,
``replication``), whatever the steps.  With the timers on the wall clock (the daemons'
reactors as Twisted makes them; mutation ``wall-clock-reactor``) seed 1021 fails (a
step back of the master's clock by 95 s holds its liveness checks that long: a dead
worker not declared dead) and seed 18 (attempts of a worker nothing happened to
lost, copies left under-replicated), each as it did before the fix; the mutation
``wall-clock-membership`` (the failure detector on the master's wall clock) is found
by seed 1021 (writes acknowledged with one copy after a master restart; seed 8 found
it while steps were cut to 2 s).

Clients: three async clients (the production :class:`~dsml.net.cluster_client.AsyncClusterClient`)
run the workload; the blocking client (:class:`dsml.client.server.Client`, its own
framing over a socket) calls the master every :data:`BLOCKING_EVERY` seconds with a
:data:`BLOCKING_TIMEOUT` s timeout over a simulated socket
(:mod:`dsml.testing.sim.blocking`); checker ``client-desync``: no call reads another's
answer (mutation ``client-no-resync``: seed 5 in 3 simulated minutes).

Not modelled: byte-level loss, duplication or reordering (links are TCP: those surface
as stalls and resets, modelled).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from ..errors import DsmlError
from .faultplan import (
    CLIENTS,
    CLOCK_STEP,
    HEARTBEAT_TIMEOUT,
    MASTER,
    REPLICATION,
    WORKERS,
    Episode,
    schedule,
    wall_offsets,
)
from .history import Op, Outcome, Violation, seq_of, write_outcome
from .sim import SimCluster, SimTimeout
from .simcheck import Checker

#: Simulated seconds between two calls of the blocking client, and its timeout.
BLOCKING_EVERY = 3.0
BLOCKING_TIMEOUT = 4.0

#: Bytes per simulated second each direction of a link carries: a transfer takes time
#: (a 1 MiB file half a second a hop), so faults land in the middle of them.
BANDWIDTH = 2 * 1024 * 1024

# -- the history -------------------------------------------------------------------------


# -- one run ------------------------------------------------------------------------------


class Run:
    """One seeded run: the cluster, the fault actions, the workload and its history."""

    def __init__(
        self,
        root: Path,
        seed: int,
        minutes: float,
        episodes: list[Episode] | None = None,
        workers: Sequence[str] = WORKERS,
        steps: float = CLOCK_STEP,
    ) -> None:
        self.seed = seed
        self.minutes = minutes
        self.horizon = minutes * 60.0
        self.workers = tuple(workers)
        self.episodes = (schedule(seed, minutes, workers, steps) if episodes is None
                         else episodes)
        self.rng = random.Random(f"work/{seed}")
        self.sim = SimCluster(
            root, workers=workers, replication=REPLICATION,
            heartbeat_timeout=HEARTBEAT_TIMEOUT, seed=seed, slots=2, move_outputs=True,
            tcp="socket", rate=BANDWIDTH, wall_clocks=wall_offsets(seed, workers),
        )
        self.sim.record_links()
        #: (time, worker) of every death the master declared of its last live worker
        #: (a lone worker's silence kills it, by design: see Membership.check).
        self.lone_deaths: list[tuple[float, str]] = []
        #: (time, worker) of every death the master declared.
        self.deaths: list[tuple[float, str]] = []
        self._watch_deaths()
        self.ops: list[Op] = []
        self.seqs: dict[str, int] = {}
        self.jobs: dict[str, tuple[str, int, list[str]]] = {}  # id -> (client, tasks, outputs)
        #: Job ids acknowledged twice: (id, the first one's first output, the second's).
        self.reissued: list[tuple[str, str, str]] = []
        self.dead: set[str] = set()
        self.active: dict[int, Episode] = {}
        #: Power cuts waiting for their worker's next write (see _power_after_write).
        self.armed: dict[int, Any] = {}
        self.unhooks: dict[int, Callable[[], None]] = {}
        self.stopped = False
        self._events = itertools.count()
        #: The blocking client (made at its first call that can connect).
        self.blocking: Any = None
        #: When the master started again after a crash (simulated seconds).
        self.master_starts: list[float] = []

    # -- faults ---------------------------------------------------------------------

    def _begin(self, i: int, e: Episode) -> None:
        sim, net = self.sim, self.sim.net
        if e.kind in ("crash", "death"):
            if e.target in sim.workers:
                sim.kill(e.target)
        elif e.kind == "power":
            if e.flag and e.target in sim.workers:
                self._power_after_write(i, e)
            elif e.target in sim.workers:
                sim.kill(e.target, half_open=True)
        elif e.at == "transfer":
            self._mid_transfer(i, e)
        elif e.kind in ("pause", "master-pause"):
            if e.target in sim.clocks:
                sim.pause(e.target)
        elif e.kind in ("cut", "stall", "master-cut"):
            net.silence(e.target)
        elif e.kind in ("partition", "oneway"):
            net.partition(e.target, e.other, one_way=e.kind == "oneway")
        elif e.kind == "slow-disk":
            sim.slow_disk(e.target, 0.5)
        elif e.kind in ("disk-full", "disk-io"):
            sim.disk_fault(e.target, "full" if e.kind == "disk-full" else "io")
        elif e.kind == "replay":
            sim.replay_old_link(e.target)
            return
        elif e.kind == "clock-jump":
            sim.jump_clock(e.target, e.shift)
            return
        elif e.kind == "master-crash":
            master = sim.master
            if master is not None and e.at:
                owner = master.router if e.at == "submit" else master.keys
                self._after_next(i, owner, e.at, lambda: sim.master is master,
                                 lambda: sim.kill_master(power=e.flag))
            elif master is not None:
                sim.kill_master(power=e.flag)
        if e.kind == "death":
            self.dead.add(e.target)
            return
        self.active[i] = e
        sim.clock.callLater(e.length, self._end, i)

    def _mid_transfer(self, i: int, e: Episode) -> None:
        """Cut (or pause) ``e.target`` once bytes stream to its storage port from
        another worker (a pipeline's next hop, a replica being copied) or a client, or
        in 5 s if none do: the fault lands in the middle of a transfer."""
        sim = self.sim
        addr = sim.addr(e.target)
        give_up = sim.clock.seconds() + 5.0

        def look() -> None:
            if i not in self.active or e.target not in sim.workers:
                return
            streaming = any(c.addr == addr and c.client.out for c in sim.net.connections)
            if not streaming and sim.clock.seconds() < give_up:
                sim.clock.callLater(0.05, look)
            elif e.kind == "pause":
                sim.pause(e.target)
            else:
                sim.net.silence(e.target)

        sim.clock.callLater(0, look)

    def _power_after_write(self, i: int, e: Episode) -> None:
        """Cut ``e.target``'s power just after its store takes its next value (once the
        acknowledgement is out, before the one-second sync), or in 5 s if none comes."""
        sim = self.sim
        worker = sim.workers[e.target]
        self._after_next(i, worker.store, "put_value",
                         lambda: sim.workers.get(e.target) is worker,
                         lambda: sim.kill(e.target, half_open=True))

    def _after_next(self, i: int, owner: Any, method: str, still: Callable[[], bool],
                    fault: Callable[[], None]) -> None:
        """Run ``fault`` right after ``owner``'s next ``method`` call is done (its
        Deferred fired, if it returns one; its answer out), or in 5 s if none comes,
        unless ``still()`` says the process has gone meanwhile."""
        sim = self.sim
        call = getattr(owner, method)

        def unhook() -> None:
            owner.__dict__.pop(method, None)
            pending = self.armed.pop(i, None)
            if pending is not None and pending.active():
                pending.cancel()

        def hit() -> None:
            unhook()
            if still():
                fault()

        def soon(result: Any = None) -> Any:
            if i in self.active:  # not once the episode is over
                self.armed[i] = sim.clock.callLater(0, hit)
            return result

        def hooked(*args: Any, **kwargs: Any) -> Any:
            unhook()
            got = call(*args, **kwargs)
            if isinstance(got, Deferred):
                return got.addBoth(soon)
            return soon(got)

        setattr(owner, method, hooked)
        self.armed[i] = sim.clock.callLater(5.0, hit)
        self.unhooks[i] = unhook

    def _end(self, i: int) -> None:
        unhook = self.unhooks.pop(i, None)
        if unhook is not None:
            unhook()  # whatever has not happened by now does not
        e = self.active.pop(i, None)
        if e is None:
            return
        sim, net = self.sim, self.sim.net
        if e.kind in ("crash", "power"):
            if e.target not in sim.workers:
                sim.start_worker(e.target, adopt=e.flag)
        elif e.kind in ("pause", "master-pause"):
            if e.target in sim.clocks and sim.clocks[e.target].paused:
                sim.resume(e.target)
        elif e.kind in ("cut", "stall", "master-cut"):
            net.unsilence(e.target)
        elif e.kind in ("partition", "oneway"):
            net.heal(e.target, e.other)
        elif e.kind == "slow-disk":
            sim.slow_disk(e.target, 0.0)
        elif e.kind in ("disk-full", "disk-io"):
            sim.disk_fault(e.target, None)
        elif e.kind == "master-crash":
            if sim.master is None:
                sim.start_master()
                self.master_starts.append(sim.clock.seconds())
                self._watch_deaths()

    def _watch_deaths(self) -> None:
        master = self.sim.master
        if master is None:
            return
        membership = master.membership

        def died(record: Any) -> None:
            self.deaths.append((self.sim.clock.seconds(), record.name))
            if not membership.live():
                self.lone_deaths.append((self.sim.clock.seconds(), record.name))

        membership.on_dead.append(died)

    def heal(self) -> None:
        """End every fault still on (a permanent death stays)."""
        for i in sorted(self.active):
            self._end(i)

    # -- the workload ---------------------------------------------------------------

    def _op(self, client: str, kind: str, key: str, seq: int) -> Op:
        op = Op(len(self.ops), client, kind, key, seq, self.sim.clock.seconds(),
                began=next(self._events))
        self.ops.append(op)
        return op

    def _done(self, op: Op, outcome: str, detail: str = "", seq: int | None = None) -> None:
        op.end = self.sim.clock.seconds()
        op.ended = next(self._events)
        op.outcome = outcome
        op.detail = detail
        if seq is not None:
            op.seq = seq

    def _write_outcome(self, op: Op, f: Failure) -> None:
        e = f.value
        code = getattr(e, "code", "") if isinstance(e, DsmlError) else type(e).__name__
        self._done(op, write_outcome(e, op.kind), f"{code}: {str(e)[:80]}")

    def _acked(self, op: Op, stored: Any) -> None:
        """A write acknowledged: its version, its copies, and how many workers were
        running and reachable then (not crashed, paused, cut or partitioned)."""
        self._done(op, "ok", f"v{stored.version} r{stored.replicas} up{self._up()}")

    def _up(self) -> int:
        net = self.sim.net
        return sum(
            1 for w in self.sim.workers
            if w not in net.silenced and not self.sim.clocks[w].paused
            and (w, MASTER) not in net.blocked and (MASTER, w) not in net.blocked
        )

    def _remove_outcome(self, op: Op, f: Failure) -> None:
        if isinstance(f.value, DsmlError) and f.value.code == "not-found":
            self._done(op, "ok", "was absent")  # nothing to delete: absent, as asked
        else:
            self._write_outcome(op, f)

    def _next_write(self, key: str) -> int:
        self.seqs[key] = self.seqs.get(key, 0) + 1
        return self.seqs[key]

    def _payload(self, key: str, seq: int, size: int) -> bytes:
        head = f"{key}={seq};".encode()
        return head + self.rng.randbytes(max(0, size - len(head)))

    def client_loop(self, name: str) -> None:
        client = self.sim.client(name)
        rng = self.rng
        njobs = [0]

        def step() -> None:
            if self.stopped or self.sim.clock.seconds() >= self.horizon:
                return
            d = one()
            d.addBoth(lambda _: self.sim.clock.callLater(rng.uniform(0.05, 1.5), step))

        def one() -> Deferred[Any]:
            r = rng.random()
            mine = [f"v/{name}/{i}" for i in range(3)] + [f"f/{name}/{i}" for i in range(2)]
            if r < 0.35:  # write one of mine
                key = rng.choice(mine)
                seq = self._next_write(key)
                if key.startswith("v/"):
                    op = self._op(name, "set", key, seq)
                    d = client.set(key, self._payload(key, seq, rng.randint(8, 4000)))
                else:
                    op = self._op(name, "upload", key, seq)
                    size = rng.choice((200, 64 * 1024, 300 * 1024, 1024 * 1024))
                    d = client.upload(key, self._payload(key, seq, size))
                d.addCallbacks(lambda s: self._acked(op, s),
                               lambda f: self._write_outcome(op, f))
                return d
            if r < 0.40:  # delete one of mine
                key = rng.choice(mine)
                seq = self._next_write(key)
                op = self._op(name, "remove", key, seq)
                d = client.remove(key)
                d.addCallbacks(lambda v: self._done(op, "ok", f"v{v}"),
                               lambda f: self._remove_outcome(op, f))
                return d
            if r < 0.80:  # read anyone's
                owner = rng.choice(CLIENTS)
                key = rng.choice([f"v/{owner}/{i}" for i in range(3)]
                                 + [f"f/{owner}/{i}" for i in range(2)])
                op = self._op(name, "get" if key.startswith("v/") else "download", key, -1)
                d = client.get(key) if key.startswith("v/") else client.download(key)
                d.addCallbacks(lambda data: self._done(op, "ok", seq=seq_of(data)),
                               lambda f: self._read_error(op, f))
                return d
            if r < 0.95:  # a job with outputs
                n = rng.randint(1, 4)
                njobs[0] += 1
                prefix = f"o/{name}/{njobs[0]}"
                env = {"SIM_DURATION": f"{rng.choice((0.5, 2.0, 8.0, 25.0)):g}",
                       "SIM_EXIT": "1" if rng.random() < 0.1 else "0"}
                op = self._op(name, "submit", prefix, 0)
                d = client.submit(["work"], array=n, env=env,
                                  outputs=[("out", prefix + "/{index}")])

                def submitted(job: str) -> None:
                    self._done(op, "ok", job)
                    if job in self.jobs:  # an acknowledged job lost, its id issued again
                        self.reissued.append((job, self.jobs[job][2][0], prefix))
                    self.jobs[job] = (name, n, [f"{prefix}/{i}" for i in range(n)])

                d.addCallbacks(submitted, lambda f: self._write_outcome(op, f))
                return d
            mine_jobs = [j for j, (c, _, _) in self.jobs.items() if c == name]
            if not mine_jobs:
                return Deferred.fromCoroutine(_noop())
            job = rng.choice(mine_jobs)
            op = self._op(name, "cancel", job, 0)
            d = client.cancel(job)
            d.addCallbacks(lambda n: self._done(op, "ok", f"{n} killed"),
                           lambda f: self._write_outcome(op, f))
            return d

        self.sim.clock.callLater(rng.uniform(0.0, 1.0), step)

    def blocking_call(self) -> None:
        """One call of the blocking client (``nodes`` to the master, answered within
        :data:`BLOCKING_TIMEOUT` or given up): it moves the clock itself while it waits
        (:mod:`dsml.testing.sim.blocking`), so only between steps.  A call after one that
        timed out must not read that one's late answer."""
        from ..client.server import Client
        from .sim.blocking import sim_connect

        op = self._op("b1", "nodes", "", 0)
        try:
            if self.blocking is None:
                host, _, port = self.sim.master_addr.rpartition(":")
                self.blocking = Client(host, int(port), self.sim.token, BLOCKING_TIMEOUT,
                                       "b1", connect=sim_connect(self.sim, "b1"))
            self.blocking.call("nodes", {})
            self._done(op, "ok")
        except DsmlError as e:
            self._done(op, "error", f"{e.code}: {str(e)[:80]}")

    def _read_error(self, op: Op, f: Failure) -> None:
        e = f.value
        code = getattr(e, "code", "") if isinstance(e, DsmlError) else type(e).__name__
        if code == "not-found":
            self._done(op, "ok", "absent", seq=-1)
        else:
            self._done(op, "error", f"{code}: {str(e)[:80]}")

    # -- the whole run ----------------------------------------------------------------

    def go(self) -> Outcome:
        wall = time.monotonic()
        sim = self.sim
        t0 = sim.clock.seconds()
        for i, e in enumerate(self.episodes):
            sim.clock.callLater(e.start, self._begin, i, e)
        for name in CLIENTS:
            self.client_loop(name)
        end = sim.clock.seconds() + self.horizon
        while sim.clock.seconds() < end - 1e-9:
            sim.advance(min(BLOCKING_EVERY, end - sim.clock.seconds()), step=0.1)
            self.blocking_call()
        self.stopped = True
        self.heal()
        checker = Checker(self)
        try:
            checker.settle()
            checker.final_reads()
            checker.check_jobs()
            checker.check_store()
        except SimTimeout as e:
            checker.fail("settle", f"the cluster did not settle: {e}")
        checker.check_history()
        checker.check_calls()
        checker.check_acks()
        checker.check_losses()
        checker.check_detection()
        checker.check_blocking()
        checker.check_logs()
        return Outcome(
            self.seed, self.minutes, self.episodes, self.ops, checker.violations,
            len(self.jobs), sim.clock.seconds() - t0, time.monotonic() - wall,
        )

    def close(self) -> None:
        if self.blocking is not None:
            self.blocking.close()
        self.sim.close()


async def _noop() -> None:
    return None


# -- running seeds ------------------------------------------------------------------------


def run(seed: int, minutes: float = 3.0, episodes: list[Episode] | None = None,
        root: Path | None = None, steps: float = CLOCK_STEP) -> Outcome:
    """Run one seed (in ``root``, else a temporary directory removed afterwards), its
    wall clocks stepping ``steps`` seconds at most."""
    if root is not None:
        r = Run(root, seed, minutes, episodes, steps=steps)
        try:
            out = r.go()
        finally:
            failures = r.sim.failures
            seen = len(failures.events)
            r.close()
            del r
        # What the checks could not see: a Deferred dropped with its failure while the
        # cluster still held it logs "Unhandled error" only once collected, which would
        # otherwise be in the next seed's run (or nowhere).
        globalLogPublisher.addObserver(failures)
        try:
            gc.collect()
        finally:
            globalLogPublisher.removeObserver(failures)
        for m in failures.messages()[seen:][:5]:
            out.violations.append(Violation("bug-logged", f"collected at the end: {m[:300]}"))
        return out
    with tempfile.TemporaryDirectory(prefix=f"dsml-nemesis-{seed}-") as tmp:
        return run(seed, minutes, episodes, Path(tmp), steps)


def shrink(seed: int, minutes: float, outcome: Outcome,
           say: Callable[[str], None] = print, steps: float = CLOCK_STEP) -> Outcome:
    """Remove fault episodes one at a time while the same checker still fails."""
    target = {v.checker for v in outcome.violations}
    best = outcome
    episodes = list(outcome.episodes)
    i = 0
    while i < len(episodes):
        trial = episodes[:i] + episodes[i + 1:]
        got = run(seed, minutes, trial, steps=steps)
        if got.violations and {v.checker for v in got.violations} & target:
            say(f"  without {episodes[i]}: still fails ({len(trial)} faults left)")
            episodes, best = trial, got
        else:
            i += 1
    return best


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsml.testing.nemesis",
                                description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, help="one seed")
    p.add_argument("--seeds", help="seeds: 1-20,33")
    p.add_argument("--budget", type=float,
                   help="run seeds from --first on until this many wall seconds have passed")
    p.add_argument("--first", type=int, default=1)
    p.add_argument("--minutes", type=float, default=3.0, help="simulated minutes per seed")
    p.add_argument("--shrink", action="store_true", help="shrink a failing seed's schedule")
    p.add_argument("--quiet", action="store_true", help="no history for failures")
    p.add_argument("--clock-steps", type=float, default=CLOCK_STEP,
                   help="largest step of a wall clock, seconds (default %(default)g)")
    args = p.parse_args(list(argv) if argv is not None else None)
    seeds = ([args.seed] if args.seed is not None else _seeds(args.seeds) if args.seeds
             else [])
    start = time.monotonic()
    failed = 0
    ran = 0
    sim_s = 0.0
    wall = 0.0
    queue = list(seeds)
    n = args.first
    while True:
        if queue:
            seed = queue.pop(0)
        elif args.budget is not None and time.monotonic() - start < args.budget:
            seed, n = n, n + 1
        else:
            break
        out = run(seed, args.minutes, steps=args.clock_steps)
        ran += 1
        sim_s += out.sim_seconds
        wall += out.wall_seconds
        print(out.report(history=not args.quiet), flush=True)
        if not out.ok:
            failed += 1
            if args.shrink:
                print(f"shrinking seed {seed} ...", flush=True)
                small = shrink(seed, args.minutes, out, steps=args.clock_steps)
                print(small.report(), flush=True)
    print(f"{ran} seeds, {failed} failed; {sim_s:.0f} simulated s in {wall:.0f} s "
          f"(x{sim_s / max(wall, 1e-9):.0f} real time)")
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"  # the same set order in every process
        os.execv(sys.executable, [sys.executable, "-m", "dsml.testing.nemesis", *sys.argv[1:]])
    sys.exit(main())
