"""Issue #13 through real processes: a hostile task cannot harm another job.

One cluster (a twistd master and ONE worker ``w1``, so attacker and victim share the
worker, its task directory and its slots) for the whole module; each case runs an
attacker job, then a victim job that upper-cases its own uploaded input into ``result``
and stores it: the victim's stored output must be exactly what it computed.

- A leftover process: the attacker starts a ``setsid`` child and a forked + ``setpgid``
  child that overwrite every ``result`` and ``in.txt`` they can reach, and ends
  (success, timeout, cancel).  The victim runs at once; afterwards no attacker process
  is in the process table.
- Symlinks: the attacker replaces its working directory by a symlink and plants
  symlinks at the next directory names; the victims run in fresh real directories.
- Links as outputs: a hard link to the worker's own index database, a symlink to it;
  both refused (cause ``output``), nothing stored.

- The task user: a root worker runs its tasks as ``nobody`` (``task_user``), so a task
  can neither move itself out of its attempt cgroup into the worker's own (the cgroup
  files are root's) nor rewrite the worker's store, which a later job's input is staged
  from (the data dir is root's, 0700; an input lent by a link is root's, read-only).
  Where the tests do not run as root, the worker runs tasks as itself: those cases skip.

Attackers write their pids into :func:`shared`, a directory every user may write (the
task user cannot reach the test's own temporary directories).

Every attacker process carries a marker in its command line (and writes its pid to a
file): the tests poll the process table for it, and kill what is left by pid.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import signal
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsml.client import ClusterClient
from dsml.errors import DsmlError
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll
from dsml.testing.proctable import marked
from dsml.worker.store import INDEX_NAME
from dsml.worker.tasks.cgroups import detect, remove_tree, tree_path

pytestmark = pytest.mark.processes

#: In the command line of every attacker process this module starts (with a case's name).
TOKEN = f"dsmlattack{secrets.token_hex(6)}"
WAIT = 120  # seconds: a job's end, on a slow machine
#: Whether the worker (this process's user) runs its tasks as another user, ``nobody``.
AS_NOBODY = os.geteuid() == 0
NOT_ROOT = "the tests do not run as root: the worker runs its tasks as its own user"


class Cluster:
    """The module's cluster: its processes, a client, and whether tasks run in cgroups."""

    def __init__(self, local: LocalCluster, client: ClusterClient, cgroups: bool) -> None:
        self.local = local
        self.client = client
        self.cgroups = cgroups
        self.tasks = local.root / "w1" / "tasks"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("attacks")
    probe, _ = detect(root / "probe")
    if probe is not None:
        remove_tree(root / "probe")  # v2 and v1 memory roots both
    c = LocalCluster(root / "cluster", workers=("w1",))
    client = None
    try:
        c.start("master")
        c.start("w1")
        how = poll(lambda: _tasks_line(c), "the worker's tasks line", timeout=60)
        assert ("one cgroup per attempt" in how) == (probe is not None), how
        host, port = c.address("master")
        client = ClusterClient(host, port, c.token)
        yield Cluster(c, client, probe is not None)
    finally:
        if client is not None:
            client.close()
        c.stop()
        kill_marked(TOKEN)
    root_cg, _ = tree_path(c.root / "w1" / "tasks")
    assert root_cg is None or not root_cg.exists()  # the worker's cgroups went with it


def _tasks_line(c: LocalCluster) -> str | None:
    for line in c.log_path("w1").read_text().splitlines():
        if "tasks of worker w1:" in line:
            return line
    return None


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory any user may write (sticky, like /tmp): attackers' pid files."""
    path = Path(tempfile.mkdtemp(prefix="dsml-attack-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared(shared_dir: Path, request: pytest.FixtureRequest) -> Path:
    """This test's own directory in :func:`shared_dir`, writable by the task user."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)
    path = shared_dir / name
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    return path


# -- the process table ---------------------------------------------------------------------


def kill_marked(mark: str, pid_file: Path | None = None) -> None:
    """SIGKILL, by pid, what is left of an attacker (its marked processes, the pids it
    wrote down: only those that still carry the mark, a pid may have been reused)."""
    pids = set(marked(mark))
    if pid_file is not None and pid_file.exists():
        pids |= {int(p) for p in pid_file.read_text().split()} & set(marked(mark))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the victim ----------------------------------------------------------------------------


def run_victim(
    cl: Cluster, tmp: Path, name: str, linger: float = 0.0
) -> tuple[dict[str, Any], str]:
    """Upload a random lower-case input, run a job that upper-cases it into ``result``
    (then lingers, ``linger`` s, so that a process left behind has time to strike) and
    check the stored output is exactly that; returns the job's status and its ``pwd -P``."""
    data = "".join(secrets.choice(string.ascii_lowercase) for _ in range(64)) + "\n"
    src = tmp / f"{name}.in"
    src.write_text(data)
    cl.client.upload(src, f"{name}/in")
    job = cl.client.submit(
        ["sh", "-c", f"pwd -P; tr a-z A-Z < in.txt > result; sleep {linger}"],
        inputs=[(f"{name}/in", "in.txt")], outputs=[("result", f"{name}/out")],
        max_attempts=1,
    )
    status = cl.client.wait(job.id, timeout=WAIT)
    assert status["state"] == "succeeded", status
    (attempt,) = status["tasks"][0]["attempts"]
    assert attempt["state"] == "succeeded", attempt
    got = tmp / f"{name}.out"
    cl.client.download(f"{name}/out", got)
    assert got.read_bytes() == data.upper().encode()
    return status, job.logs().decode().strip()


# == 1. a process left behind ==============================================================

#: Overwrites every result and input it can reach, from its directory or the one it is
#: moved to (a kept attempt's), until killed.  $0: its pid file.
STRIKE_SH = (
    'echo $$ >> "$0"; : > ready.sh; '
    "while :; do for f in result ../*/result ../run/*/result ../../*/result "
    "in.txt ../*/in.txt ../run/*/in.txt; do "
    '[ -f "$f" ] && { chmod u+w "$f"; echo ATTACK > "$f"; } 2>/dev/null; done; '
    "sleep 0.05; done"
)
#: The same from a child that forks and leaves the group.  argv: pid file, mark.
STRIKE_PY = """\
import glob, os, sys, time
if os.fork() == 0:
    os.setpgid(0, 0)
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()}\\n")
    open("ready.py", "w").close()
    while True:
        for p in ("result", "in.txt"):
            for f in glob.glob(p) + glob.glob("../*/" + p) + glob.glob("../run/*/" + p):
                try:
                    os.chmod(f, 0o600)
                    with open(f, "w") as out:
                        out.write("ATTACK\\n")
                except OSError:
                    pass
        time.sleep(0.05)
"""


def leftover_attack(pid_file: Path, mark: str) -> str:
    """Start both strikers, wait until both run, then go on (the caller's tail)."""
    return (
        f"setsid sh -c {shlex.quote(f': {mark}; {STRIKE_SH}')} {shlex.quote(str(pid_file))} & "
        f"python3 -c {shlex.quote(STRIKE_PY)} {shlex.quote(str(pid_file))} {mark} & "
        "i=0; while [ ! -e ready.sh ] || [ ! -e ready.py ]; do "
        "i=$((i + 1)); [ $i -lt 3000 ] || exit 7; sleep 0.01; done"
    )


def _lines(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


@pytest.mark.parametrize("how", ["success", "timeout", "cancel"])
def test_a_process_left_behind_dies_and_harms_no_later_job(
    cluster: Cluster, tmp_path: Path, shared: Path, how: str
) -> None:
    """setsid and fork + setpgid children of a task that exits 0, times out or is
    cancelled: the victim that runs at once after it stores its own bytes, and no
    process of the attacker is left."""
    if not cluster.cgroups:
        pytest.skip("the worker runs tasks without cgroups here: a setsid child escapes")
    mark = f"{TOKEN}.{how}"
    pids = shared / "pids"
    script = leftover_attack(pids, mark)
    try:
        if how == "success":
            job = cluster.client.submit(["sh", "-c", script], max_attempts=1)
        elif how == "timeout":
            job = cluster.client.submit(["sh", "-c", script + "; sleep 1000"],
                                        timeout=3, max_attempts=1)
        else:
            job = cluster.client.submit(["sh", "-c", script + "; sleep 1000"], max_attempts=1)
            poll(lambda: True if _lines(pids) == 2 else None, "both strikers run", timeout=60)
            cluster.client.cancel(job.id)
        status = cluster.client.wait(job.id, timeout=WAIT)
        expected = {"success": "succeeded", "timeout": "failed", "cancel": "cancelled"}[how]
        assert status["state"] == expected, status
        if how == "timeout":
            assert status["tasks"][0]["attempts"][0]["cause"] == "timeout", status
        assert _lines(pids) == 2  # both strikers had started: the attack was real

        run_victim(cluster, tmp_path, f"victim-{how}", linger=0.5)

        poll(lambda: True if not marked(mark) else None, "no attacker process left",
             timeout=20)
    finally:
        kill_marked(mark, pids)


# == 2. symlinks ============================================================================


def test_symlinks_planted_by_a_task_cost_only_its_own_attempt(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The attacker replaces its directory by a symlink and plants symlinks at the next
    names (the next working directories under run/, the next kept attempts' names):
    two victims after it run in fresh real directories under run/, and succeed with
    their own output; nothing appears at the symlinks' target."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    t = shlex.quote(str(target))
    plant = (
        'd=$(basename "$PWD"); cd .. || exit 9; '
        "for k in 1 2 3 4 5 6 7 8; do "
        f"ln -s {t} $((d + k)); ln -s {t} ../$((DSML_ATTEMPT_ID + k)); done; "
        f'rm -rf "$d" && ln -s {t} "$d"'
    )
    attacker = cluster.client.submit(["sh", "-c", plant], max_attempts=1)
    status = cluster.client.wait(attacker.id, timeout=WAIT)
    assert status["tasks"][0]["state"] in ("succeeded", "failed"), status
    run = (cluster.tasks / "run").resolve()
    # The plants are in place; as the task user it may not even reach run/ by ".."
    # (0700, root's): it failed at once.
    assert any(p.is_symlink() for p in run.iterdir()) != AS_NOBODY

    for n in (1, 2):
        _, cwd = run_victim(cluster, tmp_path, f"symlink-victim{n}")
        assert Path(cwd).parent == run, cwd  # a real directory of its own, under run/
        assert not Path(cwd).is_relative_to(target.resolve())

    assert list(target.iterdir()) == []  # nobody ran (or wrote) there
    (attempt,) = status["tasks"][0]["attempts"]
    if AS_NOBODY:
        assert attempt["reason"] == "exit 9", attempt  # cd ..: permission denied
    else:
        assert not (cluster.tasks / str(attempt["id"])).exists()  # nothing kept of it


# == 3. links as outputs ====================================================================


@pytest.mark.parametrize("how", ["ln", "ln -s"])
def test_a_link_to_a_worker_file_is_not_uploaded(
    cluster: Cluster, tmp_path: Path, how: str
) -> None:
    """The attacker declares as its output a hard link (``ln``) or a symlink (``ln -s``)
    to the worker's own index database: the attempt fails with cause ``output``,
    nothing is stored under the key, and a victim after it stores its own output."""
    db = cluster.local.root / "w1" / "store" / INDEX_NAME
    assert db.is_file()
    kind = "hard" if how == "ln" else "sym"
    key = f"stolen-{kind}/db"
    job = cluster.client.submit(
        ["sh", "-c", f"{how} {shlex.quote(str(db))} out.db && echo linked"],
        outputs=[("out.db", key)], max_attempts=1,
    )
    status = cluster.client.wait(job.id, timeout=WAIT)
    assert status["state"] == "failed", status
    (attempt,) = status["tasks"][0]["attempts"]
    if how == "ln" and AS_NOBODY:
        # The task user cannot even reach the database (the data dir is root's, 0700).
        assert attempt["reason"] == "exit 1", attempt
        assert job.logs() == b""
    else:
        assert attempt["cause"] == "output", attempt
        why = "a link to another file" if how == "ln" else "missing"
        assert attempt["reason"].startswith(f"output 'out.db' {why}"), attempt
        assert job.logs() == b"linked\n"  # the link was made: the worker refused it

    with pytest.raises(DsmlError) as caught:
        cluster.client.stat(key)
    assert caught.value.code == "not-found"
    assert list(cluster.client.list(f"stolen-{kind}/")) == []

    run_victim(cluster, tmp_path, f"link-victim-{kind}")


# == known holes: a task runs as the worker's user ==========================================


def test_a_process_that_leaves_its_cgroup_harms_no_later_job(
    cluster: Cluster, tmp_path: Path, shared: Path
) -> None:
    """Like the leftover cases, but the setsid child first tries to move itself into
    the worker's own cgroups, v2 and v1 memory (found from /proc, as any task can): as
    the task user it may not write their ``cgroup.procs`` (issue #13)."""
    if not cluster.cgroups:
        pytest.skip("the worker runs tasks without cgroups here")
    if not AS_NOBODY:
        pytest.skip(NOT_ROOT + ", which may write its own cgroup's cgroup.procs")
    mark = f"{TOKEN}.leave"
    pids = shared / "pids"
    leave = (
        "cg=$(sed -n 's/^0:://p' /proc/self/cgroup); "
        "m=$(awk '{for (i = 7; i < NF; i++) if ($i == \"-\") { "
        "if ($(i + 1) == \"cgroup2\") print $5; break }}' /proc/self/mountinfo | head -n 1); "
        'echo $$ > "$m$(dirname "$(dirname "$cg")")/cgroup.procs"; '
        # And out of a v1 memory cgroup, where the worker also puts its attempts.
        "mc=$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup); "
        'if [ -n "$mc" ] && [ -d /sys/fs/cgroup/memory ]; then '
        'echo $$ > "/sys/fs/cgroup/memory$(dirname "$(dirname "$mc")")/cgroup.procs"; fi; '
    )
    script = (
        f"setsid sh -c {shlex.quote(f': {mark}; {leave}{STRIKE_SH}')} "
        f"{shlex.quote(str(pids))} & "
        "i=0; while [ ! -e ready.sh ]; do i=$((i + 1)); [ $i -lt 3000 ] || exit 7; "
        "sleep 0.01; done"
    )
    try:
        job = cluster.client.submit(["sh", "-c", script], max_attempts=1)
        assert cluster.client.wait(job.id, timeout=WAIT)["state"] == "succeeded"
        run_victim(cluster, tmp_path, "victim-leave", linger=0.5)
        poll(lambda: True if not marked(mark) else None, "no attacker process left",
             timeout=10)
    finally:
        kill_marked(mark, pids)


def test_a_task_that_rewrites_the_store_harms_no_later_job(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The victim's input is stored first; the attacker tries to rewrite the object that
    holds it in the worker's store (found by its content: an attacker could rewrite them
    all), and is refused: as the task user it cannot enter the data dir (issue #13)."""
    if not AS_NOBODY:
        pytest.skip(NOT_ROOT + ", which owns the store")
    data = "storeinput" + secrets.token_hex(8)
    src = tmp_path / "in"
    src.write_text(data + "\n")
    cluster.client.upload(src, "victim-store/in")
    forged = ("ATTACK" * 10)[: len(data) + 1]  # the object's size
    forge = (
        'ls "$DSML_WORKER_DIR/../store/objects" >/dev/null 2>&1 || echo denied; '
        f'for f in $(grep -rl {data} "$DSML_WORKER_DIR/../store/objects"); do '
        f'chmod u+w "$f"; printf %s {forged} > "$f.new"; touch -r "$f" "$f.new"; '
        'cat "$f.new" > "$f"; touch -r "$f.new" "$f"; rm "$f.new"; echo forged; done'
    )
    job = cluster.client.submit(["sh", "-c", forge], max_attempts=1)
    assert cluster.client.wait(job.id, timeout=WAIT)["state"] == "succeeded"
    assert job.logs() == b"denied\n"  # and nothing forged
    victim = cluster.client.submit(
        ["sh", "-c", "tr a-z A-Z < in.txt > result"],
        inputs=[("victim-store/in", "in.txt")], outputs=[("result", "victim-store/out")],
        max_attempts=1,
    )
    assert cluster.client.wait(victim.id, timeout=WAIT)["state"] == "succeeded"
    cluster.client.download("victim-store/out", tmp_path / "out")
    assert (tmp_path / "out").read_text() == data.upper() + "\n"


# == the task user ==========================================================================


def test_a_task_runs_as_the_task_user(cluster: Cluster, tmp_path: Path) -> None:
    """On a root worker a task runs as ``nobody`` (no task_user configured), with its
    HOME, USER and LOGNAME: it writes its outputs (uploaded), reads its input (lent by a
    link from the store) but cannot write it or chmod it, cannot list or enter the
    worker's store, and cannot write the cgroup.procs of the worker's cgroups."""
    if not AS_NOBODY:
        pytest.skip(NOT_ROOT)
    nobody = pwd.getpwnam("nobody")
    assert f"they run as nobody (uid {nobody.pw_uid})" in str(_tasks_line(cluster.local))
    data = "input" + secrets.token_hex(8) + "\n"
    (tmp_path / "in").write_text(data)
    cluster.client.upload(tmp_path / "in", "user/in")
    probe = (
        'id -u > uid; id -G > groups; echo "$USER $LOGNAME $HOME" > who; pwd -P > cwd; '
        "python3 -c 'import os; print(os.getcwd())' >> cwd; cat in.txt > copy; "
        '{ echo x >> in.txt; } 2>/dev/null && echo input-written; '
        "chmod u+w in.txt 2>/dev/null && echo input-chmod; "
        'ls "$DSML_WORKER_DIR/../store" >/dev/null 2>&1 && echo store-listed; '
        '(cd "$DSML_WORKER_DIR/../store") 2>/dev/null && echo store-entered; '
        "cg=$(sed -n 's/^0:://p' /proc/self/cgroup); "
        "m=$(awk '{for (i = 7; i < NF; i++) if ($i == \"-\") { "
        "if ($(i + 1) == \"cgroup2\") print $5; break }}' /proc/self/mountinfo | head -n 1); "
        'for d in "$(dirname "$cg")" "$(dirname "$(dirname "$cg")")"; do '
        '{ echo $$ > "$m$d/cgroup.procs"; } 2>/dev/null && echo cgroup-left; done; '
        "echo end"
    )
    outs = ["uid", "groups", "who", "cwd", "copy"]
    job = cluster.client.submit(
        ["sh", "-c", probe], inputs=[("user/in", "in.txt")],
        outputs=[(name, f"user/{name}") for name in outs], max_attempts=1,
    )
    status = cluster.client.wait(job.id, timeout=WAIT)
    assert status["state"] == "succeeded", status
    assert job.logs() == b"end\n"  # none of the forbidden things happened
    got = {}
    for name in outs:
        cluster.client.download(f"user/{name}", tmp_path / name)
        got[name] = (tmp_path / name).read_text()
    assert got["uid"] == f"{nobody.pw_uid}\n"
    assert got["groups"] == f"{nobody.pw_gid}\n"  # its primary group, no other
    assert got["who"] == f"nobody nobody {nobody.pw_dir}\n"
    cwd, py_cwd = got["cwd"].split()
    assert cwd == py_cwd and Path(cwd).parent == (cluster.tasks / "run").resolve()
    assert got["copy"] == data
