"""Issue #13's resources in pieces: what a worker detects (memory, GPUs), what its config
says, how its ledger hands out GPUs, how the master's queue fits tasks by CPUs, memory
and GPUs, and how a job's spec keeps them (stored form, array templates).

The real-process side is in ``test_task_resources_processes.py``.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from dsml.config import ConfigError, load_config, parse_size
from dsml.master.jobs import Room, TaskSpec
from dsml.master.jobs.model import expand_task, format_bytes, spec_from_json, spec_json
from dsml.worker.resources import Gpu, detect_gpus, detect_memory, parse_nvidia_smi
from dsml.worker.tasks.ledger import AttemptLedger
from dsml.worker.tasks.spec import AttemptSpec, TaskError

# -- detection ----------------------------------------------------------------------------


def test_memory_is_the_machines_or_the_cgroups_if_lower(tmp_path: Path) -> None:
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       16384000 kB\nMemFree: 1 kB\n")
    (proc / "self" / "cgroup").write_text("4:memory:/job/7\n0::/user.slice\n")
    assert detect_memory(proc, cg) == 16384000 * 1024  # no limit files: the machine's
    (cg / "memory" / "job" / "7").mkdir(parents=True)
    (cg / "memory" / "job" / "7" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert detect_memory(proc, cg) == 16384000 * 1024  # v1's "no limit"
    (cg / "memory" / "job" / "7" / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
    assert detect_memory(proc, cg) == 4 << 30
    (cg / "user.slice").mkdir()
    (cg / "user.slice" / "memory.max").write_text(f"{2 << 30}\n")
    assert detect_memory(proc, cg) == 2 << 30  # the lowest limit wins
    (cg / "user.slice" / "memory.max").write_text("max\n")
    assert detect_memory(proc, cg) == 4 << 30


NVIDIA_SMI = """GPU-5f3c0a1e-aaaa-bbbb-cccc-000000000001, NVIDIA A100-SXM4-40GB, 40960
GPU-5f3c0a1e-aaaa-bbbb-cccc-000000000002, NVIDIA A100-SXM4-40GB, 40960
No devices were found
"""


def test_nvidia_smi_lines_become_gpus_by_uuid() -> None:
    gpus = parse_nvidia_smi(NVIDIA_SMI)
    assert gpus == [
        Gpu("GPU-5f3c0a1e-aaaa-bbbb-cccc-000000000001", "NVIDIA A100-SXM4-40GB", 40960 << 20),
        Gpu("GPU-5f3c0a1e-aaaa-bbbb-cccc-000000000002", "NVIDIA A100-SXM4-40GB", 40960 << 20),
    ]
    assert gpus[0].describe().endswith("(NVIDIA A100-SXM4-40GB, 40960 MiB)")


def test_gpus_come_from_nvidia_smi_else_the_drivers_proc_files(tmp_path: Path) -> None:
    """A real (fake) ``nvidia-smi`` is run with its query; without one, the driver's
    /proc files are read; with neither, none and why."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{NVIDIA_SMI}EOF\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    proc = tmp_path / "proc"
    gpus, how = detect_gpus(proc, str(smi))
    assert [g.id[-1] for g in gpus] == ["1", "2"] and how == "listed by nvidia-smi"
    info = proc / "driver" / "nvidia" / "gpus" / "0000:3b:00.0"
    info.mkdir(parents=True)
    (info / "information").write_text("Model: \t Tesla T4\nGPU UUID: \t GPU-t4\n")
    gpus, how = detect_gpus(proc, "")
    assert gpus == [Gpu("GPU-t4", "Tesla T4")] and "/proc/driver/nvidia" in how
    assert detect_gpus(tmp_path / "empty", "") == (
        [], "no nvidia-smi and no /proc/driver/nvidia/gpus")


# -- config -------------------------------------------------------------------------------

BASE = "master: {port: 0, state_dir: s}\nworkers:\n  w1: {port: 0, data_dir: d"


def _worker(tmp_path: Path, extra: str) -> Any:
    p = tmp_path / "dsml.yaml"
    p.write_text(BASE + extra + "}\n")
    return load_config(p).worker("w1")


def test_config_takes_cpus_mem_and_gpu_ids(tmp_path: Path) -> None:
    w = _worker(tmp_path, ", cpus: 8, mem: 64G, gpus: [0, 1, GPU-x]")
    assert (w.slots, w.mem, w.gpus) == (8, 64 << 30, ("0", "1", "GPU-x"))
    assert _worker(tmp_path, ", slots: 3").slots == 3  # the old name
    assert _worker(tmp_path, ", gpus: []").gpus == ()  # none, not detected
    with pytest.raises(ConfigError, match="give cpus or slots"):
        _worker(tmp_path, ", cpus: 2, slots: 2")
    with pytest.raises(ConfigError, match="workers.w1.mem"):
        _worker(tmp_path, ", mem: 4GB")
    with pytest.raises(ConfigError, match="workers.w1.cpus"):
        _worker(tmp_path, ", cpus: 0")


def test_sizes_take_the_short_binary_units() -> None:
    assert parse_size("4G") == parse_size("4GiB") == 4 << 30
    assert parse_size("512m") == 512 << 20 and parse_size("1T") == 1 << 40
    with pytest.raises(ValueError, match="unknown size unit 'MB'"):
        parse_size("5MB")


# -- the worker's ledger -----------------------------------------------------------------


class _Att:
    def __init__(self, spec: AttemptSpec) -> None:
        self.spec = spec


class Ledger(AttemptLedger):
    def __init__(self, slots: int, mem: int, gpus: tuple[str, ...]) -> None:
        self.slots, self.mem, self.gpus = slots, mem, gpus
        self.work_dir = Path("/nonexistent")
        self._active: dict[int, Any] = {}
        self._results = {}
        self._kept = set()

    def start(self, aid: int, **kw: Any) -> AttemptSpec:
        spec = self.admit(AttemptSpec(aid, "j1", aid, ("true",), **kw))
        self._active[aid] = _Att(spec)
        return spec


def test_the_ledger_gives_each_attempt_its_own_gpus() -> None:
    ledger = Ledger(8, 4 << 30, ("g0", "g1", "g2"))
    a = ledger.start(1, gpus=2)
    b = ledger.start(2, gpus=1)
    assert set(a.gpu_ids) | set(b.gpu_ids) == {"g0", "g1", "g2"}
    assert len(a.gpu_ids) == 2 and not set(a.gpu_ids) & set(b.gpu_ids)
    with pytest.raises(TaskError) as e:
        ledger.start(3, gpus=1)
    assert e.value.code == "busy" and "0 free" in str(e.value)
    del ledger._active[1]
    assert set(ledger.start(4, gpus=2).gpu_ids) == set(a.gpu_ids)  # freed, given again
    with pytest.raises(TaskError) as e:
        ledger.start(5, gpus=4)
    assert e.value.code == "bad-task"  # more than it has: never


def test_the_ledger_reserves_memory() -> None:
    ledger = Ledger(8, 1000, ())
    ledger.start(1, mem=600)
    with pytest.raises(TaskError) as e:
        ledger.start(2, mem=500)
    assert e.value.code == "busy" and "400 free" in str(e.value)
    ledger.start(3, mem=400)
    ledger.start(4)  # asks for none: fits whatever is left
    with pytest.raises(TaskError) as e:
        ledger.start(5, mem=2000)
    assert e.value.code == "bad-task"


# -- the master's queue -------------------------------------------------------------------


def test_the_queue_gives_a_worker_only_what_fits_its_free_room(tmp_path: Path) -> None:
    """Free room of 4 CPUs, 10 GiB, 1 GPU: the 2-GPU task is passed over, the 1-GPU one
    taken, then what still fits of CPUs and memory, in queue order; a worker that
    declares no memory gets only tasks that ask none."""
    from test_jobs import Harness, job, task

    h = Harness(tmp_path / "jobs.sqlite3")
    j = h.submit(job(task(gpus=2), task(gpus=1), task(mem=8 << 30), task(mem=4 << 30),
                     task(slots=2), task(), task()))
    given = h.jm.next_assignments("w1", 1, Room(4, 10 << 30, 1))
    # The GPU one, the 8 GiB one (4 GiB no longer fits), the 2-CPU one: 4 CPUs, full.
    assert [a.task_index for a in given] == [1, 2, 4]
    assert all(a.job_id == j for a in given)
    assert h.jm.used_on("w1") == Room(4, 8 << 30, 1)
    given = h.jm.next_assignments("w2", 1, Room(2, 0, 0))  # no memory declared: no mem task
    assert [a.task_index for a in given] == [5, 6]
    h.jm.close()


def test_room_fits_all_three_and_describes_itself() -> None:
    worker = Room(8, 16 << 30, 2)
    assert worker.holds(Room(8, 16 << 30, 2)) and not worker.holds(Room(1, 0, 3))
    assert not worker.holds(Room(1, 17 << 30, 0)) and worker.holds(Room(1))
    assert worker - Room(2, 1 << 30, 1) == Room(6, 15 << 30, 1)
    assert Room(2, 4 << 30, 1).describe() == "2 CPUs, 4.0 GiB, 1 GPU"
    assert Room(1).describe() == "1 CPU"
    assert format_bytes(512 << 20) == "512 MiB" and format_bytes(100) == "100 B"


def test_a_spec_keeps_its_resources_stored_and_in_an_array() -> None:
    t = TaskSpec(("train",), outputs=(("m.pt", "models/{index}"),), slots=4, mem=8 << 30,
                 gpus=2, retry_on=("exit",))
    assert spec_from_json(spec_json(t)) == t
    one = expand_task(t, 3)
    assert (one.slots, one.mem, one.gpus, one.retry_on) == (4, 8 << 30, 2, ("exit",))
    assert one.outputs == (("m.pt", "models/3"),) and one.room == Room(4, 8 << 30, 2)
