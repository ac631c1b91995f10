"""The mutation check: plant the classic bugs one at a time; the tests must catch each.

    .venv/bin/python -m dsml.testing.mutations              # every mutation, the catch set
    .venv/bin/python -m dsml.testing.mutations --only no-fsync --full

Each :class:`Mutation` replaces one exact piece of the source with a bug (a stale
attempt's result or output accepted, an upload acknowledged before its fsync or its
directory's, a version reused, a lost worker's attempts not requeued, repair skipped,
a submit acknowledged before its commit, the wall clock in the failure detector, ...).
For each, the project (``dsml/``, ``tests/``, ``twisted/``) is copied to a temporary
directory, the bug planted there, and pytest run on the copy (``PYTHONPATH`` puts the
copy first, so the subprocesses the tests start, twistd included, run the mutant too):
by default the *catch set* (:data:`CATCH_SET`: the simulation, the nemesis's known seeds
and a short budget of new ones, the job and store tests; a few minutes each), with
``--full`` the whole suite.  A mutation whose text is no longer in the source is
reported as ``stale`` (the code moved: update its anchor), never silently skipped.
First the same tests run against the unmutated copy (``--no-baseline`` skips it): a test
that fails there would "catch" every mutant, so the check stops.

The table printed at the end: each mutation, caught or MISSED, and by which test first.
The exit status is 1 if any was missed or stale.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[2]

#: What runs against each mutant by default (``--full``: the whole suite).
CATCH_SET = (
    "tests/test_faults_sim.py",
    "tests/test_faults_net.py",
    "tests/test_durability_order.py",
    "tests/test_jobs_sim.py",
    "tests/test_jobs.py",
    "tests/test_store.py",
    "tests/test_directory.py",
    "tests/test_cluster_sim.py",
    "tests/test_nemesis.py",
    "tests/test_inline_results.py",
)


@attrs.frozen
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    #: More (old, new) edits of the same file, planted together (one bug, several
    #: places: a fix reverted whole).
    also: tuple[tuple[str, str], ...] = ()


MUTATIONS = (
    Mutation(
        "stale-result", "a task_result accepted without checking the worker and incarnation "
        "that run the attempt", "dsml/master/jobs/manager.py",
        "if a is None or a.worker != worker or a.incarnation != incarnation:",
        "if a is None:",
    ),
    Mutation(
        "stale-output", "a fenced attempt's output placed (no attempt check at the master)",
        "dsml/master/jobrouter.py",
        "why = self.jobs.output_refusal(attempt_id, key, worker)",
        'why = ""',
    ),
    Mutation(
        "no-fsync", "an object file renamed into place without fsync",
        "dsml/worker/store.py",
        "            os.fsync(f.fileno())\n            f.close()\n            os.rename(",
        "            f.close()\n            os.rename(",
    ),
    Mutation(
        "no-dir-fsync", "an object's directory entry not fsynced before its commit",
        "dsml/worker/store.py",
        "self._obj_path)\n            _fsync_dir(self._obj_dir)",
        "self._obj_path)",
    ),
    Mutation(
        "fewer-copies-file", "a file write acknowledged as whole although a later hop of "
        "its pipeline failed", "dsml/worker/storage.py",
        "        if local_ok and down_ok:\n            local.headers[\"Replicas\"] = 1 + int("
        "down.headers.get(\"replicas\", \"1\"))",
        "        if local_ok:\n            local.headers[\"Replicas\"] = 1 + int(getattr("
        "down, \"headers\", {}).get(\"replicas\", \"1\"))",
    ),
    Mutation(
        "fewer-copies-value", "a value write acknowledged although a replica in its "
        "pipeline failed", "dsml/worker/storage.py",
        "return d.addCallbacks(done, _downstream_failed, errbackArgs=(first,))",
        "return d.addCallbacks(done, lambda f, a: local, errbackArgs=(first,))",
    ),
    Mutation(
        "version-reused", "the master issues the same version twice",
        "dsml/master/state.py",
        "        self._version = version\n        return version",
        "        return version",
    ),
    Mutation(
        "lost-not-requeued", "a lost worker's attempts are not requeued",
        "dsml/master/jobs/manager.py",
        "        for aid in lost:\n            self._end_attempt(self._running[aid], "
        "AttemptState.LOST, REASON_WORKER_DIED)",
        "        for aid in []:\n            self._end_attempt(self._running[aid], "
        "AttemptState.LOST, REASON_WORKER_DIED)",
    ),
    Mutation(
        "repair-skipped", "repair never copies an under-replicated key",
        "dsml/master/repair.py",
        "target: WorkerRecord) -> None:\n",
        "target: WorkerRecord) -> None:\n        return\n",
    ),
    Mutation(
        "submit-before-commit", "a submit acknowledged before the job is committed",
        "dsml/master/jobs/manager.py",
        "journal.acks.append((d, job.id))",
        "d.callback(job.id)",
    ),
    Mutation(
        "wall-clock-detector", "the production wiring hands the wall clock to the failure "
        "detector", "dsml/master/service.py",
        "        monotonic=monotonic,\n        now=time.time,",
        "        monotonic=time.time,\n        now=time.time,",
    ),
    Mutation(
        "wall-clock-membership", "the failure detector measures heartbeats by the wall "
        "clock the master stamps its records with instead of the monotonic one it is given",
        "dsml/master/service.py",
        "        clock=clock,\n        monotonic=monotonic,\n        versions=versions,",
        "        clock=clock,\n        monotonic=now,\n        versions=versions,",
    ),
    Mutation(
        "wall-clock-reactor", "the daemons' timers run on the wall clock (their reactor as "
        "Twisted makes it): a step of it runs every timer it passes, or holds them all",
        "dsml/clocks.py",
        "    return monotonic\n",
        "    return wall\n",
    ),
    Mutation(
        "client-no-resync", "the blocking client keeps a connection whose answer it did not "
        "read whole (a timeout): the late answer is read as the next call's",
        "dsml/client/server.py",
        "            self._drop()  # the reply may still come: never read it as another's",
        "            pass  # (mutant) the connection is kept, the late reply in it",
        also=(("        if self._busy:\n            self._drop()",
               "        if False:\n            self._drop()"),),
    ),
    Mutation(
        "orphans-kept", "attempts of a worker that never registers after a master restart "
        "stay running", "dsml/master/service.py",
        "            self.router.start(self.orphan_grace)",
        "            pass",
    ),
    Mutation(
        "hop-stall", "a pipeline hop that stops answering is waited on (no connect bound, "
        "no stall bound, the client's bytes left paused when it fails)",
        "dsml/worker/storage.py",
        "FORWARD_STALL = 10.0", "FORWARD_STALL = 1e9",
        also=(("FORWARD_CONNECT_TIMEOUT = 5.0", "FORWARD_CONNECT_TIMEOUT = 1e9"),
              ("self._pacer.release(resume=True)", "self._pacer.release(resume=False)")),
    ),
    Mutation(
        "inline-result-kept", "the inline result a worker reports is kept whatever the "
        "attempt's end (failed too), whether its task declared one or not, however big",
        "dsml/master/jobs/manager.py",
        "            a.stderr_tail = clean_tail(stderr_tail)\n        elif result and "
        "a.task.spec.result and len(result) <= MAX_INLINE_RESULT:",
        "            a.stderr_tail = clean_tail(stderr_tail)\n        if result:",
    ),
    Mutation(
        "stale-reconcile", "a worker registering again after a master restart has an "
        "attempt it reports finished committed without checking it was given that attempt",
        "dsml/master/jobs/manager.py",
        "            if a is not None and a.worker == worker and a.incarnation <= incarnation:"
        "\n                self._complete(",
        "            if a is not None:\n                self._complete(",
    ),
    Mutation(
        "commit-without-grant", "a commit records the copies without checking its grant",
        "dsml/master/keyspace.py",
        "        version = self.directory.grants.version_of(key, grant)",
        "        version = self.directory.next_version()",
    ),
    Mutation(
        "trim-stale-at-once", "a worker registering again has its stale copies ordered "
        "dropped at once, while the current version may have one copy (issue #12)",
        "dsml/master/registry.py",
        "            if trim.reason != STALE:",
        "            if trim.reason:",
    ),
    Mutation(
        "fall-back-past-commit", "a lost key falls back behind its committed version",
        "dsml/master/state.py",
        "        floor = self.committed_version(key)",
        "        floor = 0",
    ),
)


def copy_project(dest: Path) -> None:
    for part in ("dsml", "tests", "twisted"):
        shutil.copytree(ROOT / part, dest / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis"))
    for name in ("pyproject.toml", "README.md", "Makefile"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    # The README tests run ``.venv/bin/python`` in the copy: without it they failed
    # against every mutant, and a mutation nothing else caught counted as caught.  A git
    # worktree has no ``.venv`` of its own: the one running this check stands in.
    venv = ROOT / ".venv"
    if not venv.exists() and sys.prefix != sys.base_prefix:
        venv = Path(sys.prefix)
    if venv.exists():
        (dest / ".venv").symlink_to(venv.resolve())


def plant(root: Path, m: Mutation) -> bool:
    path = root / m.path
    text = path.read_text()
    for old, new in ((m.old, m.new), *m.also):
        if text.count(old) != 1:
            return False
        text = text.replace(old, new)
    path.write_text(text)
    return True


def run_one(m: Mutation | None, tests: list[str], timeout: float) -> tuple[str, str, float]:
    """(verdict, first failing test or why, seconds); ``m`` None: the unmutated copy."""
    start = time.monotonic()
    name = m.name if m is not None else "baseline"
    with tempfile.TemporaryDirectory(prefix=f"dsml-mutant-{name}-") as tmp:
        root = Path(tmp)
        copy_project(root)
        if m is not None and not plant(root, m):
            return "stale", f"the text to mutate is not (exactly once) in {m.path}", 0.0
        env = dict(os.environ, PYTHONPATH=str(root), DSML_NEMESIS_BUDGET="20",
                   PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-o", "addopts=", *tests]
        try:
            p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught", f"the tests hung (over {timeout:g} s)", time.monotonic() - start
        took = time.monotonic() - start
        if p.returncode == 0:
            return "MISSED", "every test passed", took
        found = re.search(r"^(FAILED|ERROR) (\S+)", p.stdout, re.M)
        if p.returncode not in (1,) and not found:
            return "error", (p.stdout + p.stderr)[-300:], took
        return "caught", found.group(2) if found else f"pytest exit {p.returncode}", took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsml.testing.mutations",
                                description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", help="a mutation's name (repeatable)")
    p.add_argument("--full", action="store_true", help="the whole suite against each mutant")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutant")
    p.add_argument("--list", action="store_true", help="list the mutations")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the first run, of the tests against the unmutated copy")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<22} {m.what}")
        return 0
    tests = ["tests"] if args.full else list(CATCH_SET)
    if not args.no_baseline:
        # A test failing without any bug planted would "catch" every mutant.
        print(".. baseline: the same tests against the unmutated copy", flush=True)
        verdict, by, took = run_one(None, tests, args.timeout)
        if verdict != "MISSED":
            print(f"   the unmutated copy fails ({took:.0f} s): {by}", flush=True)
            return 1
        print(f"   passes ({took:.0f} s)", flush=True)
    rows = []
    for m in chosen:
        print(f".. {m.name}: {m.what}", flush=True)
        verdict, by, took = run_one(m, tests, args.timeout)
        rows.append((m, verdict, by, took))
        print(f"   {verdict} ({took:.0f} s): {by}", flush=True)
    print()
    print(f"{'mutation':<22} {'verdict':<8} {'s':>5}  caught by")
    for m, verdict, by, took in rows:
        print(f"{m.name:<22} {verdict:<8} {took:5.0f}  {by}")
    bad = [r for r in rows if r[1] != "caught"]
    print(f"{len(rows) - len(bad)} of {len(rows)} caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
