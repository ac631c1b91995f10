"""Run a dsml cluster as real twistd processes on 127.0.0.1, for the demo, tests and benchmarks.

Every port is chosen by the OS (port 0 in the generated config); each process writes
where it listens to an address file, which :class:`LocalCluster` waits for.  Everything
it starts, :meth:`LocalCluster.stop` stops (SIGTERM, then SIGKILL after a grace period).
With ``tls=True`` the cluster runs TLS on every link: ``dsml pki init`` makes its CA and
certificates under ``root/pki`` first.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import yaml

from .client import Client
from .client.server import ClientTls
from .net.listen import read_addr_file


def venv_bin(name: str) -> str:
    """The path of a console script installed beside this Python (twistd, dsml)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class ProcessFailed(RuntimeError):
    """A process of the cluster exited or did not come up in time."""


class LocalCluster:
    """A master and named workers as twistd subprocesses, with their config under ``root``."""

    def __init__(
        self,
        root: Path,
        workers: Sequence[str] = ("w1",),
        token: str | None = None,
        extra: dict[str, object] | None = None,
        tls: bool = False,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token if token is not None else secrets.token_hex(16)
        self.worker_names = list(workers)
        self.tls = tls
        self.pki_dir = self.root / "pki"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: Extra twistd options per process name, given at its next start (a benchmark's
        #: ``--profile FILE --profiler cprofile --savestats``).
        self.twistd_options: dict[str, list[str]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        cluster: dict[str, object] = {"token": self.token}
        if tls:
            cluster.update({"tls": True, "pki_dir": "pki"})
        config: dict[str, object] = {
            "cluster": cluster,
            "master": {"host": "127.0.0.1", "port": 0, "state_dir": "master"},
            "workers": {
                name: {"host": "127.0.0.1", "port": 0, "data_dir": name} for name in workers
            },
        }
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values)  # type: ignore[union-attr]
        self.config_path = self.root / "dsml.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        if tls and not (self.pki_dir / "ca.crt").exists():
            self.cli("pki", "init")

    # -- processes --------------------------------------------------------------------

    def addr_file(self, name: str) -> Path:
        """Where the process ``name`` ("master" or a worker) writes its address."""
        if name == "master":
            return self.root / "master" / "master.addr"
        return self.root / name / "worker.addr"

    def log_path(self, name: str) -> Path:
        """The file that receives the process's log."""
        return self.root / f"{name}.log"

    def start(self, name: str, timeout: float = 30.0) -> tuple[str, int]:
        """Start the master or a worker and wait until it listens; return its address."""
        self._spawn(name)
        return self._listening(name, time.monotonic() + timeout, timeout)

    def _spawn(self, name: str) -> None:
        if name in self.procs and self.procs[name].poll() is None:
            raise ProcessFailed(f"{name} is already running")
        addr = self.addr_file(name)
        try:
            addr.unlink()
        except FileNotFoundError:
            pass
        role = ["dsml-master"] if name == "master" else ["dsml-worker"]
        args = [venv_bin("twistd"), "-n", "--pidfile", str(self.root / f"{name}.pid")]
        args += self.twistd_options.get(name, [])
        args += role + ["-c", str(self.config_path)]
        if name != "master":
            args += ["--name", name]
        old_log = self._logs.pop(name, None)
        if old_log is not None:  # a restart: the previous process's handle
            old_log.close()
        log = open(self.log_path(name), "ab")
        self._logs[name] = log
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root
        )

    def _listening(self, name: str, deadline: float, timeout: float) -> tuple[str, int]:
        """Wait until the spawned ``name`` listens (its address file); its address."""
        addr, proc = self.addr_file(name), self.procs[name]
        while True:
            if addr.exists():
                try:
                    return read_addr_file(addr)
                except (OSError, ValueError):
                    pass
            if proc.poll() is not None:
                raise ProcessFailed(
                    f"{name} exited with status {proc.returncode}; log:\n{self.tail(name)}"
                )
            if time.monotonic() > deadline:
                self.kill(name)
                raise ProcessFailed(f"{name} did not listen within {timeout} s:\n{self.tail(name)}")
            time.sleep(0.02)

    def start_all(self, timeout: float = 60.0) -> None:
        """Start the master and every worker; return once every worker has registered
        with the master (alive in its ``nodes``), so a test can submit at once."""
        from .client import ClusterClient
        from .testing.poll import poll

        self.start("master")
        # The workers at once (each spends a second or more importing before it listens).
        for name in self.worker_names:
            self._spawn(name)
        deadline = time.monotonic() + timeout
        for name in self.worker_names:
            self._listening(name, deadline, timeout)
        host, port = self.address("master")
        want = set(self.worker_names)
        with ClusterClient(host, port, self.token, tls=self.user_tls()) as c:
            poll(lambda: True if want <= {n.name for n in c.nodes() if n.state == "alive"}
                 else None, f"{', '.join(sorted(want))} to register", timeout)

    def address(self, name: str) -> tuple[str, int]:
        """The address the running process ``name`` listens on."""
        return read_addr_file(self.addr_file(name))

    def tail(self, name: str, lines: int = 30) -> str:
        """The end of a process's log."""
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a process and, for a fatal signal, reap it."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this cluster started: SIGTERM, then SIGKILL after ``grace``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        # A worker stopped with SIGKILL leaves its (empty) attempt cgroups behind.
        from .worker.tasks.cgroups import remove_tree

        for name in self.worker_names:
            remove_tree(self.root / name / "tasks")

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ----------------------------------------------------------------------

    def user_tls(self, user: str = "admin") -> ClientTls | None:
        """The TLS identity of ``user`` (None when the cluster does not run TLS)."""
        return ClientTls(self.pki_dir, user) if self.tls else None

    def client(self, name: str = "w1") -> Client:
        """A blocking client connected to worker ``name`` (as ``admin`` over TLS)."""
        host, port = self.address(name)
        return Client(host, port, self.token, tls=self.user_tls())

    def cli(
        self, *args: str, input: bytes | None = None, check: bool = True, worker: str | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the real ``dsml`` command against this cluster."""
        cmd = [venv_bin("dsml"), "-c", str(self.config_path)]
        if worker is not None:
            cmd += ["--worker", worker]
        result = subprocess.run(
            cmd + list(args), input=input, capture_output=True, timeout=600,
            env={**os.environ, "DSML_TOKEN": self.token},
        )
        if check and result.returncode != 0:
            raise ProcessFailed(
                f"dsml {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result
