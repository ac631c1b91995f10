"""Profile a dsml worker under load: twistd's own cProfile support, one worker, one client.

    .venv/bin/python benchmarks/profile_server.py values [--pairs 3000]
    .venv/bin/python benchmarks/profile_server.py files [--size-mib 256]
    ... [--sort tottime|cumulative] [--top 25] [--tls] [--client]

Starts ``twistd -n --profile FILE --profiler cprofile --savestats dsml-worker`` with a
:class:`LocalCluster` config (so the worker is set up exactly as in run.py), drives it
from this process with the blocking Client, stops it with SIGTERM (twistd then writes the
stats) and prints the top functions; with ``--client``, the client's own (cProfile of
the driving loop in this process) after them.  cProfile measures wall time: a ``send`` that wakes
the client may be charged for the client's turn on a busy CPU.  Figures under the
profiler are slower than run.py's and are not benchmarks.
"""

from __future__ import annotations

import argparse
import os
import pstats
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsml.client import Client
from dsml.localcluster import LocalCluster, venv_bin
from dsml.net.listen import read_addr_file

MIB = 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("load", choices=["values", "files"])
    p.add_argument("--pairs", type=int, default=3000, help="set+get pairs (values)")
    p.add_argument("--size-mib", type=int, default=256, help="file size (files)")
    p.add_argument("--sort", default="tottime", help="pstats sort key")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--tmpdir", help="parent of the scratch directory")
    p.add_argument("--tls", action="store_true", help="the worker and client over TLS 1.3")
    p.add_argument("--client", action="store_true",
                   help="also profile the client (this process) and print its top functions")
    a = p.parse_args(argv)
    client_prof = None
    if a.client:
        import cProfile

        client_prof = cProfile.Profile()
    root = Path(tempfile.mkdtemp(prefix="dsml-prof-", dir=a.tmpdir))
    proc: subprocess.Popen[bytes] | None = None
    try:
        cluster = LocalCluster(root / "cluster", workers=("w1",), tls=a.tls)
        stats = root / "worker.prof"
        addr = cluster.addr_file("w1")
        with open(root / "w1.log", "wb") as log:
            proc = subprocess.Popen(
                [venv_bin("twistd"), "-n", "--pidfile", str(root / "w1.pid"),
                 "--profile", str(stats), "--profiler", "cprofile", "--savestats",
                 "dsml-worker", "-c", str(cluster.config_path), "--name", "w1"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cluster.root,
            )
        deadline = time.monotonic() + 30
        while not addr.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not start:\n"
                                   + (root / "w1.log").read_text(errors="replace")[-2000:])
            time.sleep(0.02)
        host, port = read_addr_file(addr)
        with Client(host, port, cluster.token, timeout=300.0,
                    tls=cluster.user_tls()) as c:
            if a.load == "values":
                value = os.urandom(100)
                keys = [f"bench/value-{i:02d}" for i in range(50)]
                def pairs() -> None:
                    for i in range(a.pairs):
                        c.set(keys[i % 50], value)
                        c.get(keys[i % 50])

                t0 = time.perf_counter()
                if client_prof is not None:
                    client_prof.runcall(pairs)
                else:
                    pairs()
                dt = time.perf_counter() - t0
                print(f"{a.pairs / dt:,.0f} pairs/s under the profiler")
            else:
                src = root / "source.bin"
                rng = random.Random(3)
                with open(src, "wb") as f:
                    for _ in range(a.size_mib):
                        f.write(rng.randbytes(MIB))
                size = a.size_mib * MIB
                run = client_prof.runcall if client_prof is not None else (lambda f, *x: f(*x))
                t0 = time.perf_counter()
                run(c.upload, src, "bench/file.bin")
                t1 = time.perf_counter()
                run(c.download, "bench/file.bin", root / "download.bin")
                t2 = time.perf_counter()
                print(f"upload {size / (t1 - t0) / 1e6:,.0f} MB/s, download "
                      f"{size / (t2 - t1) / 1e6:,.0f} MB/s under the profiler")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        pstats.Stats(str(stats)).sort_stats(a.sort).print_stats(a.top)
        if client_prof is not None:
            print("the client (this process):")
            pstats.Stats(client_prof).sort_stats(a.sort).print_stats(a.top)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
