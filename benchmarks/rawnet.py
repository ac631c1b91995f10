"""The raw loopback reference for file transfers: plain sockets, no protocol, no hashing.

    rawnet.py serve --source FILE --dest FILE   print the port, then serve until told to quit
    rawnet.py upload HOST PORT FILE            send FILE (socket.sendfile); server fsyncs
    rawnet.py download HOST PORT FILE          receive the server's source into FILE + fsync
    rawnet.py quit HOST PORT                   stop the server

The wire format is the least that can work: one op byte, then for an upload an 8-byte
length and the bytes, answered by one byte once the server has fsynced; for a download
an 8-byte length and the bytes.  The server receives with a 1 MiB ``recv_into`` buffer
and sends with ``socket.sendfile``.  Each client prints one JSON line with the seconds it
took (connect to the last byte durable) and its own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import sys
import time

BUF = 1024 * 1024
#: The server gives up when no client comes for this long (it never outlives its runner).
ACCEPT_TIMEOUT = 900.0
#: ... and after this many connections.
MAX_CONNECTIONS = 10_000
IO_TIMEOUT = 300.0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed early")
        data += chunk
    return data


def _receive_into_file(sock: socket.socket, path: str, size: int) -> None:
    """Receive ``size`` bytes into ``path`` (created afresh) and fsync it."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    remaining = size
    with open(path, "wb") as f:
        while remaining:
            n = sock.recv_into(view, min(BUF, remaining))
            if not n:
                raise ConnectionError(f"peer closed with {remaining} bytes to go")
            f.write(view[:n])
            remaining -= n
        f.flush()
        os.fsync(f.fileno())


def serve(source: str, dest: str) -> int:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(ACCEPT_TIMEOUT)
    print(listener.getsockname()[1], flush=True)
    for _ in range(MAX_CONNECTIONS):
        try:
            conn, _addr = listener.accept()
        except TimeoutError:
            break
        with conn:
            conn.settimeout(IO_TIMEOUT)
            op = _recv_exact(conn, 1)
            if op == b"Q":
                break
            if op == b"U":
                (size,) = struct.unpack("!Q", _recv_exact(conn, 8))
                try:
                    os.unlink(dest)  # like a store replacing a key's previous version
                except FileNotFoundError:
                    pass
                _receive_into_file(conn, dest, size)
                conn.sendall(b"K")
            elif op == b"D":
                with open(source, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    conn.sendall(struct.pack("!Q", size))
                    conn.sendfile(f)
                conn.recv(1)  # wait for the client to close: it has everything
    listener.close()
    print(json.dumps({"vmhwm_kib": _hwm()}))
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(seconds: float, nbytes: int, cpu0: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "seconds": seconds,
        "bytes": nbytes,
        "vmhwm_kib": _hwm(),
        "cpu": usage.ru_utime + usage.ru_stime - cpu0,
    }))


def upload(host: str, port: int, path: str) -> int:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        cpu0 = _cpu()
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"U" + struct.pack("!Q", size))
            sent = sock.sendfile(f)
            if sent != size:
                raise ConnectionError(f"sent {sent} of {size} bytes")
            if _recv_exact(sock, 1) != b"K":
                raise ConnectionError("bad acknowledgement")
        seconds = time.perf_counter() - t0
    _report(seconds, size, cpu0)
    return 0


def download(host: str, port: int, path: str) -> int:
    cpu0 = _cpu()
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"D")
        (size,) = struct.unpack("!Q", _recv_exact(sock, 8))
        _receive_into_file(sock, path, size)
    seconds = time.perf_counter() - t0
    _report(seconds, size, cpu0)
    return 0


def quit_server(host: str, port: int) -> int:
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"Q")
    return 0


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
    sub = p.add_subparsers(dest="op", required=True)
    sp = sub.add_parser("serve")
    sp.add_argument("--source", required=True)
    sp.add_argument("--dest", required=True)
    for name in ("upload", "download"):
        sp = sub.add_parser(name)
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        sp.add_argument("path")
    sp = sub.add_parser("quit")
    sp.add_argument("host")
    sp.add_argument("port", type=int)
    a = p.parse_args(argv)
    if a.op == "serve":
        return serve(a.source, a.dest)
    if a.op == "upload":
        return upload(a.host, a.port, a.path)
    if a.op == "download":
        return download(a.host, a.port, a.path)
    return quit_server(a.host, a.port)


if __name__ == "__main__":
    sys.exit(main())
