"""``make demo``: a local dsml cluster, driven by the real ``dsml`` command.

Starts a master and a worker as twistd processes on 127.0.0.1 (OS-chosen ports), uploads
and downloads a file, sets and gets a value, lists what is stored, shows a bad request
being refused, and stops everything it started.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from .localcluster import LocalCluster


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run(cluster: LocalCluster, *args: str, input: bytes | None = None, check: bool = True) -> str:
    print(f"$ dsml {shlex.join(args)}", flush=True)
    result = cluster.cli(*args, input=input, check=check)
    out = (result.stdout + result.stderr).decode(errors="replace").rstrip()
    if out:
        print(out, flush=True)
    return result.stdout.decode(errors="replace")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    """Run the demo; return an exit status."""
    with tempfile.TemporaryDirectory(prefix="dsml-demo-") as tmp:
        root = Path(tmp)
        cluster = LocalCluster(root / "cluster", workers=("w1",))
        try:
            _say("starting a master and a worker (twistd, 127.0.0.1, OS-chosen ports)")
            for name in ("master", "w1"):
                host, port = cluster.start(name)
                print(f"{name} listening on {host}:{port}")

            _say("uploading a 64 MiB file, then downloading it again")
            data = root / "dataset.bin"
            with open(data, "wb") as f:
                for _ in range(64):
                    f.write(os.urandom(1024 * 1024))
            t = time.perf_counter()
            _run(cluster, "upload", str(data), "datasets/dataset.bin")
            up = time.perf_counter() - t
            copy = root / "copy.bin"
            t = time.perf_counter()
            _run(cluster, "download", "datasets/dataset.bin", str(copy))
            down = time.perf_counter() - t
            same = _sha256(data) == _sha256(copy)
            print(f"sha256 equal: {same}; upload {64 / up:.0f} MiB/s, download {64 / down:.0f} "
                  "MiB/s (including process start)")

            _say("setting and getting values")
            _run(cluster, "set", "experiments/lr", "0.001")
            _run(cluster, "set", "experiments/notes", "-", input=b"first run\n")
            print(f"lr = {_run(cluster, 'get', 'experiments/lr').strip()}")

            _say("listing what is stored")
            _run(cluster, "ls", "-l")

            _say("bad requests get one clear line and a non-zero exit")
            _run(cluster, "get", "no/such/key", check=False)
            _run(cluster, "get", "datasets/dataset.bin", check=False)
            return 0 if same else 1
        finally:
            _say("stopping everything")
            cluster.stop()
            print("stopped master and w1")


if __name__ == "__main__":
    sys.exit(main())
