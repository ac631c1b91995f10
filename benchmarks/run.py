"""dsml benchmarks, each figure measured side by side with a reference in the same run.

    .venv/bin/python benchmarks/run.py [--quick] [--only values|files] [--tls] [--profile]

values  set/get round trips on one connection: dsml (Client against a twistd worker)
        beside redis-py against a private redis-server (no persistence).
files   upload and download of a random file: dsml's Python client (and once its CLI)
        beside a raw loopback copy (benchmarks/rawnet.py: sendfile + recv_into + fsync).

--tls   (issue #10) adds the TLS sides, all in the same run and alternating with the rest:
        values: dsml+tls (a cluster.tls worker, TLS 1.3, certificates both ways) beside
        dsml without TLS and redis-py+tls (redis-server --port 0 --tls-port N with a
        throwaway CA from dsml.pki, client certificates required, TLS 1.3 only) beside
        redis-py without; files: dsml+tls beside dsml and the raw copy.  The tables show
        the ratios tls/plain (target >= 0.8x), tls/redis-tls (>= 1.0x) and, for files,
        tls/raw (>= 0.4x).  The full run, as quoted in issue #10:

            .venv/bin/python benchmarks/run.py --tls

The machine may be shared and noisy, so the sides alternate, round by round (the order
rotating), and the tables show medians and the ratios.  Nothing here asserts a speed: the
targets are printed beside the figures.  Everything runs on 127.0.0.1 under one temporary
directory, which is deleted at the end, and every process started here is stopped.
--rounds, --pairs and --file-mib shrink a run further (tests/test_bench_smoke.py).

One file of two sections (values, files), each measured beside its own report, so that
a figure and how it was taken read together: hence over 600 lines in one room.

--profile adds cProfile runs of the dsml client (extra runs, outside the figures);
benchmarks/profile_server.py [--tls] profiles the worker itself under the same loads.
benchmarks/insitu.py times the worker's steps per small request inside the process.
benchmarks/scale.py: the master at a lab's scale (simulated workers, keys, a big array).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    MIB,
    cpu_model,
    cpu_seconds,
    fmt,
    free_port,
    median,
    note,
    proc_status_kib,
    ratio,
    run_json_helper,
    run_measured,
    say,
    stop_process,
    table,
    verdict,
)

from dsml.localcluster import LocalCluster, venv_bin  # noqa: E402

MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes per second)
NKEYS = 50
VALUE_SIZE = 100
TRANSFER_TIMEOUT = 300.0  # seconds for one helper process, whatever the file size

# Targets printed beside the figures (never asserted).
TARGET_PAIRS_RATIO = 1.0
TARGET_FILE_RATIO = 0.5
TARGET_TLS_PLAIN_RATIO = 0.8  # dsml over TLS against dsml without (values)
TARGET_TLS_FILE_RATIO = 0.4  # dsml over TLS against the raw loopback copy (files)

# The sides' names in the tables.
DSML, DSML_TLS = "dsml", "dsml+tls"
REDIS, REDIS_TLS = "redis-py", "redis-py+tls"
RAW = "raw"
TARGET_RSS_MIB = 100


@dataclass
class Settings:
    quick: bool
    profile: bool
    value_rounds: int
    value_pairs: int
    value_warmup: int
    phase_cap: float  # seconds: a set or get phase stops early past this
    file_size: int
    file_reps: int
    tmp_parent: str | None
    command: str
    tls: bool = False


def settings(args: argparse.Namespace) -> Settings:
    cmd = ".venv/bin/python benchmarks/run.py" + "".join(
        f" {a}" for a in sys.argv[1:]
    )
    if args.quick:
        s = Settings(True, args.profile, 3, 1500, 300, 15.0, 256 * MIB, 3, args.tmpdir, cmd,
                     args.tls)
    else:
        s = Settings(False, args.profile, 5, 5000, 1000, 60.0, 1024 * MIB, 3, args.tmpdir, cmd,
                     args.tls)
    # Smaller still, for a smoke test (tests/test_bench_smoke.py): not figures to quote.
    if args.rounds is not None:
        s.value_rounds = s.file_reps = args.rounds
    if args.pairs is not None:
        s.value_pairs = args.pairs
        s.value_warmup = min(s.value_warmup, args.pairs)
    if args.file_mib is not None:
        s.file_size = args.file_mib * MIB
    return s


# -- output ---------------------------------------------------------------------------


# fmt, ratio, verdict, table, say and note come from common.py.


# -- machine --------------------------------------------------------------------------


def redis_version() -> str | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, timeout=10, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in out.stdout.split():
        if word.startswith("v="):
            return word[2:]
    return out.stdout.strip() or None


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if str(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, f"{parts[2]} on {mnt} ({parts[0]})"
    except OSError:
        pass
    return kind


def machine() -> dict[str, str]:
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "redis-server": redis_version() or "not installed",
    }


# -- values ---------------------------------------------------------------------------


@dataclass
class ValueSide:
    name: str
    set: Callable[[str, bytes], Any]
    get: Callable[[str], bytes | None]
    pid: int
    rounds: list[dict[str, float]] = field(default_factory=list)


@dataclass
class RedisTls:
    """A throwaway CA (dsml.pki) and the files redis-server and redis-py need for
    mutual TLS 1.3, as dsml's links have: the server's certificate and key, the client's,
    and the CA both verify against."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_redis_tls(pki_dir: Path) -> RedisTls:
    """A CA, a server identity (dsml's master kind) and a client (user) identity."""
    from dsml import pki

    pki.init_cluster(pki_dir, "127.0.0.1", [])
    server = pki.identity_paths(pki_dir, "master", "master")
    client = pki.identity_paths(pki_dir, "user", pki.DEFAULT_USER)
    return RedisTls(pki.ca_paths(pki_dir).cert, server.cert, server.key, client.cert,
                    client.key)


def redis_client(port: int, tls: RedisTls | None) -> Any:
    """redis-py on one connection; over TLS 1.3 with a client certificate, the server
    verified against the CA (by certificate, not host name, as dsml's client does)."""
    import ssl

    import redis

    if tls is None:
        return redis.Redis("127.0.0.1", port, socket_timeout=30)
    return redis.Redis(
        "127.0.0.1", port, socket_timeout=30, ssl=True,
        ssl_certfile=str(tls.client_cert), ssl_keyfile=str(tls.client_key),
        ssl_ca_certs=str(tls.ca), ssl_cert_reqs="required", ssl_check_hostname=False,
        ssl_min_version=ssl.TLSVersion.TLSv1_3,
    )


def start_redis(workdir: Path, tls: RedisTls | None = None
                ) -> tuple[subprocess.Popen[bytes], int] | None:
    """A private redis-server on a free 127.0.0.1 port, without persistence; with
    ``tls`` it listens only with TLS 1.3 (``--port 0 --tls-port N``) and requires a
    client certificate from the CA."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    import redis

    workdir.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        port = free_port()
        if tls is None:
            ports = ["--port", str(port)]
        else:
            ports = ["--port", "0", "--tls-port", str(port),
                     "--tls-cert-file", str(tls.server_cert),
                     "--tls-key-file", str(tls.server_key),
                     "--tls-ca-cert-file", str(tls.ca),
                     "--tls-auth-clients", "yes", "--tls-protocols", "TLSv1.3"]
        proc = subprocess.Popen(
            [exe, *ports, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
             "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    with redis_client(port, tls) as probe:
                        if probe.ping():
                            return proc, port
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
        except BaseException:
            stop_process(proc)
            raise
        stop_process(proc)  # the port was taken meanwhile, or it did not start: retry
    return None


def value_round(side: ValueSide, keys: Sequence[str], values: Sequence[bytes],
                n: int, cap: float) -> dict[str, float]:
    """n sets, then n gets, cycling over the keys; each phase stops early after ``cap`` s."""
    nk = len(keys)
    set_, get = side.set, side.get
    out: dict[str, float] = {}

    srv0, cli0 = cpu_seconds(side.pid), time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + cap
    done = n
    for i in range(n):
        set_(keys[i % nk], values[i % nk])
        if not i & 255 and time.perf_counter() > deadline:
            done = i + 1
            break
    t1 = time.perf_counter()
    srv1, cli1 = cpu_seconds(side.pid), time.process_time()
    out.update(set_n=done, set_s=t1 - t0, set_srv=srv1 - srv0, set_cli=cli1 - cli0)

    t1 = time.perf_counter()
    deadline = t1 + cap
    done = n
    for i in range(n):
        get(keys[i % nk])
        if not i & 255 and time.perf_counter() > deadline:
            done = i + 1
            break
    t2 = time.perf_counter()
    srv2, cli2 = cpu_seconds(side.pid), time.process_time()
    out.update(get_n=done, get_s=t2 - t1, get_srv=srv2 - srv1, get_cli=cli2 - cli1)
    return out


def dsml_variants(s: Settings) -> list[tuple[str, bool]]:
    """The dsml sides of a run, (name, over TLS): with --tls both, TLS first."""
    return [(DSML_TLS, True), (DSML, False)] if s.tls else [(DSML, False)]


def bench_values(s: Settings, tmp: Path) -> dict[str, Any]:
    rng = random.Random(1)
    keys = [f"bench/value-{i:02d}" for i in range(NKEYS)]
    values = [rng.randbytes(VALUE_SIZE) for _ in range(NKEYS)]
    clusters: list[LocalCluster] = []
    redis_started: list[subprocess.Popen[bytes]] = []
    closers: list[Callable[[], Any]] = []
    sides: list[ValueSide] = []
    result: dict[str, Any] = {}
    try:
        for name, tls in dsml_variants(s):
            cluster = LocalCluster(tmp / f"values-cluster-{name}", workers=("w1",), tls=tls)
            clusters.append(cluster)
            note(f"values: starting a dsml worker ({name})")
            cluster.start("w1")
            dc = cluster.client("w1")
            closers.append(dc.close)
            pid = cluster.procs["w1"].pid
            sides.append(ValueSide(name, dc.set, dc.get, pid))
            result.setdefault("dsml_rss_start", proc_status_kib(pid, "VmRSS"))
        try:
            import redis  # noqa: F401
        except ImportError:
            result["redis_missing"] = "redis-py is not installed (pip install -e '.[bench]')"
        else:
            variants = [(REDIS_TLS, True), (REDIS, False)] if s.tls else [(REDIS, False)]
            for name, tls in variants:
                note(f"values: starting redis-server ({name})")
                rtls = make_redis_tls(tmp / "redis-pki") if tls else None
                started = start_redis(tmp / f"redis-{name}", rtls)
                if started is None:
                    result["redis_missing"] = (
                        f"redis-server ({name}) is not installed or did not start "
                        "(sudo apt-get install redis-server)"
                    )
                    continue
                proc, port = started
                redis_started.append(proc)
                r = redis_client(port, rtls)
                closers.append(r.close)
                sides.append(ValueSide(name, r.set, r.get, proc.pid))

        note(f"values: warm-up, {s.value_warmup} pairs per side")
        for side in sides:
            value_round(side, keys, values, s.value_warmup, s.phase_cap)
            for k, v in zip(keys, values, strict=True):
                side.set(k, v)
                if side.get(k) != v:
                    raise RuntimeError(f"{side.name}: get({k!r}) did not return what was set")

        for rnd in range(s.value_rounds):
            # Every side runs once per round; the order rotates so that no side is
            # always first (or last) after another's burst.
            k = rnd % len(sides)
            order = sides[k:] + sides[:k]
            if rnd % 2:
                order = order[::-1]
            for side in order:
                note(f"values: round {rnd + 1}/{s.value_rounds}: {side.name}")
                side.rounds.append(value_round(side, keys, values, s.value_pairs, s.phase_cap))

        if s.profile:
            result["profile"] = profile_values(sides[0], keys, values, min(s.value_pairs, 2000))
        result["dsml_hwm"] = proc_status_kib(clusters[0].procs["w1"].pid, "VmHWM")
        if redis_started:
            result["redis_hwm"] = proc_status_kib(redis_started[0].pid, "VmHWM")
    finally:
        for close in closers:
            try:
                close()
            except Exception:
                pass
        for cluster in clusters:
            cluster.stop()
        for proc in redis_started:
            stop_process(proc)
    result["sides"] = sides
    return result


def profile_values(side: ValueSide, keys: Sequence[str], values: Sequence[bytes],
                   n: int) -> str:
    import cProfile
    import io
    import pstats

    note(f"values: profiling the dsml client over {n} pairs (not part of the figures)")
    prof = cProfile.Profile()
    prof.runcall(value_round, side, keys, values, n, 60.0)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    return buf.getvalue()


def summarize_values(sides: list[ValueSide]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for side in sides:
        rs = side.rounds
        nreq_set = sum(r["set_n"] for r in rs)
        nreq_get = sum(r["get_n"] for r in rs)
        out[side.name] = {
            "set": median([r["set_n"] / r["set_s"] for r in rs]),
            "get": median([r["get_n"] / r["get_s"] for r in rs]),
            "pairs": median([min(r["set_n"], r["get_n"]) / (r["set_s"] + r["get_s"])
                             for r in rs]),
            "srv_set_us": 1e6 * sum(r["set_srv"] for r in rs) / nreq_set,
            "srv_get_us": 1e6 * sum(r["get_srv"] for r in rs) / nreq_get,
            "srv_us": 1e6 * sum(r["set_srv"] + r["get_srv"] for r in rs) / (nreq_set + nreq_get),
            "cli_us": 1e6 * sum(r["set_cli"] + r["get_cli"] for r in rs) / (nreq_set + nreq_get),
            "rounds": len(rs),
            "pairs_per_round": median([min(r["set_n"], r["get_n"]) for r in rs]),
            "round_pairs": [min(r["set_n"], r["get_n"]) / (r["set_s"] + r["get_s"])
                            for r in rs],  # type: ignore[dict-item]
        }
    return out


def value_ratios(s: Settings) -> list[tuple[str, str, str, float]]:
    """The ratios of the values table: (column, numerator side, denominator side, target)."""
    if s.tls:
        return [("tls/plain", DSML_TLS, DSML, TARGET_TLS_PLAIN_RATIO),
                ("tls/redis-tls", DSML_TLS, REDIS_TLS, TARGET_PAIRS_RATIO),
                ("plain/redis", DSML, REDIS, TARGET_PAIRS_RATIO)]
    return [("dsml/ref", DSML, REDIS, TARGET_PAIRS_RATIO)]


def report_values(s: Settings, res: dict[str, Any]) -> dict[str, Any]:
    summ = summarize_values(res["sides"])
    names = [side.name for side in res["sides"]]
    ratios = value_ratios(s)
    say()
    say(f"VALUES: {VALUE_SIZE}-byte values, {NKEYS} keys, one connection per side, "
        f"{s.value_rounds} rounds x {s.value_pairs:,} set+get pairs per side, alternating")
    say("  (sets, then gets, timed per phase; medians over rounds; CPU = utime+stime from "
        "/proc/<pid>/stat over all rounds)")
    if s.tls:
        say("  +tls: TLS 1.3, both sides verified against a CA (client certificates); "
            "redis-server --port 0 --tls-port, redis-py ssl=True")
    say()

    def get(name: str, key: str) -> float | None:
        return summ[name][key] if name in summ else None

    out: dict[str, Any] = {"summary": summ, "ratios": {}}
    rows = []
    for label, key, digits in (("set/s", "set", 0), ("get/s", "get", 0),
                               ("pairs/s", "pairs", 0),
                               ("server CPU us/set", "srv_set_us", 1),
                               ("server CPU us/get", "srv_get_us", 1),
                               ("server CPU us/request", "srv_us", 1),
                               ("client CPU us/request", "cli_us", 1)):
        row = [label] + [fmt(get(n, key), digits) for n in names]
        for _col, a, b, _target in ratios:
            row.append(fmt(ratio(get(a, key), get(b, key)), 2))
        rows.append(row)
    for col, a, b, target in ratios:
        q = ratio(get(a, "pairs"), get(b, "pairs"))
        ok = None if q is None else q >= target
        out["ratios"][col] = (q, ok, target)
    rows.append(["target (pairs/s)"] + [""] * len(names)
                + [f">= {t:.2f}x: {verdict(out['ratios'][c][1])}" for c, _a, _b, t in ratios])
    say(table(["", *names, *(c for c, *_ in ratios)], rows))
    say()
    for name, sm in summ.items():
        per = ", ".join(fmt(x) for x in sm["round_pairs"])  # type: ignore[attr-defined]
        say(f"  {name:12} pairs/s per round: {per}")
    if "redis_missing" in res:
        say(f"  reference skipped: {res['redis_missing']}")
    hw = res.get("dsml_hwm")
    say(f"  dsml worker RSS at start {fmt((res.get('dsml_rss_start') or 0) / 1024, 1)} MiB, "
        f"peak {fmt(hw / 1024 if hw else None, 1)} MiB; redis-server peak "
        f"{fmt(res['redis_hwm'] / 1024 if res.get('redis_hwm') else None, 1)} MiB")
    if res.get("profile"):
        say()
        say("  cProfile of the dsml client (one extra round, sorted by own time):")
        for line in res["profile"].strip().splitlines():
            say("    " + line)
    first = ratios[0][0]
    out["pairs_ratio"], out["pairs_ok"] = out["ratios"][first][:2]
    return out


# -- files ----------------------------------------------------------------------------


def make_random_file(path: Path, size: int) -> float:
    """Write ``size`` random bytes to ``path`` and fsync; return the seconds it took."""
    rng = random.Random(2)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(MIB, remaining)
            f.write(rng.randbytes(n))
            remaining -= n
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


@dataclass
class Transfer:
    side: str  # DSML, DSML_TLS or RAW
    op: str  # "upload" or "download"
    seconds: float
    nbytes: int
    client_rss_kib: int
    client_cpu: float
    server_cpu: float

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / MB


def unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def bench_files(s: Settings, tmp: Path) -> dict[str, Any]:
    py = sys.executable
    src = tmp / "source.bin"
    note(f"files: writing {s.file_size // MIB} MiB of random bytes to {src}")
    make_s = make_random_file(src, s.file_size)
    clusters: dict[str, LocalCluster] = {}
    # Per dsml side: its worker's address and pid, and the helper's environment.
    servers: dict[str, tuple[str, int, int, dict[str, str]]] = {}
    raw: subprocess.Popen[bytes] | None = None
    raw_port = 0
    transfers: list[Transfer] = []
    result: dict[str, Any] = {"make_s": make_s, "fs": filesystem_of(tmp)}
    key = "bench/file.bin"
    dsml_helper = str(HERE / "dsml_transfer.py")
    raw_helper = str(HERE / "rawnet.py")
    try:
        for name, tls in dsml_variants(s):
            note(f"files: starting a dsml worker ({name})")
            cluster = clusters[name] = LocalCluster(
                tmp / f"files-cluster-{name}", workers=("w1",), tls=tls)
            h, p = cluster.start("w1")
            env = {**os.environ, "DSML_TOKEN": cluster.token}
            env.pop("DSML_BENCH_PKI", None)
            if tls:
                env["DSML_BENCH_PKI"] = str(cluster.pki_dir)
            servers[name] = (h, p, cluster.procs["w1"].pid, env)
        first = dsml_variants(s)[0][0]
        cluster = clusters[first]
        host, port, dpid, env = servers[first]
        result["dsml_rss_start"] = proc_status_kib(dpid, "VmRSS")
        note("files: starting the raw server")
        raw = subprocess.Popen(
            [py, raw_helper, "serve", "--source", str(src), "--dest", str(tmp / "raw-recv.bin")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )
        assert raw.stdout is not None
        line = raw.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError("the raw reference server did not start")
        raw_port = int(line)

        def one(side: str, op: str) -> Transfer:
            note(f"files: {side} {op}")
            target = tmp / f"download-{side}.bin"
            if side in servers:
                shost, sport, spid, senv = servers[side]
                args = ([str(src), key] if op == "upload" else [key, str(target)])
                cmd = [py, dsml_helper, op, shost, str(sport), *args]
            else:
                cmd = [py, raw_helper, op, "127.0.0.1", str(raw_port),
                       str(src) if op == "upload" else str(target)]
                assert raw is not None
                spid, senv = raw.pid, env
            cpu0 = cpu_seconds(spid)
            r = run_json_helper(cmd, TRANSFER_TIMEOUT, senv)
            server_cpu = cpu_seconds(spid) - cpu0
            if r["bytes"] != s.file_size:
                raise RuntimeError(f"{side} {op} moved {r['bytes']} bytes, not {s.file_size}")
            if op == "download":
                if target.stat().st_size != s.file_size:
                    raise RuntimeError(f"{side} download wrote the wrong size")
                unlink(target)
            t = Transfer(side, op, r["seconds"], r["bytes"], r["vmhwm_kib"],
                         r["cpu"], server_cpu)
            transfers.append(t)
            return t

        names = [*servers, RAW]
        for rep in range(s.file_reps):
            k = rep % len(names)
            order = names[k:] + names[:k]  # the sides take turns at going first
            for side in order:
                one(side, "upload")
            for side in order:
                one(side, "download")

        # The real command line, once each way; its time includes starting Python.
        cli_base = [venv_bin("dsml"), "-c", str(cluster.config_path), "--worker", "w1"]
        cli: dict[str, tuple[float, int]] = {}
        for name, args in (
            ("ping", ["ping"]),
            ("upload", ["upload", str(src), "bench/cli.bin"]),
            ("download", ["download", "bench/cli.bin", str(tmp / "download-cli.bin")]),
        ):
            note(f"files: dsml CLI {name}")
            status, wall, rss, _out, err = run_measured(
                cli_base + args, TRANSFER_TIMEOUT, env, cwd=str(tmp)
            )
            if status != 0:
                raise RuntimeError(f"dsml {name} exited {status}: {err.strip()[-1000:]}")
            cli[name] = (wall, rss)
        if (tmp / "download-cli.bin").stat().st_size != s.file_size:
            raise RuntimeError("the CLI download wrote the wrong size")
        unlink(tmp / "download-cli.bin")
        result["cli"] = cli
        result["dsml_hwm"] = proc_status_kib(dpid, "VmHWM")

        if s.profile:
            result["profiles"] = profile_files(
                py, dsml_helper, host, port, src, key, tmp, env
            )
    finally:
        if raw is not None and raw.poll() is None and raw_port:
            try:
                run_measured([py, raw_helper, "quit", "127.0.0.1", str(raw_port)], 30)
                out, _ = raw.communicate(timeout=30)
                last = out.decode().strip().splitlines()[-1:]
                if last and last[0].startswith("{"):
                    import json

                    result["raw_server_rss"] = json.loads(last[0])["vmhwm_kib"]
            except Exception:
                pass
        if raw is not None:
            stop_process(raw)
        for c in clusters.values():
            c.stop()
    result["transfers"] = transfers
    result["sides"] = [*servers, RAW]
    return result


def profile_files(py: str, helper: str, host: str, port: int, src: Path, key: str,
                  tmp: Path, env: dict[str, str]) -> dict[str, str]:
    import io
    import pstats

    out = {}
    for op, args in (("upload", [str(src), key]), ("download", [key, str(tmp / "prof.bin")])):
        note(f"files: profiling a dsml {op} (not part of the figures)")
        stats = tmp / f"{op}.prof"
        r = run_json_helper([py, helper, op, host, str(port), *args, "--profile", str(stats)],
                            TRANSFER_TIMEOUT, env)
        unlink(tmp / "prof.bin")
        buf = io.StringIO()
        buf.write(f"{op}: {r['bytes'] / r['seconds'] / MB:,.0f} MB/s under cProfile\n")
        pstats.Stats(str(stats), stream=buf).sort_stats("tottime").print_stats(10)
        out[op] = buf.getvalue()
    return out


def file_ratios(s: Settings) -> list[tuple[str, str, str, float | None]]:
    """The ratios of the files table: (column, numerator side, denominator side, target)."""
    if s.tls:
        return [("tls/raw", DSML_TLS, RAW, TARGET_TLS_FILE_RATIO),
                ("tls/plain", DSML_TLS, DSML, None),
                ("plain/raw", DSML, RAW, TARGET_FILE_RATIO)]
    return [("dsml/raw", DSML, RAW, TARGET_FILE_RATIO)]


def report_files(s: Settings, res: dict[str, Any]) -> dict[str, Any]:
    ts: list[Transfer] = res["transfers"]
    names: list[str] = res["sides"]
    ratios = file_ratios(s)
    size_mib = s.file_size // MIB

    def pick(side: str, op: str) -> list[Transfer]:
        return [t for t in ts if t.side == side and t.op == op]

    say()
    say(f"FILES: {size_mib} MiB of random bytes, {s.file_reps} repetitions per side, "
        "alternating; MB/s = 10^6 bytes/s, medians")
    say("  dsml: Client.upload / Client.download (hashes both ends, download fsynced), client "
        "in its own process" + ("; dsml+tls over TLS 1.3, certificates both ways" if s.tls
                                else ""))
    say("  raw:  rawnet.py, sendfile -> recv_into(1 MiB) + write + fsync, separate processes")
    say(f"  filesystem: {res['fs']}; writing the source file took {res['make_s']:.1f} s "
        f"({s.file_size / res['make_s'] / MB:,.0f} MB/s incl. fsync)")
    say()
    rows = []
    out: dict[str, Any] = {"mbps": {}, "ratios": {}}
    gib = s.file_size / (1024 * MIB)
    for op in ("upload", "download"):
        mbps = out["mbps"][op] = {n: median([t.mbps for t in pick(n, op)]) for n in names}
        out["ratios"][op] = {}
        row = [f"{op} MB/s"] + [fmt(mbps[n]) for n in names]
        for col, a, b, target in ratios:
            q = ratio(mbps.get(a), mbps.get(b))
            ok = None if q is None or target is None else q >= target
            out["ratios"][op][col] = (q, ok, target)
            row.append(fmt(q, 2))
        rows.append(row)
        rows.append(["  target"] + [""] * len(names)
                    + [f">= {t:.2f}x: {verdict(out['ratios'][op][c][1])}" if t else ""
                       for c, _a, _b, t in ratios])
        rows.append(["  per run"] + [" ".join(fmt(t.mbps) for t in pick(n, op)) for n in names]
                    + [""] * len(ratios))
    for op in ("upload", "download"):
        for who, attr in (("client", "client_cpu"), ("server", "server_cpu")):
            cpu = {n: median([getattr(t, attr) for t in pick(n, op)]) / gib for n in names}
            rows.append([f"{op} {who} CPU s/GiB"] + [fmt(cpu[n], 2) for n in names]
                        + [fmt(ratio(cpu.get(a), cpu.get(b)), 1) for _c, a, b, _t in ratios])
    say(table(["", *names, *(c for c, *_ in ratios)], rows))
    first = ratios[0][0]
    for op in ("upload", "download"):
        q, ok, _t = out["ratios"][op][first]
        out[op] = (out["mbps"][op].get(names[0]), out["mbps"][op].get(RAW), q, ok)

    say()
    hwm = res.get("dsml_hwm")
    up_rss = max((t.client_rss_kib for t in pick(names[0], "upload")), default=0)
    down_rss = max((t.client_rss_kib for t in pick(names[0], "download")), default=0)
    raw_cli = max((t.client_rss_kib for t in ts if t.side == "raw"), default=0)
    cli = res.get("cli", {})
    peaks = [("dsml server (worker VmHWM)", hwm)]
    peaks += [("dsml client, upload (Python)", up_rss), ("dsml client, download (Python)",
                                                          down_rss)]
    if "upload" in cli:
        peaks += [("dsml CLI upload", cli["upload"][1]), ("dsml CLI download", cli["download"][1])]
    rss_rows = []
    rss_ok = True
    for label, kib in peaks:
        ok = None if not kib else kib / 1024 < TARGET_RSS_MIB
        rss_ok = rss_ok and bool(ok)
        rss_rows.append([label, fmt(kib / 1024 if kib else None, 1),
                         f"< {TARGET_RSS_MIB} MiB: {verdict(ok)}"])
    rss_rows.append(["raw server / raw client (reference)",
                     f"{fmt((res.get('raw_server_rss') or 0) / 1024, 1)} / "
                     f"{fmt(raw_cli / 1024, 1)}", ""])
    rss_rows.append(["dsml worker at start (VmRSS)",
                     fmt((res.get("dsml_rss_start") or 0) / 1024, 1), ""])
    say(table(["peak RSS", "MiB", "target"], rss_rows))
    if cli:
        say()
        start = cli["ping"][0]
        rows = [["dsml ping (start-up cost)", f"{start:.2f}", "", ""]]
        cli_mb = {}
        for op in ("upload", "download"):
            wall = cli[op][0]
            cli_mb[op] = s.file_size / wall / MB
            rows.append([f"dsml {op} (CLI)", f"{wall:.2f}", fmt(cli_mb[op]),
                         fmt(ratio(cli_mb[op], out[op][1]), 2)])
        say(table(["CLI, one run, wall time incl. start", "s", "MB/s", "vs raw"], rows))
        out["cli"] = cli_mb
    for op, text in (res.get("profiles") or {}).items():
        say()
        say(f"  cProfile of the dsml client, {op} (an extra run, sorted by own time):")
        for line in text.strip().splitlines():
            say("    " + line)
    out["rss"] = {label: kib for label, kib in peaks}
    out["rss_ok"] = rss_ok
    return out


# -- main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="dsml benchmarks beside redis and a raw copy")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds and a 256 MiB file (about a minute)")
    p.add_argument("--only", choices=["values", "files"], help="run one section")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile the dsml client (extra runs, not in the figures)")
    p.add_argument("--tmpdir", help="parent of the scratch directory (default: $TMPDIR or /tmp)")
    p.add_argument("--rounds", type=int, help="value rounds and file repetitions per side")
    p.add_argument("--pairs", type=int, help="set+get pairs per value round")
    p.add_argument("--file-mib", type=int, help="file size in MiB")
    p.add_argument("--tls", action="store_true",
                   help="add TLS sides: dsml with cluster.tls (TLS 1.3, certificates) beside "
                        "dsml without, redis over TLS beside redis without")
    args = p.parse_args(argv)
    s = settings(args)
    info = machine()
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    say(f"dsml benchmarks ({'quick' if s.quick else 'full'} run"
        f"{', with TLS 1.3 sides' if s.tls else ''})")
    say("  machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    say(f"  load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")

    tmp = Path(tempfile.mkdtemp(prefix="dsml-bench-", dir=s.tmp_parent))
    values_out = files_out = None
    try:
        if args.only in (None, "values"):
            values_out = report_values(s, bench_values(s, tmp))
        if args.only in (None, "files"):
            files_out = report_files(s, bench_files(s, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    load1 = os.getloadavg()

    say()
    say("=" * 30 + " summary " + "=" * 30)
    say(f"command: {s.command}   ({elapsed:.0f} s)")
    say(f"machine: nproc={info['nproc']}, {info['cpu']}, Python {info['python']}, "
        f"redis-server {info['redis-server']}, load {load0[0]:.1f} -> {load1[0]:.1f}")
    if values_out is not None:
        sm = values_out["summary"]
        sides = ", ".join(
            f"{name} {fmt(d.get('pairs'))} pairs/s (set {fmt(d.get('set'))}/s, get "
            f"{fmt(d.get('get'))}/s, server CPU {fmt(d.get('srv_us'), 1)} us/request)"
            for name, d in sm.items())
        say(f"values ({VALUE_SIZE} B, {NKEYS} keys, 1 connection, {s.value_rounds}x"
            f"{s.value_pairs} pairs, medians): {sides}")
        say("  pairs/s ratios: " + "; ".join(
            f"{col} {fmt(q, 2)}x [target >= {t:.2f}x: {verdict(ok)}]"
            for col, (q, ok, t) in values_out["ratios"].items()))
    if files_out is not None:
        for op in ("upload", "download"):
            mbps = ", ".join(f"{n} {fmt(v)} MB/s" for n, v in files_out["mbps"][op].items())
            qs = "; ".join(
                f"{col} {fmt(q, 2)}x" + (f" [target >= {t:.2f}x: {verdict(ok)}]" if t else "")
                for col, (q, ok, t) in files_out["ratios"][op].items())
            say(f"files {op} ({s.file_size // MIB} MiB, {s.file_reps} reps, medians): "
                f"{mbps}; {qs}")
        if "cli" in files_out:
            say(f"  CLI (one run, incl. start-up): upload {fmt(files_out['cli']['upload'])} "
                f"MB/s, download {fmt(files_out['cli']['download'])} MB/s")
        rss = ", ".join(f"{label} {fmt(kib / 1024 if kib else None, 1)}"
                        for label, kib in files_out["rss"].items())
        say(f"  peak RSS MiB: {rss} [target < {TARGET_RSS_MIB} MiB: "
            f"{verdict(files_out['rss_ok'])}]")
    say("=" * 69)
    return 0


if __name__ == "__main__":
    sys.exit(main())
