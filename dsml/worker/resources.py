"""What a worker offers tasks: its memory and its GPUs, read from the machine at start.

CPUs are the config's (``cpus``, default the CPUs this process may run on:
:func:`dsml.config.default_cpus`).  Memory (:func:`detect_memory`) is the machine's
(``MemTotal``), or less when this process's own cgroup is limited to less (a container,
a systemd slice): tasks can never have more than that.  GPUs (:func:`detect_gpus`) are
those ``nvidia-smi`` lists, named by UUID (a UUID stays the GPU's whatever the order of
enumeration; ``CUDA_VISIBLE_DEVICES`` takes it as it takes an index), with their
memory; without ``nvidia-smi``, ``/proc/driver/nvidia/gpus`` gives the UUIDs.  The
config overrides either (``mem``, ``gpus``: a list of ids, so a machine without GPUs
can be tested as if it had some).

Plain functions of files and a command's output, with the paths as parameters: the tests
give them fakes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import attrs

__all__ = ["Gpu", "detect_gpus", "detect_memory", "parse_nvidia_smi"]

#: Seconds ``nvidia-smi`` may take before the worker gives up on it (and has no GPUs).
NVIDIA_SMI_TIMEOUT = 20.0
#: A cgroup limit at or above this is "no limit" (v1 writes 2**63 rounded to a page).
_NO_LIMIT = 1 << 60


@attrs.frozen
class Gpu:
    """One GPU: its id (what CUDA_VISIBLE_DEVICES names), model and memory (bytes, 0 if
    unknown)."""

    id: str
    name: str = ""
    mem: int = 0

    def describe(self) -> str:
        mem = f", {self.mem >> 20} MiB" if self.mem else ""
        return f"{self.id} ({self.name or 'GPU'}{mem})"


def _meminfo_total(proc: Path) -> int:
    for line in (proc / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemTotal in meminfo")


def _cgroup_limit(proc: Path, cgroup_root: Path) -> int | None:
    """This process's own cgroup memory limit (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``), or None when there is none it can read."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    found: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":
            candidates = [cgroup_root / rel / "memory.max",
                          cgroup_root / "unified" / rel / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [cgroup_root / "memory" / rel / "memory.limit_in_bytes"]
        else:
            continue
        for file in candidates:
            try:
                text = file.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < _NO_LIMIT:
                found.append(int(text))
    return min(found) if found else None


def detect_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes of memory tasks may have here: the machine's, or this process's cgroup
    limit when lower; 0 if neither can be read."""
    try:
        total = _meminfo_total(proc)
    except (OSError, ValueError):
        total = 0
    limit = _cgroup_limit(proc, cgroup_root)
    if limit is not None and (not total or limit < total):
        return limit
    return total


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=uuid,name,memory.total --format=csv,noheader,nounits``
    output (memory in MiB) as GPUs; lines that do not parse are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].startswith(("GPU-", "MIG-")):
            continue
        mem = int(parts[-1]) << 20 if parts[-1].isdigit() else 0
        gpus.append(Gpu(parts[0], ",".join(parts[1:-1]), mem))
    return gpus


def _proc_gpus(proc: Path) -> list[Gpu]:
    """GPUs from the NVIDIA driver's ``/proc/driver/nvidia/gpus/*/information``."""
    gpus = []
    try:
        dirs = sorted((proc / "driver" / "nvidia" / "gpus").iterdir())
    except OSError:
        return []
    for d in dirs:
        try:
            info = dict(
                line.split(":", 1) for line in (d / "information").read_text().splitlines()
                if ":" in line
            )
        except OSError:
            continue
        uuid = info.get("GPU UUID", "").strip()
        if uuid:
            gpus.append(Gpu(uuid, info.get("Model", "").strip()))
    return gpus


def detect_gpus(proc: Path = Path("/proc"), nvidia_smi: str | None = None) -> tuple[list[Gpu], str]:
    """The GPUs here and how they were found (or why there are none)."""
    smi = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=uuid,name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=False,
            )
        except (OSError, subprocess.SubprocessError) as e:
            return _proc_gpus(proc), f"nvidia-smi failed ({e}); /proc/driver/nvidia read"
        gpus = parse_nvidia_smi(out.stdout)
        if gpus or out.returncode == 0:
            return gpus, "listed by nvidia-smi"
    gpus = _proc_gpus(proc)
    if gpus:
        return gpus, "read from /proc/driver/nvidia/gpus"
    return [], "no nvidia-smi and no /proc/driver/nvidia/gpus"
