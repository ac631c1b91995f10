"""The workload of the multi-host fault tests: real clients, a recorded history.

    python -m dsml.testing.netload --config CFG --seconds 45 --out DIR [--seed N]

Run on the client host of a :class:`~dsml.testing.netbed.NetBed` (inside its network
namespace).  Three client lanes (threads), each with its own blocking
:class:`~dsml.client.ClusterClient`, write values (100 B-4 KiB) and files (64 KiB-4 MiB)
under keys of their own, overwrite and delete them, read everyone's back, and submit
array jobs whose tasks write their attempt id as their output; each call is recorded as
an :class:`~dsml.testing.nemesis.Op` (ok / failed / unknown, and for reads the write it
returned) in ``DIR/history.jsonl``.  A client whose call failed is replaced by a new one
(its connections may hold a late answer).  After ``--seconds`` the lanes stop and the
settle phase waits (up to ``--settle`` seconds) until every key reads back, every job has
ended and every key has its replication, then reads every key once more, and checks each
succeeded task's output against its attempt; ``DIR/summary.json`` says what it found
and when the cluster converged (monotonic seconds: the same clock in every namespace).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import attrs

from ..client import ClusterClient
from ..errors import DsmlError
from .history import Op, seq_of, write_outcome

LANES = ("c1", "c2", "c3")
#: Per-call timeout of the clients (seconds): a call longer than this is "unknown".
CALL_TIMEOUT = 30.0


class History:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._lock = threading.Lock()
        self._events = itertools.count()

    def start(self, client: str, kind: str, key: str, seq: int) -> Op:
        with self._lock:
            op = Op(len(self.ops), client, kind, key, seq, time.monotonic(),
                    began=next(self._events))
            self.ops.append(op)
        return op

    def end(self, op: Op, outcome: str, detail: str = "", seq: int | None = None) -> None:
        with self._lock:
            op.end = time.monotonic()
            op.ended = next(self._events)
            op.outcome = outcome
            op.detail = detail[:200]
            if seq is not None:
                op.seq = seq


def code_of(e: BaseException) -> str:
    return e.code if isinstance(e, DsmlError) else type(e).__name__


class Lane(threading.Thread):
    def __init__(self, name: str, config: str, history: History, stop_at: float,
                 seed: int, jobs: dict[str, list[str]], seqs: dict[str, int]) -> None:
        super().__init__(name=name, daemon=True)
        self.lane = name
        self.config = config
        self.h = history
        self.stop_at = stop_at
        self.rng = random.Random(f"{seed}/{name}")
        self.jobs = jobs
        self.seqs = seqs
        self.client: ClusterClient | None = None
        self.njobs = 0
        self.tmp = Path(tempfile.mkdtemp(prefix=f"netload-{name}-"))

    def _client(self) -> ClusterClient:
        if self.client is None:
            self.client = ClusterClient.from_config(self.config, timeout=CALL_TIMEOUT,
                                                    name=f"netload-{self.lane}")
        return self.client

    def _drop(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
        self.client = None

    def _payload(self, key: str, seq: int, size: int) -> bytes:
        head = f"{key}={seq};".encode()
        return head + self.rng.randbytes(max(0, size - len(head)))

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            try:
                self.one()
            except Exception as e:  # recorded by one(); the client may be unusable now
                if not isinstance(e, DsmlError):
                    print(f"{self.lane}: {type(e).__name__}: {e}", file=sys.stderr)
                self._drop()
            time.sleep(self.rng.uniform(0.02, 0.4))
        self._drop()

    def _write(self, op: Op, call: Any) -> None:
        try:
            r = call()
        except Exception as e:
            code = code_of(e)
            if op.kind == "remove" and code == "not-found":
                self.h.end(op, "ok", "was absent")
                return
            self.h.end(op, write_outcome(e, op.kind), f"{code}: {e}")
            raise
        self.h.end(op, "ok", str(getattr(r, "version", r)))

    def one(self) -> None:
        rng = self.rng
        r = rng.random()
        mine = [f"v/{self.lane}/{i}" for i in range(3)] + [f"f/{self.lane}/{i}" for i in range(2)]
        if r < 0.35:
            key = rng.choice(mine)
            seq = self.seqs[key] = self.seqs.get(key, 0) + 1
            if key.startswith("v/"):
                op = self.h.start(self.lane, "set", key, seq)
                data = self._payload(key, seq, rng.randint(100, 4096))
                self._write(op, lambda: self._client().set(key, data))
            else:
                op = self.h.start(self.lane, "upload", key, seq)
                size = rng.choice((64 * 1024, 512 * 1024, 4 * 1024 * 1024))
                path = self.tmp / f"{key.replace('/', '_')}.{seq}"
                path.write_bytes(self._payload(key, seq, size))
                try:
                    self._write(op, lambda: self._client().upload(path, key))
                finally:
                    path.unlink()
        elif r < 0.40:
            key = rng.choice(mine)
            seq = self.seqs[key] = self.seqs.get(key, 0) + 1
            op = self.h.start(self.lane, "remove", key, seq)
            self._write(op, lambda: self._client().delete(key))
        elif r < 0.92:
            owner = rng.choice(LANES)
            key = rng.choice([f"v/{owner}/{i}" for i in range(3)]
                             + [f"f/{owner}/{i}" for i in range(2)])
            read(self.h, self.lane, self._client, key)
        else:
            self.njobs += 1
            prefix = f"o/{self.lane}/{self.njobs}"
            n = rng.randint(2, 6)
            op = self.h.start(self.lane, "submit", prefix, 0)
            cmd = ["sh", "-c", f'sleep {rng.choice((0.2, 2, 8))}; echo "$DSML_ATTEMPT_ID" > out']
            try:
                job = self._client().submit(cmd, array=n,
                                            outputs=[("out", prefix + "/{index}")])
            except Exception as e:
                code = code_of(e)
                self.h.end(op, write_outcome(e, "submit"), f"{code}: {e}")
                raise
            self.h.end(op, "ok", job.id)
            self.jobs[job.id] = [f"{prefix}/{i}" for i in range(n)]


def read(h: History, lane: str, client: Any, key: str) -> Op:
    op = h.start(lane, "get" if key.startswith("v/") else "download", key, -1)
    try:
        data = client().get(key) if key.startswith("v/") else _download(client(), key)
    except Exception as e:
        code = code_of(e)
        if code == "not-found":
            h.end(op, "ok", "absent", seq=-1)
            return op
        h.end(op, "error", f"{code}: {e}")
        raise
    h.end(op, "ok", seq=seq_of(data))
    return op


def _download(client: ClusterClient, key: str) -> bytes:
    import io

    out = io.BytesIO()
    client.download_to(key, out)
    return out.getvalue()


def settle(config: str, h: History, seqs: dict[str, int], jobs: dict[str, list[str]],
           deadline: float, replication: int) -> dict[str, Any]:
    """Wait until the cluster converged; the final reads and checks."""
    problems: list[str] = []
    converged = None
    client: ClusterClient | None = None
    pending_jobs = set(jobs)
    final = {"succeeded", "failed", "cancelled"}
    statuses: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        try:
            if client is None:
                client = ClusterClient.from_config(config, timeout=CALL_TIMEOUT,
                                                   name="netload-settle")
            for job in sorted(pending_jobs):
                st = client.job_status(job)
                if st["state"] in final:
                    statuses[job] = st
                    pending_jobs.discard(job)
            short = []
            for key in sorted(seqs):
                try:
                    where = client.locate(key)
                except DsmlError as e:
                    if e.code == "not-found":
                        continue
                    raise
                if len(where.replicas) < replication:
                    short.append(key)
            if not pending_jobs and not short:
                converged = time.monotonic()
                break
        except Exception:
            if client is not None:
                client.close()
            client = None
        time.sleep(0.5)
    if converged is None:
        problems.append(f"did not converge: jobs not ended {sorted(pending_jobs)}")
    # The final reads, after convergence (or the deadline).
    for key in sorted(seqs):
        for _ in range(3):
            try:
                op = read(h, "final", lambda: _final_client(config), key)
                break
            except Exception:
                time.sleep(1.0)
        else:
            problems.append(f"final read of {key} failed")
            continue
        del op
    stale = 0
    doubles = 0
    for job, st in statuses.items():
        for t in st["tasks"]:
            wins = [a for a in t["attempts"] if a["state"] == "succeeded"]
            if len(wins) > 1:
                doubles += 1
                problems.append(f"job {job} task {t['index']}: {len(wins)} successes")
            if t["state"] != "succeeded" or len(wins) != 1:
                continue
            key = jobs[job][t["index"]]
            try:
                got = _download(_final_client(config), key).decode().strip()
            except Exception as e:
                problems.append(f"output {key} unreadable: {e}")
                continue
            if got != str(wins[0]["id"]):
                stale += 1
                problems.append(f"output {key} is attempt {got}'s, not {wins[0]['id']}'s")
    if client is not None:
        client.close()
    return {"converged": converged, "problems": problems, "stale_outputs": stale,
            "double_successes": doubles, "jobs": len(jobs), "jobs_ended": len(statuses)}


_FINAL: list[ClusterClient] = []


def _final_client(config: str) -> ClusterClient:
    if not _FINAL:
        _FINAL.append(ClusterClient.from_config(config, timeout=CALL_TIMEOUT,
                                                name="netload-final"))
    return _FINAL[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsml.testing.netload")
    p.add_argument("--config", required=True)
    p.add_argument("--seconds", type=float, default=45.0)
    p.add_argument("--settle", type=float, default=120.0)
    p.add_argument("--replication", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h = History()
    seqs: dict[str, int] = {}
    jobs: dict[str, list[str]] = {}
    start = time.monotonic()
    stop_at = start + args.seconds
    lanes = [Lane(n, args.config, h, stop_at, args.seed, jobs, seqs) for n in LANES]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join(timeout=args.seconds + 4 * CALL_TIMEOUT)
    lanes_done = time.monotonic()
    summary = settle(args.config, h, seqs, jobs, lanes_done + args.settle, args.replication)
    summary.update(started=start, lanes_done=lanes_done,
                   hung=[lane.lane for lane in lanes if lane.is_alive()])
    with open(out / "history.jsonl", "w") as f:
        for op in h.ops:
            f.write(json.dumps(attrs.asdict(op)) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    os._exit(0)  # a hung lane thread must not keep the process


if __name__ == "__main__":
    sys.exit(main())
