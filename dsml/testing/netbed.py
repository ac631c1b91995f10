"""Real hosts for fault tests: network namespaces on a private bridge, faults by nftables.

    .venv/bin/python -m dsml.testing.netbed                      # every scenario once
    .venv/bin/python -m dsml.testing.netbed --runs 3 --only kill-worker,pause-worker

(``make test-faults`` runs the same through pytest, ``tests/test_faults_hosts.py``.)
Needs root, iproute2 and nftables; :func:`can_build` says why not where they are missing.

A :class:`NetBed` makes one namespace per host (``master``, ``w1``..``w3``, ``client``),
each with an ``eth0`` on a bridge in a hub namespace (10.91.K.0/24, K from the pid), and
an nftables table of its own whose rules make the faults: a cable cut (every packet in
and out of the host dropped: its peers see silence, as with a pulled cable), a partition
between two hosts (each drops the other's packets), packet loss (a random share dropped
both ways).  The cluster runs there for real: ``twistd`` master and workers, TLS 1.3
with a CA from ``dsml pki init`` (listening off loopback requires TLS), real task
processes.  Processes are started with ``ip netns exec`` (which execs: the PID is
twistd's own) and stopped by their PIDs; :meth:`NetBed.down` removes every namespace.

A scenario (:data:`SCENARIOS`) runs the workload of :mod:`dsml.testing.netload` on the
client host for ``WORKLOAD`` seconds, injects its fault at ``FAULT_AT`` and heals it
``length`` seconds later, then the workload settles and checks; :func:`run_scenario`
returns a :class:`Result` (the history checked by :func:`dsml.testing.nemesis.
check_history`, and the table's figures: operations ok/failed/unknown, acknowledged
writes lost, tasks with more than one success, stale outputs, time to converge after
the heal, the longest client call during the fault).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import yaml

from .history import Op, Violation, check_history

WORKERS = ("w1", "w2", "w3")
HOSTS = ("master", *WORKERS, "client")
MASTER_PORT = 7000
WORKER_PORT = 7500
HEARTBEAT_TIMEOUT = 6.0
WORKLOAD = 40.0
FAULT_AT = 8.0


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def can_build() -> str:
    """"" if namespaces, veth and nftables can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, nftables)"
    probe = f"dsmlprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a network namespace: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "nft", "add", "table", "inet", "t"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"nftables does not work in a namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def sh(*args: str, input: str | None = None) -> None:
    r = subprocess.run(list(args), capture_output=True, text=True, input=input)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")


class NetBed:
    """The hosts, their bridge, the cluster on them, and the faults."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.k = os.getpid() % 200 + 20
        self.prefix = f"db{self.k}"
        self.subnet = f"10.91.{self.k}"
        self.ip = {"master": f"{self.subnet}.1", "client": f"{self.subnet}.100"}
        for i, w in enumerate(WORKERS):
            self.ip[w] = f"{self.subnet}.{11 + i}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []
        self.made: list[str] = []
        self.config = self.root / "dsml.yaml"

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    # -- the network -------------------------------------------------------------------

    def up(self) -> None:
        hub = self.ns("hub")
        sh("ip", "netns", "add", hub)
        self.made.append(hub)
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        for host in HOSTS:
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            a, b = f"{self.prefix}{host[:3]}a", f"{self.prefix}{host[:3]}b"
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", ns)
            sh("ip", "link", "set", b, "netns", hub)
            sh("ip", "-n", ns, "link", "set", a, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", hub, "link", "set", b, "master", "br0")
            sh("ip", "-n", hub, "link", "set", b, "up")
            sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=(
                "table inet dsmlbed {\n"
                " chain input { type filter hook input priority 0; policy accept; }\n"
                " chain output { type filter hook output priority 0; policy accept; }\n"
                "}\n"))

    def down(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for log in self._logs:
            log.close()
        self._logs.clear()
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()

    def nft(self, host: str, *rules: str) -> None:
        sh("ip", "netns", "exec", self.ns(host), "nft", "-f", "-",
           input="".join(f"add rule inet dsmlbed {r}\n" for r in rules))

    def cut(self, host: str) -> None:
        """The host's cable is pulled: nothing in or out on eth0."""
        self.nft(host, 'input iifname "eth0" drop', 'output oifname "eth0" drop')

    def partition(self, a: str, b: str) -> None:
        """``a`` and ``b`` drop each other's packets."""
        self.nft(a, f"input ip saddr {self.ip[b]} drop", f"output ip daddr {self.ip[b]} drop")
        self.nft(b, f"input ip saddr {self.ip[a]} drop", f"output ip daddr {self.ip[a]} drop")

    def loss(self, host: str, percent: int) -> None:
        """A random ``percent`` of the host's packets are lost, both ways."""
        self.nft(host, f'input iifname "eth0" numgen random mod 100 < {percent} drop',
                 f'output oifname "eth0" numgen random mod 100 < {percent} drop')

    def heal(self, *hosts: str) -> None:
        for host in hosts or HOSTS:
            sh("ip", "netns", "exec", self.ns(host), "nft", "flush", "table", "inet", "dsmlbed")

    # -- the cluster ---------------------------------------------------------------------

    def write_config(self) -> None:
        cfg = {
            "cluster": {"token": "netbed-" + "x" * 24, "tls": True, "pki_dir": "pki",
                        "replication": 2, "heartbeat_interval": 1.0,
                        "heartbeat_timeout": HEARTBEAT_TIMEOUT},
            "master": {"host": self.ip["master"], "port": MASTER_PORT, "state_dir": "master"},
            "workers": {w: {"host": self.ip[w], "port": WORKER_PORT, "data_dir": w, "slots": 2}
                        for w in WORKERS},
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        sh(_venv_bin("dsml"), "-c", str(self.config), "pki", "init")

    def start(self, name: str) -> None:
        host = "master" if name == "master" else name
        args = [_venv_bin("twistd"), "-n", "--pidfile", str(self.root / f"{name}.pid")]
        args += ["dsml-master"] if name == "master" else ["dsml-worker"]
        args += ["-c", str(self.config)]
        if name != "master":
            args += ["--name", name]
        log = open(self.root / f"{name}.log", "ab")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=self.root,
        )

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def client(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A command on the client host."""
        return subprocess.run(["ip", "netns", "exec", self.ns("client"), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the master answers ``nodes`` from the client host with every worker alive."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            r = self.client(_venv_bin("dsml"), "-c", str(self.config), "nodes", "--json")
            if r.returncode == 0:
                try:
                    nodes = json.loads(r.stdout)
                    alive = [n for n in nodes.get("workers", nodes) if n.get("state") == "alive"]
                    if len(alive) == len(WORKERS):
                        return
                except (ValueError, AttributeError):
                    pass
            last = r.stderr.strip() or r.stdout.strip()
            time.sleep(0.5)
        raise RuntimeError(f"the cluster did not come up: {last[-400:]}")


# -- scenarios --------------------------------------------------------------------------


@attrs.frozen
class Scenario:
    name: str
    what: str
    inject: Callable[[NetBed], None]
    heal: Callable[[NetBed], None]
    length: float  # seconds from inject to heal


def _restart(name: str) -> Callable[[NetBed], None]:
    def go(bed: NetBed) -> None:
        if name not in bed.procs or bed.procs[name].poll() is not None:
            bed.procs.pop(name, None)
            bed.start(name)
    return go


SCENARIOS = (
    Scenario("kill-worker", "kill -9 a worker, start it again 20 s later",
             lambda b: b.signal("w1", signal.SIGKILL), _restart("w1"), 20.0),
    Scenario("kill-master", "kill -9 the master, start it again 5 s later",
             lambda b: b.signal("master", signal.SIGKILL), _restart("master"), 5.0),
    Scenario("cut-worker", "pull a worker's cable past the heartbeat timeout (20 s)",
             lambda b: b.cut("w2"), lambda b: b.heal("w2"), 20.0),
    Scenario("partition", "partition the master from a worker (20 s)",
             lambda b: b.partition("master", "w3"), lambda b: b.heal("master", "w3"), 20.0),
    Scenario("loss", "20% packet loss on a worker (20 s)",
             lambda b: b.loss("w1", 20), lambda b: b.heal("w1"), 20.0),
    Scenario("pause-worker", "SIGSTOP a worker past the heartbeat timeout (20 s)",
             lambda b: b.signal("w2", signal.SIGSTOP),
             lambda b: b.signal("w2", signal.SIGCONT), 20.0),
    Scenario("cut-master", "pull the master's cable (15 s)",
             lambda b: b.cut("master"), lambda b: b.heal("master"), 15.0),
)


@attrs.define
class Result:
    scenario: str
    run: int
    counts: dict[str, int]
    violations: list[Violation]
    lost: int
    double_successes: int
    stale_outputs: int
    converge_s: float | None
    longest_call_s: float
    jobs: str
    problems: list[str]
    fault: tuple[float, float] = (0.0, 0.0)  # injected, healed (monotonic)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.problems

    def row(self) -> str:
        c = self.counts
        conv = "never" if self.converge_s is None else f"{self.converge_s:.1f}"
        return (f"{self.scenario:<13} {self.run:>3}  {c.get('ok', 0):>5} {c.get('failed', 0):>6} "
                f"{c.get('unknown', 0):>7} {self.lost:>5} {self.double_successes:>7} "
                f"{self.stale_outputs:>6} {conv:>9} {self.longest_call_s:>8.1f}  {self.jobs}")


HEADER = (f"{'scenario':<13} {'run':>3}  {'ok':>5} {'failed':>6} {'unknown':>7} {'lost':>5} "
          f"{'2x succ':>7} {'stale':>6} {'converge':>9} {'longest':>8}  jobs ended")


def run_scenario(s: Scenario, root: Path, run: int = 1, seed: int = 1, *,
                 workload: float = WORKLOAD, fault_at: float = FAULT_AT,
                 length: float | None = None) -> Result:
    """One scenario on a fresh bed under ``root``; the bed is gone afterwards.
    ``workload``, ``fault_at`` and ``length`` (default: the scenario's) shorten it (the
    default test suite's quick run)."""
    bed = NetBed(root)
    try:
        bed.up()
        bed.write_config()
        bed.start("master")
        for w in WORKERS:
            bed.start(w)
        bed.wait_ready()
        out = root / "load"
        load = subprocess.Popen(
            ["ip", "netns", "exec", bed.ns("client"), sys.executable, "-m",
             "dsml.testing.netload", "--config", str(bed.config), "--seconds", str(workload),
             "--out", str(out), "--seed", str(seed)],
            cwd=root, stdout=open(root / "load.log", "wb"), stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(fault_at)
            injected = time.monotonic()
            s.inject(bed)
            time.sleep(s.length if length is None else length)
            s.heal(bed)
            healed = time.monotonic()
            load.wait(workload + 600)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait(10)
        ops = [Op(**json.loads(line)) for line in (out / "history.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
    finally:
        bed.down()
    violations = check_history(ops)
    counts: dict[str, int] = {}
    for op in ops:
        if op.kind in ("set", "upload", "remove", "submit"):
            counts[op.outcome] = counts.get(op.outcome, 0) + 1
    lost = sum(1 for v in violations if v.checker == "durability")
    during = [op.end - op.start for op in ops
              if op.end is not None and op.start <= healed + HEARTBEAT_TIMEOUT
              and op.end >= injected]
    conv = summary.get("converged")
    return Result(
        s.name, run, counts, violations, lost, summary["double_successes"],
        summary["stale_outputs"], None if conv is None else max(0.0, conv - healed),
        max(during, default=0.0), f"{summary['jobs_ended']}/{summary['jobs']}",
        summary["problems"] + [f"lanes hung: {summary['hung']}"] * bool(summary["hung"]),
        (injected, healed),
    )


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsml.testing.netbed",
                                description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1, help="runs of each scenario")
    p.add_argument("--only", help="scenarios, comma-separated: " +
                   ",".join(s.name for s in SCENARIOS))
    p.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    args = p.parse_args(list(argv) if argv is not None else None)
    why = can_build()
    if why:
        print(f"cannot build the test hosts: {why}")
        return 2
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    results = []
    base = Path(tempfile.mkdtemp(prefix="dsml-netbed-"))
    print(HEADER, flush=True)
    for s in chosen:
        for i in range(1, args.runs + 1):
            r = run_scenario(s, base / f"{s.name}-{i}", i, seed=i)
            results.append(r)
            print(r.row(), flush=True)
            for v in r.violations[:5]:
                print(f"    [{v.checker}] {v.message}")
            for problem in r.problems[:5]:
                print(f"    {problem}")
    if args.keep:
        print(f"logs: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    bad = [r for r in results if not r.ok]
    print(f"{len(results) - len(bad)} of {len(results)} runs clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
