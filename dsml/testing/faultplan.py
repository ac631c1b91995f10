"""The nemesis's fault schedule: which faults, on whom, when, drawn from a seed.

:func:`schedule` draws a list of :class:`Episode` from a seed, deterministically (each
newer kind of fault from a random stream of its own, so that the schedules of seeds that
once failed stay as they were); :mod:`dsml.testing.nemesis` plays them on a simulated
cluster.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import attrs

WORKERS = ("w1", "w2", "w3", "w4")
CLIENTS = ("c1", "c2", "c3")
REPLICATION = 2
HEARTBEAT_TIMEOUT = 10.0
MASTER = "master"
#: The largest step of a wall clock a schedule draws by default (seconds, either way):
#: half the steps are within 2 s (ntpd steps past 128 ms), half up to two minutes (a
#: clock minutes off set right at boot or on a VM's resume, an operator's ``date -s``;
#: ntpd itself refuses over 1000 s).  The daemons' timers run on the monotonic clock
#: (:mod:`dsml.clocks`), so such a step moves only the wall-clock records; ``--clock-steps``
#: may draw larger ones.  (At 2 s, the default once, seeds 1021 and 18 hid that every
#: timer then ran on the wall clock.)
CLOCK_STEP = 120.0

@attrs.frozen
class Episode:
    """One fault: from ``start`` for ``length`` simulated seconds, on ``target``."""

    start: float
    length: float
    kind: str
    target: str
    other: str = ""  # a partition's other side
    flag: bool = False  # crash: adopt the attempts; power: right after the next write;
    #                     master-crash: a power loss
    at: str = ""  # master-crash: right after the next "place", "commit" or "submit";
    #               cut, pause: "transfer" (once bytes stream to the worker's storage)
    shift: float = 0.0  # clock-jump: seconds the target's wall clock steps by

    def __str__(self) -> str:
        other = f"<->{self.other}" if self.other else ""
        if self.kind == "oneway":
            other = f"->{self.other}"
        flag = f" (after a {self.at})" if self.at else ""
        if self.at == "transfer":
            flag = " (mid-transfer)"
        if self.kind == "clock-jump":
            flag = f" {self.shift:+.1f} s"
        if self.flag:
            flag = " (after a write)" if self.kind == "power" else " (adopt)"
            if self.kind == "master-crash":
                flag = f" (power{', after a ' + self.at if self.at else ''})"
        return (f"t={self.start:7.1f}s +{self.length:5.1f}s {self.kind:<12} "
                f"{self.target}{other}{flag}")


#: Fault kinds and their weights in a schedule (and "slow-disk", drawn apart: see
#: :func:`schedule`).
KINDS = {
    "crash": 3, "power": 2, "pause": 3, "cut": 3, "partition": 3, "oneway": 2, "stall": 3,
    "master-crash": 2, "master-pause": 1, "master-cut": 1, "death": 1,
}


def schedule(seed: int, minutes: float, workers: Sequence[str] = WORKERS,
             steps: float = CLOCK_STEP) -> list[Episode]:
    """The fault schedule of ``seed``: episodes over ``minutes``, at most one at a time
    per target, every one over before the end (but a worker's permanent death); wall
    clocks step by ``steps`` seconds at most."""
    rng = random.Random(f"faults/{seed}")
    horizon = minutes * 60.0
    kinds = list(KINDS)
    weights = [KINDS[k] for k in kinds]
    free_at: dict[str, float] = {}
    out: list[Episode] = []
    dead = False
    t = rng.uniform(3.0, 12.0)
    while t < horizon - 5.0:
        kind = rng.choices(kinds, weights)[0]
        if kind.startswith("master"):
            target = MASTER
        else:
            target = rng.choice(workers)
        length = rng.choice(
            (rng.uniform(0.5, 5.0), rng.uniform(5.0, 2.5 * HEARTBEAT_TIMEOUT),
             rng.uniform(2.5 * HEARTBEAT_TIMEOUT, 60.0))
        )
        other = ""
        flag = False
        if kind == "stall":
            length = rng.uniform(0.2, 3.0)
        elif kind in ("partition", "oneway"):
            other = rng.choice([n for n in (*workers, MASTER, *CLIENTS) if n != target])
        elif kind == "crash":
            flag = rng.random() < 0.5
        elif kind == "power":
            # A stream of its own, so the schedules drawn before this came stay as
            # they were (and the seeds that once failed replay the same faults).
            flag = random.Random(f"power/{seed}/{t}").random() < 0.7
        at = ""
        if kind == "master-crash":  # likewise
            at = random.Random(f"at/{seed}/{t}").choice(("", "place", "commit", "submit"))
            # Half of them a power loss (the state file keeps what SQLite made durable).
            flag = random.Random(f"mpower/{seed}/{t}").random() < 0.5
        elif kind in ("cut", "pause"):  # a stream of its own too
            at = "transfer" if random.Random(f"midway/{seed}/{t}").random() < 0.5 else ""
        elif kind == "death":
            if dead:
                kind = "crash"
            else:
                dead = True
                length = horizon - t
        busy = [n for n in (target, other) if n and free_at.get(n, 0.0) > t]
        if not busy and (kind != "death" or target not in free_at or free_at[target] <= t):
            length = min(length, horizon - t - 1.0)
            out.append(Episode(round(t, 3), round(length, 3), kind, target, other, flag, at))
            end = horizon + 1e9 if kind == "death" else t + length + 1.0
            for n in (target, other):
                if n and n not in CLIENTS:
                    free_at[n] = end
        t += rng.expovariate(1 / 12.0)
    # Slow disks come from a stream of their own (the schedules above stay as they were
    # when this kind came), and may overlap any other fault on their worker: a crash
    # while the thread pool lags is the case they are for.
    disk = random.Random(f"disks/{seed}")
    t = disk.uniform(5.0, 40.0)
    while t < horizon - 5.0:
        length = min(disk.uniform(5.0, 40.0), horizon - t - 1.0)
        out.append(Episode(round(t, 3), round(length, 3), "slow-disk", disk.choice(workers)))
        t += length + disk.expovariate(1 / 30.0)
    # Full disks and I/O errors: a stream of their own too, one worker at a time.
    bad = random.Random(f"baddisks/{seed}")
    t = bad.uniform(10.0, 60.0)
    while t < horizon - 5.0:
        length = min(bad.uniform(3.0, 30.0), horizon - t - 1.0)
        kind = bad.choice(("disk-full", "disk-io"))
        out.append(Episode(round(t, 3), round(length, 3), kind, bad.choice(workers)))
        t += length + bad.expovariate(1 / 45.0)
    # An old incarnation replaying its link: its own stream too, a few per run.
    old = random.Random(f"replays/{seed}")
    t = old.uniform(30.0, 60.0)
    while t < horizon - 5.0:
        out.append(Episode(round(t, 3), 0.0, "replay", old.choice(workers)))
        t += old.expovariate(1 / 40.0)
    # The wall clock of a machine steps (NTP, a resumed VM): its own stream too; small
    # steps and large ones (up to ``steps``), either way, cut to ``steps``.
    clk = random.Random(f"clocks/{seed}")
    t = clk.uniform(10.0, 50.0)
    while t < horizon - 5.0:
        shift = clk.choice((clk.uniform(-2.0, 2.0), clk.uniform(-1.0, 1.0) * max(steps, 2.0)))
        target = clk.choice((*workers, MASTER))
        shift = max(-steps, min(steps, shift))
        out.append(Episode(round(t, 3), 0.0, "clock-jump", target, shift=round(shift, 3)))
        t += clk.expovariate(1 / 40.0)
    out.sort(key=lambda e: e.start)
    return out


def wall_offsets(seed: int, workers: Sequence[str] = WORKERS) -> dict[str, float]:
    """Where each machine's wall clock starts, in seconds ahead of the monotonic time
    (machines' clocks disagree by minutes)."""
    rng = random.Random(f"walls/{seed}")
    return {name: round(rng.uniform(-600.0, 600.0), 3) for name in (MASTER, *workers)}
