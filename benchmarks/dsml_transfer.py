"""One dsml file transfer through the Python client, in a process of its own.

    dsml_transfer.py upload HOST PORT FILE KEY [--profile OUT]
    dsml_transfer.py download HOST PORT KEY FILE [--profile OUT]

The token comes from $DSML_TOKEN; with $DSML_BENCH_PKI set (a pki_dir) the connection is
TLS 1.3 with that directory's ``admin`` certificate. Prints one JSON line: the seconds
from connecting to the server's acknowledgement (upload: after its fsync) or to the
downloaded file being fsynced and renamed into place, and this process's own peak RSS and
CPU time, so the figures are the client's alone. With ``--profile`` the transfer runs
under cProfile and the stats are written to OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from dsml.client import Client
from dsml.client.server import ClientTls


def transfer(op: str, host: str, port: int, a: str, b: str) -> int:
    token = os.environ.get("DSML_TOKEN", "")
    pki_dir = os.environ.get("DSML_BENCH_PKI")
    tls = ClientTls(Path(pki_dir), "admin") if pki_dir else None
    with Client(host, port, token, timeout=300.0, name="dsml-bench", tls=tls) as c:
        if op == "upload":
            return c.upload(a, b).size
        return c.download(a, b).size


def _hwm() -> int:
    """Peak RSS of this process (VmHWM: ru_maxrss would include the parent's, see
    common.self_hwm_kib)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("op", choices=["upload", "download"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("a", help="FILE for an upload, KEY for a download")
    p.add_argument("b", help="KEY for an upload, FILE for a download")
    p.add_argument("--profile", help="write cProfile stats here")
    args = p.parse_args(argv)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        size = prof.runcall(transfer, args.op, args.host, args.port, args.a, args.b)
        seconds = time.perf_counter() - t0
        prof.dump_stats(args.profile)
    else:
        size = transfer(args.op, args.host, args.port, args.a, args.b)
        seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "seconds": seconds,
        "bytes": size,
        "vmhwm_kib": _hwm(),
        # CPU of the transfer alone (not of starting Python and importing dsml)
        "cpu": usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
