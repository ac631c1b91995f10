"""dsml cluster benchmarks: the master under heartbeat load, and how fast it sees a death.

    .venv/bin/python benchmarks/cluster.py [--quick] [--only heartbeats|death] [--profile]

heartbeats  ONE load-generator process (selectors, no Twisted) opens 1,000 connections to
            127.0.0.1 (--quick: 300); each authenticates and registers as a distinct
            simulated worker (empty inventory), exactly as dsml/worker/link.py does, then
            sends one heartbeat per connection per second, spread evenly over the second.
            The server's CPU (utime+stime from /proc/<pid>/stat) is measured over a
            steady-state window and divided by the heartbeats acknowledged in it, for
            (a) a real ``twistd -n dsml-master`` (LocalCluster) and (b) a bare Twisted
            Protocol that splits on CRLFCRLF and answers every request head with a fixed
            ``OK <id>``, the floor any Twisted server pays.  Same load generator, same
            rate, alternating repetitions; the ratio master/minimal is the figure.
death       a real master and 3 real workers: time from kill -9 of a worker (its
            connection closes) and from SIGSTOP (it goes silent) to the moment the worker
            shows as "dead", seen by polling the master's ``nodes`` method every 50 ms and,
            side by side, by running the real ``dsml nodes`` back to back.

Nothing here asserts a speed: targets are printed beside the figures.  Everything runs on
127.0.0.1 under one temporary directory, deleted at the end; every process started here
is stopped.  --profile adds a run of the master under cProfile with the same load
(outside the figures).

The same file is also the load generator (``--loadgen``) and the minimal reference
server (``--minimal-server``), run as subprocesses; neither is meant to be run by hand.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    cpu_seconds,
    fmt,
    median,
    note,
    proc_status_kib,
    ratio,
    say,
    stop_process,
    table,
    verdict,
)

# Targets printed beside the figures (never asserted).
TARGET_HEARTBEAT_RATIO = 2.0  # master CPU per heartbeat / minimal Twisted server's
TARGET_CLOSED_S = 1.0  # closed connection -> dead
SILENT_SLACK_S = 1.0  # silent worker -> dead within heartbeat_timeout + this

#: Connections the load generator has connecting/authenticating/registering at once
#: (Twisted listens with a backlog of 50: more would overflow it and wait for SYN retries).
OPENING_AT_ONCE = 32
#: What a simulated worker reports in its heartbeats.
SIM_SLOTS = 4
SIM_FREE_DISK = 100 * 10**9
#: Seconds between two polls of the master's ``nodes`` method.
POLL_S = 0.05


# -- output ---------------------------------------------------------------------------


# fmt, ratio, verdict, table, say and note come from common.py.


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (up to the hard limit).

    Children inherit it: twistd processes started afterwards get the same soft limit.
    Returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


# -- the load generator (a subprocess: --loadgen) -------------------------------------

_CONNECTING, _AUTH, _REGISTER, _LIVE, _FAILED = range(5)


class _SimWorker:
    """One simulated worker: one connection, one response parser, its heartbeats in flight."""

    __slots__ = ("i", "sock", "parser", "state", "name", "incarnation", "next_id", "sent",
                 "out")

    def __init__(self, i: int, sock: socket.socket, parser: Any) -> None:
        self.i = i
        self.sock = sock
        self.parser = parser
        self.state = _CONNECTING
        self.name = f"sim{i:05d}"
        self.incarnation = 0
        self.next_id = 1
        self.sent: deque[float] = deque()  # send times of unanswered heartbeats, in order
        self.out = bytearray()  # bytes the socket did not take yet


def loadgen_main(a: argparse.Namespace) -> int:
    """Register ``a.conns`` simulated workers, heartbeat them, print one JSON line."""
    from dsml import __version__
    from dsml.protocol.codec import (
        NEED_DATA,
        PROTOCOL_VERSION,
        Head,
        Parser,
        encode_request,
    )

    n = a.conns
    interval = a.interval
    raise_nofile(n + 256)
    addr = (a.host, a.port)
    sel = selectors.DefaultSelector()
    sims: list[_SimWorker | None] = [None] * n
    errors: Counter[str] = Counter()
    stats = {"live": 0, "failed": 0, "closed": 0, "opening": 0, "next_open": 0}
    mono = time.monotonic
    win: dict[str, Any] = {"on": False, "acks": 0, "sent": 0}
    latencies: list[float] = []
    acks_total = 0

    def write(w: _SimWorker, data: bytes) -> None:
        if w.out:
            w.out += data
            return
        try:
            sent = w.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            close(w, f"send: {e.strerror or e}")
            return
        if sent < len(data):
            w.out += data[sent:]
            sel.modify(w.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, w)

    def close(w: _SimWorker, why: str) -> None:
        if w.state == _FAILED:
            return
        if w.state == _LIVE:
            stats["live"] -= 1
            stats["closed"] += 1
        else:
            stats["opening"] -= 1
        stats["failed"] += 1
        errors[why] += 1
        w.state = _FAILED
        try:
            sel.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        w.sock.close()

    def request(w: _SimWorker, method: str, headers: dict[str, object]) -> None:
        rid = w.next_id
        w.next_id += 1
        write(w, encode_request(method, rid, headers))

    def open_more() -> None:
        while stats["opening"] < OPENING_AT_ONCE and stats["next_open"] < n:
            i = stats["next_open"]
            stats["next_open"] += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            w = _SimWorker(i, sock, Parser("response"))
            sims[i] = w
            stats["opening"] += 1
            rc = sock.connect_ex(addr)
            if rc not in (0, errno.EINPROGRESS):
                close(w, f"connect: {os.strerror(rc)}")
                continue
            sel.register(sock, selectors.EVENT_WRITE, w)

    def connected(w: _SimWorker) -> None:
        rc = w.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            close(w, f"connect: {os.strerror(rc)}")
            return
        w.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.modify(w.sock, selectors.EVENT_READ, w)
        w.state = _AUTH
        request(w, "auth", {"Token": a.token, "Client": f"worker {w.name}"})

    def on_head(w: _SimWorker, head: Any, now: float) -> None:
        nonlocal acks_total
        state = w.state
        if state == _LIVE:
            t_sent = w.sent.popleft() if w.sent else now
            if head.ok:
                acks_total += 1
                if win["on"]:
                    win["acks"] += 1
                    latencies.append(now - t_sent)
            else:
                errors["heartbeat: " + head.headers.get("code", "?")] += 1
        elif not head.ok:
            close(w, ("auth: " if state == _AUTH else "register: ")
                  + head.headers.get("code", "?"))
        elif state == _AUTH:
            w.state = _REGISTER
            # The headers of dsml/worker/link.py, with an empty inventory (no payload).
            request(w, "register", {
                "Name": w.name,
                "Host": "127.0.0.1",
                "Port": 20000 + w.i,
                "Slots": SIM_SLOTS,
                "Dsml-Version": __version__,
                "Protocol-Version": PROTOCOL_VERSION,
            })
        elif state == _REGISTER:
            # The minimal reference server sends no Incarnation: any number does there.
            w.incarnation = int(head.headers.get("incarnation", "1"))
            w.state = _LIVE
            stats["live"] += 1
            stats["opening"] -= 1
            open_more()

    def readable(w: _SimWorker, now: float) -> None:
        try:
            data = w.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            close(w, f"recv: {e.strerror or e}")
            return
        if not data:
            close(w, "closed by the server")
            return
        parser = w.parser
        parser.feed(data)
        while True:
            try:
                event = parser.next_event()
            except Exception as e:
                close(w, f"bad response: {e}")
                return
            if type(event) is Head:
                on_head(w, event, now)
                if w.state == _FAILED:
                    return
            elif event is NEED_DATA:
                return

    def flush(w: _SimWorker) -> None:
        try:
            sent = w.sock.send(w.out)
        except BlockingIOError:
            return
        except OSError as e:
            close(w, f"send: {e.strerror or e}")
            return
        del w.out[:sent]
        if not w.out:
            sel.modify(w.sock, selectors.EVENT_READ, w)

    def heartbeat(w: _SimWorker, now: float) -> None:
        w.sent.append(now)
        if win["on"]:
            win["sent"] += 1
        request(w, "heartbeat", {
            "Name": w.name,
            "Incarnation": w.incarnation,
            "Free-Slots": SIM_SLOTS,
            "Stored-Bytes": 0,
            "Stored-Files": 0,
            "Free-Disk": SIM_FREE_DISK,
        })

    def poll(until: float) -> None:
        """Serve sockets until ``until``, sending heartbeats on schedule."""
        nonlocal seq
        while True:
            now = mono()
            # Heartbeat slot ``seq`` is worker seq % n at t_hb + (seq / n) * interval: each
            # worker once per interval, the n workers spread evenly over it.  A worker
            # still registering skips its slot.
            while sending and t_hb + seq * step <= now:
                w = sims[seq % n]
                if w is not None and w.state == _LIVE:
                    heartbeat(w, now)
                seq += 1
            if now >= until:
                return
            wake = min(until, t_hb + seq * step) if sending else until
            for key, mask in sel.select(max(0.0, wake - now)):
                w = key.data
                if w.state == _CONNECTING:
                    if mask & selectors.EVENT_WRITE:
                        connected(w)
                    continue
                if mask & selectors.EVENT_WRITE and w.out:
                    flush(w)
                if mask & selectors.EVENT_READ and w.state != _FAILED:
                    readable(w, mono())

    step = interval / n
    seq = 0
    sending = True
    t0 = mono()
    t_hb = t0  # heartbeat slots start now; registered workers join their next slot
    open_more()
    reg_deadline = t0 + a.register_timeout
    while stats["live"] + stats["failed"] < n and mono() < reg_deadline:
        poll(min(reg_deadline, mono() + 0.05))
    t_registered = mono()
    registered = stats["live"]
    register_errors = dict(errors)

    # Steady state: every worker has had a full interval to start beating.
    poll(t_registered + a.warmup)
    c0, self0, t_w0 = cpu_seconds(a.server_pid), time.process_time(), mono()
    win["on"] = True
    poll(t_w0 + a.seconds)
    c1, self1, t_w1 = cpu_seconds(a.server_pid), time.process_time(), mono()
    win["on"] = False
    rss = proc_status_kib(a.server_pid, "VmRSS")
    hwm = proc_status_kib(a.server_pid, "VmHWM")
    live_at_end = stats["live"]

    # Stop sending; let the answers in flight arrive.
    sending = False
    drain_deadline = mono() + 3.0
    while mono() < drain_deadline and any(
        w is not None and w.state == _LIVE and w.sent for w in sims
    ):
        poll(min(drain_deadline, mono() + 0.05))
    unanswered = sum(len(w.sent) for w in sims if w is not None and w.state == _LIVE)
    for w in sims:
        if w is not None and w.state != _FAILED:
            try:
                sel.unregister(w.sock)
            except (KeyError, ValueError):
                pass
            w.sock.close()
    sel.close()
    latencies.sort()
    print(json.dumps({
        "conns": n,
        "registered": registered,
        "register_s": t_registered - t0,
        "register_errors": register_errors,
        "live_at_end": live_at_end,
        "closed": stats["closed"],
        "window_s": t_w1 - t_w0,
        "acks": win["acks"],
        "sent": win["sent"],
        "acks_total": acks_total,
        "server_cpu_s": c1 - c0,
        "self_cpu_s": self1 - self0,
        "rss_kib": rss,
        "hwm_kib": hwm,
        "lat_p50_ms": 1e3 * percentile(latencies, 0.50),
        "lat_p99_ms": 1e3 * percentile(latencies, 0.99),
        "lat_max_ms": 1e3 * latencies[-1] if latencies else None,
        "unanswered_after_drain": unanswered,
        "errors": dict(errors),
    }), flush=True)
    return 0


# -- the minimal reference server (a subprocess: --minimal-server) --------------------


def minimal_server_main(a: argparse.Namespace) -> int:
    """A bare Twisted Protocol: split on CRLFCRLF, answer each head ``OK <id>``.

    No parsing beyond the request id, no validation, no state: what any Twisted server
    pays per small request (epoll, the transport, one dataReceived, one write).  Prints
    its port on stdout; SIGTERM stops it.
    """
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import protocol, reactor

    class Minimal(protocol.Protocol):
        buf = b""

        def dataReceived(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            start = 0
            out = []
            while True:
                end = buf.find(b"\r\n\r\n", start)
                if end < 0:
                    break
                line_end = buf.find(b"\r\n", start, end)
                first = buf[start: end if line_end < 0 else line_end]
                out.append(b"OK " + first[first.find(b" ") + 1:] + b"\r\n\r\n")
                start = end + 4
            self.buf = buf[start:]
            if out:
                self.transport.write(b"".join(out))

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Minimal), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()
    return 0


# -- settings -------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool
    profile: bool
    conns: int
    window: float  # seconds of steady state measured per run
    warmup: float  # seconds after the last registration before the window opens
    reps: int  # alternating repetitions (master, minimal) of the heartbeat load
    hb_interval: float  # death detection: heartbeat_interval
    hb_timeout: float  # death detection: heartbeat_timeout
    death_reps: int
    tmp_parent: str | None
    command: str


def settings(args: argparse.Namespace) -> Settings:
    cmd = ".venv/bin/python benchmarks/cluster.py" + "".join(f" {a}" for a in sys.argv[1:])
    if args.quick:
        return Settings(True, args.profile, 300, 8.0, 2.0, 2, 0.5, 3.0, 3, args.tmpdir, cmd)
    return Settings(False, args.profile, 1000, 20.0, 2.5, 3, 1.0, 10.0, 3, args.tmpdir, cmd)


# -- heartbeats -----------------------------------------------------------------------


def name_sim_workers(cluster: Any, n: int) -> None:
    """Put the ``n`` simulated workers (sim00000..., at 127.0.0.1, any port) in the
    cluster's config: the master lets only the config's workers register."""
    config = yaml.safe_load(cluster.config_path.read_text())
    for i in range(n):
        config["workers"][f"sim{i:05d}"] = {"host": "127.0.0.1", "port": 0,
                                           "data_dir": str(cluster.root / "unused")}
    cluster.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def master_limits(s: Settings) -> dict[str, dict[str, object]]:
    """Config ``extra`` letting s.conns links (and a few clients) in at once."""
    room = s.conns + 100
    return {"limits": {"max_connections": room, "max_unauthenticated": room}}


def run_load(s: Settings, host: str, port: int, token: str, pid: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--loadgen",
           "--host", host, "--port", str(port),
           "--conns", str(s.conns), "--seconds", str(s.window), "--warmup", str(s.warmup),
           "--server-pid", str(pid)]
    # The token through the environment: a command line is for anyone's `ps` to read.
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=120 + s.window + s.warmup,
                         env={**os.environ, "DSML_TOKEN": token})
    if out.returncode != 0:
        raise RuntimeError(f"the load generator exited {out.returncode}:\n"
                           f"{out.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["registered"] < s.conns:
        raise RuntimeError(f"only {result['registered']} of {s.conns} simulated workers "
                           f"registered: {result['register_errors']}")
    return result


def start_minimal() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--minimal-server"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError("the minimal reference server did not start")
        return proc, int(line)
    except BaseException:
        stop_process(proc)
        raise


def one_master_run(s: Settings, tmp: Path, rep: int) -> dict[str, Any]:
    from dsml.localcluster import LocalCluster

    # "w1" only because the config needs a worker; it is never started.
    cluster = LocalCluster(tmp / f"hb-master-{rep}", workers=("w1",), extra=master_limits(s))
    name_sim_workers(cluster, s.conns)
    try:
        host, port = cluster.start("master")
        pid = cluster.procs["master"].pid
        rss0 = proc_status_kib(pid, "VmRSS")
        r = run_load(s, host, port, cluster.token, pid)
        r["rss_start_kib"] = rss0
        r["nofile"] = _nofile_of(pid)
        return r
    finally:
        cluster.stop()


def one_minimal_run(s: Settings, rep: int) -> dict[str, Any]:
    proc, port = start_minimal()
    try:
        rss0 = proc_status_kib(proc.pid, "VmRSS")
        r = run_load(s, "127.0.0.1", port, "x", proc.pid)
        r["rss_start_kib"] = rss0
        return r
    finally:
        stop_process(proc)


def _nofile_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return "/".join(line.split()[3:5])
    except OSError:
        pass
    return "?"


def bench_heartbeats(s: Settings, tmp: Path) -> dict[str, Any]:
    nofile = raise_nofile(s.conns + 512)
    runs: dict[str, list[dict[str, Any]]] = {"master": [], "minimal": []}
    for rep in range(s.reps):
        order = ["master", "minimal"] if rep % 2 == 0 else ["minimal", "master"]
        for side in order:
            note(f"heartbeats: repetition {rep + 1}/{s.reps}: {side}, {s.conns} workers, "
                 f"{s.window:g} s window")
            r = one_master_run(s, tmp, rep) if side == "master" else one_minimal_run(s, rep)
            note(f"heartbeats:   {1e6 * r['server_cpu_s'] / max(1, r['acks']):.1f} us/heartbeat"
                 f", {r['acks']} acked, registration {r['register_s']:.1f} s")
            runs[side].append(r)
    profile = profile_master(s, tmp) if s.profile else None
    return {"runs": runs, "nofile": nofile, "profile": profile}


def profile_master(s: Settings, tmp: Path) -> str:
    """One more master run under twistd's cProfile (not part of the figures)."""
    import io
    import pstats

    from dsml.localcluster import LocalCluster, venv_bin
    from dsml.net.listen import read_addr_file

    note("heartbeats: profiling the master under the same load (not part of the figures)")
    cluster = LocalCluster(tmp / "hb-profile", workers=("w1",), extra=master_limits(s))
    name_sim_workers(cluster, s.conns)
    stats = tmp / "master.prof"
    addr = cluster.addr_file("master")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(cluster.log_path("master"), "wb") as log:
            proc = subprocess.Popen(
                [venv_bin("twistd"), "-n", "--pidfile", str(cluster.root / "master.pid"),
                 "--profile", str(stats), "--profiler", "cprofile", "--savestats",
                 "dsml-master", "-c", str(cluster.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cluster.root,
            )
        deadline = time.monotonic() + 30
        while not addr.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the profiled master did not start:\n"
                                   + cluster.tail("master"))
            time.sleep(0.02)
        time.sleep(0.1)
        host, port = read_addr_file(addr)
        r = run_load(s, host, port, cluster.token, proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        buf = io.StringIO()
        buf.write(f"{1e6 * r['server_cpu_s'] / max(1, r['acks']):.1f} us/heartbeat under "
                  f"cProfile ({r['acks']} acked); the profile covers the whole run, "
                  "registrations included\n")
        pstats.Stats(str(stats), stream=buf).sort_stats("tottime").print_stats(30)
        return buf.getvalue()
    finally:
        if proc is not None:
            stop_process(proc)


def summarize_side(rs: list[dict[str, Any]]) -> dict[str, Any]:
    us = [1e6 * r["server_cpu_s"] / r["acks"] for r in rs if r["acks"]]
    core = [100 * r["server_cpu_s"] / r["window_s"] for r in rs]
    return {
        "us": median(us),
        "us_runs": us,
        "core_pct": median(core),
        "acks_per_s": median([r["acks"] / r["window_s"] for r in rs]),
        "sent_per_s": median([r["sent"] / r["window_s"] for r in rs]),
        "p50": median([r["lat_p50_ms"] for r in rs]),
        "p99": median([r["lat_p99_ms"] for r in rs]),
        "max": max((r["lat_max_ms"] or 0 for r in rs), default=None),
        "register_s": median([r["register_s"] for r in rs]),
        "self_us": median([1e6 * r["self_cpu_s"] / r["acks"] for r in rs if r["acks"]]),
        "rss": median([r["rss_kib"] for r in rs if r["rss_kib"]]),
        "rss_start": median([r["rss_start_kib"] for r in rs if r["rss_start_kib"]]),
        "errors": sum((Counter(r["errors"]) for r in rs), Counter()),
        "unanswered": sum(r["unanswered_after_drain"] for r in rs),
        "closed": sum(r["closed"] for r in rs),
    }


def report_heartbeats(s: Settings, res: dict[str, Any]) -> dict[str, Any]:
    m = summarize_side(res["runs"]["master"])
    b = summarize_side(res["runs"]["minimal"])
    q = ratio(m["us"], b["us"])
    ok = None if q is None else q <= TARGET_HEARTBEAT_RATIO
    say()
    say(f"HEARTBEATS: {s.conns:,} simulated workers (one connection each, empty inventory), "
        f"1 heartbeat per worker per second, spread evenly;")
    say(f"  one load-generator process (selectors); {s.window:g} s steady-state window after "
        f"{s.warmup:g} s warm-up; {s.reps} alternating repetitions per side, medians")
    say("  server CPU = utime+stime from /proc/<pid>/stat over the window, per heartbeat "
        "acknowledged in it")
    say()
    rows = [
        ["server CPU us/heartbeat", fmt(m["us"], 1), fmt(b["us"], 1), fmt(q, 2),
         f"<= {TARGET_HEARTBEAT_RATIO:.1f}x: {verdict(ok)}"],
        ["server CPU, % of one core", fmt(m["core_pct"], 1), fmt(b["core_pct"], 1),
         fmt(ratio(m["core_pct"], b["core_pct"]), 2), ""],
        ["heartbeats acked/s", fmt(m["acks_per_s"]), fmt(b["acks_per_s"]), "", ""],
        ["heartbeats sent/s", fmt(m["sent_per_s"]), fmt(b["sent_per_s"]), "", ""],
        ["latency p50 ms", fmt(m["p50"], 2), fmt(b["p50"], 2), "", ""],
        ["latency p99 ms", fmt(m["p99"], 2), fmt(b["p99"], 2), "", ""],
        ["latency max ms", fmt(m["max"], 1), fmt(b["max"], 1), "", ""],
        [f"registering {s.conns:,} workers, s", fmt(m["register_s"], 2),
         fmt(b["register_s"], 2), "", ""],
        ["load generator CPU us/heartbeat", fmt(m["self_us"], 1), fmt(b["self_us"], 1), "", ""],
    ]
    say(table(["", "dsml master", "minimal", "master/min", "target"], rows))
    say()
    say("  us/heartbeat per run:  master " + ", ".join(fmt(x, 1) for x in m["us_runs"])
        + "  |  minimal " + ", ".join(fmt(x, 1) for x in b["us_runs"]))
    per_worker = ratio((m["rss"] or 0) - (m["rss_start"] or 0), s.conns)
    say(f"  master RSS: {fmt(m['rss_start'] / 1024 if m['rss_start'] else None, 1)} MiB at "
        f"start, {fmt(m['rss'] / 1024 if m['rss'] else None, 1)} MiB with {s.conns:,} workers "
        f"registered (~{fmt(per_worker, 1)} KiB per worker); minimal server "
        f"{fmt(b['rss'] / 1024 if b['rss'] else None, 1)} MiB")
    nf = res["nofile"]
    say(f"  RLIMIT_NOFILE: benchmark and children soft {nf[0]}, hard {nf[1]}; master "
        f"soft/hard {res['runs']['master'][0].get('nofile', '?')}")
    for name, side in (("master", m), ("minimal", b)):
        problems = []
        if side["errors"]:
            problems.append("errors " + ", ".join(f"{k} x{v}" for k, v in side["errors"].items()))
        if side["closed"]:
            problems.append(f"{side['closed']} links closed")
        if side["unanswered"]:
            problems.append(f"{side['unanswered']} heartbeats unanswered after the drain")
        if problems:
            say(f"  {name}: " + "; ".join(problems))
    if res.get("profile"):
        say()
        say("  cProfile of the master under the same load (an extra run, sorted by own time):")
        for line in res["profile"].strip().splitlines():
            say("    " + line)
    return {"m": m, "b": b, "ratio": q, "ok": ok}


# -- death detection ------------------------------------------------------------------


def nodes_states(client: Any) -> dict[str, tuple[str, int]]:
    return {n.name: (n.state, n.incarnation) for n in client.nodes()}


def cli_state(cluster: Any, name: str) -> str | None:
    """The STATE column of ``dsml nodes`` for worker ``name``."""
    out = cluster.cli("nodes", check=False)
    if out.returncode != 0:
        return None
    for line in out.stdout.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == name:
            return parts[2]
    return None


class CliPoller(threading.Thread):
    """Runs ``dsml nodes`` back to back until ``name`` shows dead (or time runs out)."""

    def __init__(self, cluster: Any, name: str, limit: float) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.name_ = name
        self.limit = limit
        self.t0: float | None = None  # set by the caller at the kill
        self.seen_dead_at: float | None = None  # monotonic end of the first "dead" run
        self.run_times: list[float] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.limit
        while not self.stop_flag.is_set() and time.monotonic() < end:
            a = time.monotonic()
            state = cli_state(self.cluster, self.name_)
            b = time.monotonic()
            self.run_times.append(b - a)
            # A run that started before the kill does not count.
            if state == "dead" and self.t0 is not None and a >= self.t0:
                self.seen_dead_at = b
                return


def wait_alive(client: Any, names: Sequence[str], after: dict[str, int], limit: float) -> None:
    deadline = time.monotonic() + limit
    while True:
        st = nodes_states(client)
        if all(n in st and st[n][0] == "alive" and st[n][1] > after.get(n, -1) for n in names):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not alive within {limit:g} s: {st}")
        time.sleep(POLL_S)


def bench_death(s: Settings, tmp: Path) -> dict[str, Any]:
    from dsml.client import ClusterClient
    from dsml.localcluster import LocalCluster

    workers = ("w1", "w2", "w3")
    extra = {"cluster": {"heartbeat_interval": s.hb_interval,
                         "heartbeat_timeout": s.hb_timeout}}
    cluster = LocalCluster(tmp / "death", workers=workers, extra=extra)
    out: dict[str, list[dict[str, float | None]]] = {"kill": [], "stop": []}
    client: Any = None
    try:
        note(f"death: starting a master and {len(workers)} workers "
             f"(heartbeat_interval {s.hb_interval:g}, heartbeat_timeout {s.hb_timeout:g})")
        host, port = cluster.start("master")
        for w in workers:
            cluster.start(w)
        client = ClusterClient(host, port, cluster.token, timeout=10)
        wait_alive(client, workers, {}, 30)
        for mode in ("kill", "stop"):
            for rep in range(s.death_reps):
                victim = workers[rep % len(workers)]
                incarnations = {n: inc for n, (_st, inc) in nodes_states(client).items()}
                note(f"death: {'kill -9' if mode == 'kill' else 'SIGSTOP'} of {victim} "
                     f"({rep + 1}/{s.death_reps})")
                limit = s.hb_timeout + 10
                poller = CliPoller(cluster, victim, limit + 5)
                poller.start()
                time.sleep(0.3)  # let the poller get going
                pid = cluster.procs[victim].pid
                t0 = time.monotonic()
                poller.t0 = t0
                os.kill(pid, signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
                api_s: float | None = None
                alive_s = 0.0  # when a nodes call last began that still showed it live
                deadline = t0 + limit
                while time.monotonic() < deadline:
                    asked = time.monotonic() - t0
                    st = nodes_states(client).get(victim)
                    if st is not None and st[0] == "dead":
                        api_s = time.monotonic() - t0
                        break
                    alive_s = asked
                    time.sleep(POLL_S)
                poller.join(timeout=limit + 10)
                poller.stop_flag.set()
                cli_s = None if poller.seen_dead_at is None else poller.seen_dead_at - t0
                out[mode].append({"api": api_s, "alive": alive_s, "cli": cli_s,
                                  "cli_run": median(poller.run_times)})
                note(f"death:   dead after {fmt(api_s, 3)} s (nodes method), "
                     f"{fmt(cli_s, 2)} s (dsml nodes)")
                if mode == "stop":
                    os.kill(pid, signal.SIGCONT)
                cluster.kill(victim, signal.SIGKILL)
                cluster.start(victim)
                wait_alive(client, workers, {victim: incarnations.get(victim, 0)}, 30)
    finally:
        if client is not None:
            client.close()
        cluster.stop()
    return out


def report_death(s: Settings, res: dict[str, Any]) -> dict[str, Any]:
    say()
    say(f"DEATH DETECTION: a master and 3 workers, heartbeat_interval {s.hb_interval:g} s, "
        f"heartbeat_timeout {s.hb_timeout:g} s; {s.death_reps} repetitions each, medians")
    say(f"  time from the signal to the worker shown \"dead\": by the master's nodes method "
        f"polled every {1e3 * POLL_S:.0f} ms, and by the real `dsml nodes` run back to back")
    say("  (\"still live at\": when the last nodes call that showed it live was sent, so the"
        " death\n  happened between that and the figure; a CLI figure is when the first run"
        " started after\n  the signal printed \"dead\": it includes up to one CLI run of delay)")
    say()
    targets = {"kill": TARGET_CLOSED_S, "stop": s.hb_timeout + SILENT_SLACK_S}
    labels = {"kill": "kill -9 (connection closes)", "stop": "SIGSTOP (silent)"}
    rows = []
    out: dict[str, Any] = {}
    for mode in ("kill", "stop"):
        rs = res[mode]
        api = [r["api"] for r in rs]
        cli = [r["cli"] for r in rs]
        api_m = None if any(x is None for x in api) else median(api)
        cli_m = None if any(x is None for x in cli) else median(cli)
        target = targets[mode]
        ok = None if api_m is None else api_m <= target
        ok_cli = None if cli_m is None else cli_m <= target
        out[mode] = (api_m, cli_m, target, ok, ok_cli)
        rows.append([labels[mode], fmt(api_m, 3), fmt(cli_m, 2),
                     f"<= {target:g} s: {verdict(ok)} (CLI: {verdict(ok_cli)})"])
        rows.append(["  per run", " ".join(fmt(x, 3) for x in api),
                     " ".join(fmt(x, 2) for x in cli), ""])
        rows.append(["  per run, still live at", " ".join(fmt(r["alive"], 3) for r in rs),
                     "", ""])
    say(table(["", "nodes method s", "dsml nodes s", "target"], rows))
    runs = [r["cli_run"] for mode in ("kill", "stop") for r in res[mode]]
    say()
    say(f"  one `dsml nodes` run takes {fmt(median(runs), 2)} s (median): the CLI "
        "figures' resolution")
    return out


# -- main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="dsml cluster benchmarks: heartbeats, death")
    p.add_argument("--quick", action="store_true",
                   help="300 workers, shorter windows, faster heartbeats (about a minute)")
    p.add_argument("--only", choices=["heartbeats", "death"], help="run one section")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile the master under heartbeat load (an extra run)")
    p.add_argument("--tmpdir", help="parent of the scratch directory (default: $TMPDIR or /tmp)")
    # Subprocess roles.
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--minimal-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--token", default=os.environ.get("DSML_TOKEN", ""), help=argparse.SUPPRESS)
    p.add_argument("--conns", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=20.0, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--register-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loadgen:
        return loadgen_main(args)
    if args.minimal_server:
        return minimal_server_main(args)

    s = settings(args)
    info = {"nproc": str(os.cpu_count()), "python": platform.python_version(),
            "os": platform.platform()}
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    say(f"dsml cluster benchmarks ({'quick' if s.quick else 'full'} run)")
    say("  machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    say(f"  load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="dsml-cluster-bench-", dir=s.tmp_parent))
    hb_out = death_out = None
    try:
        if args.only in (None, "heartbeats"):
            hb_out = report_heartbeats(s, bench_heartbeats(s, tmp))
        if args.only in (None, "death"):
            death_out = report_death(s, bench_death(s, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    load1 = os.getloadavg()

    say()
    say("=" * 30 + " summary " + "=" * 30)
    say(f"command: {s.command}   ({elapsed:.0f} s)")
    say(f"machine: nproc={info['nproc']}, Python {info['python']}, "
        f"load {load0[0]:.1f} -> {load1[0]:.1f}")
    if hb_out is not None:
        m, b = hb_out["m"], hb_out["b"]
        say(f"heartbeats ({s.conns:,} workers x 1/s, {s.window:g} s window, {s.reps} reps, "
            f"medians): master {fmt(m['us'], 1)} us CPU/heartbeat ({fmt(m['core_pct'], 1)}% "
            f"of a core) vs minimal Twisted {fmt(b['us'], 1)} us ({fmt(b['core_pct'], 1)}%) "
            f"= {fmt(hb_out['ratio'], 2)}x [target <= {TARGET_HEARTBEAT_RATIO:.1f}x: "
            f"{verdict(hb_out['ok'])}]")
        say(f"  master RSS with {s.conns:,} workers registered: "
            f"{fmt(m['rss'] / 1024 if m['rss'] else None, 1)} MiB; heartbeat latency p50/p99 "
            f"{fmt(m['p50'], 2)}/{fmt(m['p99'], 2)} ms")
    if death_out is not None:
        for mode, label in (("kill", "closed connection (kill -9)"),
                            ("stop", "silent worker (SIGSTOP)")):
            api_m, cli_m, target, ok, ok_cli = death_out[mode]
            say(f"death, {label}: dead after {fmt(api_m, 3)} s (nodes method), "
                f"{fmt(cli_m, 2)} s (dsml nodes) [target <= {target:g} s: {verdict(ok)}; "
                f"CLI {verdict(ok_cli)}] (interval {s.hb_interval:g} s, timeout "
                f"{s.hb_timeout:g} s)")
    say("=" * 69)
    return 0


if __name__ == "__main__":
    sys.exit(main())
