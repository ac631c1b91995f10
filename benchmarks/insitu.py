"""Where a real worker's time goes per small request, timed inside the running process.

    .venv/bin/python benchmarks/insitu.py [set|get] [--requests 20000]

cProfile and py-spy distort a ~100 us request, and a micro-benchmark of one function runs
with warm caches: in situ the same Python costs about three times as much (the server
sleeps between requests).  This starts ``twistd -n dsml-worker`` through a small wrapper
that wraps a few functions (the reactor's read and write, the server's steps, the
store's) in ``perf_counter_ns`` timers, drives it from here with the blocking Client, and
prints the average time of each per call, nested ones included in their callers.  The
wrapper adds about half a microsecond per timed call.  Not a benchmark: no reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dsml.localcluster as localcluster  # noqa: E402

# The wrapper: runs twistd in this interpreter with timers on the functions below, and
# writes the totals as JSON to the path in DSML_INSITU_OUT when the reactor stops.
WRAPPER = '''#!{python}
import functools, json, os, sys, time
from twisted.internet import tcp
from twisted.python import log as tlog
import dsml.net.answering as answering
import dsml.net.connection as connection
import dsml.worker.storage as storage
import dsml.worker.store as store
from dsml.protocol import codec

totals = {{}}

def timed(owner, name, label):
    fn = getattr(owner, name)
    clock = time.perf_counter_ns
    @functools.wraps(fn)  # keeps what a @responder marked on it
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            t = totals.setdefault(label, [0, 0])
            t[0] += clock() - start
            t[1] += 1
    setattr(owner, name, wrapper)

timed(tlog, "callWithLogger", "reactor: one event (callWithLogger)")
timed(tcp.Connection, "doRead", "tcp: doRead (recv + dataReceived)")
timed(tcp.Connection, "writeSomeData", "tcp: writeSomeData (send)")
timed(connection.Connection, "dataReceived", "connection: dataReceived")
timed(answering.Answers, "_dispatch", "answering: _dispatch")
timed(connection, "quick_request", "codec: quick_request")
timed(storage.StorageHandler, "_value_upload", "storage: _value_upload")
timed(storage.StorageHandler, "_value_retrieve", "storage: _value_retrieve")
timed(store.Store, "put_value", "store: put_value")
timed(store.Store, "get_value", "store: get_value")
timed(store.Store, "flush", "store: flush (values log -> SQLite)")

def dump():
    with open(os.environ["DSML_INSITU_OUT"], "w") as f:
        json.dump(totals, f)

from twisted.internet import reactor
reactor.addSystemEventTrigger("after", "shutdown", dump)
from twisted.scripts.twistd import run
run()
'''


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("load", choices=["set", "get"])
    p.add_argument("--requests", type=int, default=20000)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dsml-insitu-") as tmp:
        root = Path(tmp)
        wrapper = root / "twistd-timed"
        wrapper.write_text(WRAPPER.format(python=localcluster.venv_bin("python")))
        wrapper.chmod(0o755)
        out = root / "totals.json"
        real = localcluster.venv_bin
        localcluster.venv_bin = lambda name: str(wrapper) if name == "twistd" else real(name)
        os.environ["DSML_INSITU_OUT"] = str(out)
        cluster = localcluster.LocalCluster(root / "cluster", workers=("w1",))
        try:
            cluster.start("w1")
            with cluster.client("w1") as c:
                keys = [f"insitu/{i:02d}" for i in range(50)]
                value = b"x" * 100
                for k in keys:
                    c.set(k, value)
                op = c.set if args.load == "set" else (lambda k, v: c.get(k))
                t0 = time.perf_counter()
                for i in range(args.requests):
                    op(keys[i % 50], value)
                dt = time.perf_counter() - t0
        finally:
            cluster.stop()
            localcluster.venv_bin = real
        totals = json.loads(out.read_text())
    print(f"{args.load}: {args.requests / dt:,.0f}/s, {dt / args.requests * 1e6:.1f} us "
          f"per round trip (client and server)")
    print(f"  {'us per call':>11}  {'calls':>7}  timed in the worker")
    for label, (ns, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"  {ns / max(n, 1) / 1000:11.2f}  {n:7d}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
