"""The README's first hour, run as written, so that it cannot rot; and the demo's manners.

The README's command blocks (between "## A first hour" and the next section) run in a
scratch directory holding a copy of the checkout's ``etc/dsml.yaml`` whose ports are 0
(the OS chooses; the CLI reads the address files), so the test never collides with
anything on the machine.  Every other character of every command is the README's: the
``twistd`` lines start the three roles from that one directory, in the background; then
each ``sh`` block runs in bash and each ``python`` block in the venv's Python, and every
command must succeed.  A ``yaml`` block after ``<!-- readme-test: file NAME -->`` is the
file NAME that the commands use.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml.localcluster import venv_bin
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: file (\S+) -->\n)?```(\w+)\n(.*?)```", re.S)


def tour_blocks(section: str = "## A first hour") -> list[tuple[str, str, str | None]]:
    """(language, text, file name) of each fenced block of a README section (the first
    hour by default), up to the next section."""
    text = README.read_text()
    start = text.index(section)
    end = text.index("\n## ", start + 1)
    return [(lang, body, name) for name, lang, body in BLOCK.findall(text[start:end])]


def _env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSML_")}
    env["PATH"] = f"{Path(venv_bin('dsml')).parent}:{env['PATH']}"
    return env


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=15)


@pytest.fixture()
def scratch(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    config = (ROOT / "etc" / "dsml.yaml").read_text()
    (tmp_path / "etc" / "dsml.yaml").write_text(re.sub(r"(?m)^(\s+port:) \d+", r"\1 0", config))
    return tmp_path


def test_the_readme_first_hour_runs_verbatim(scratch: Path) -> None:
    blocks = tour_blocks()
    langs = [lang for lang, _, _ in blocks]
    assert langs.count("sh") >= 3 and "python" in langs, langs
    for _lang, body, name in blocks:
        if name:
            (scratch / name).write_text(body)
    env = _env(scratch)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for lang, body, name in blocks:
            if name:
                continue
            if lang == "sh" and body.lstrip().startswith("twistd "):
                procs += _start_roles(body, scratch, env)
                continue
            cmd = ["bash", "-e", "-u", "-c", body] if lang == "sh" else \
                [sys.executable, "-c", body]
            r = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, f"README block failed:\n{body}\n{r.stdout}\n{r.stderr}"
            assert "Traceback" not in r.stderr, r.stderr
        # What the tour did is really there.
        assert (scratch / "copy.bin").read_bytes() == (scratch / "data.bin").read_bytes()
        assert (scratch / "backup" / "data.bin").read_bytes() == (scratch / "data.bin").read_bytes()
        assert sorted(p.name for p in (scratch / "counts").iterdir()) == ["0.txt", "1.txt",
                                                                            "2.txt", "3.txt"]
        assert (scratch / "counts" / "2.txt").read_text().strip() == "6"
        r = subprocess.run(["dsml", "cat", "sweep/lr0.1.txt"], cwd=scratch, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.stdout == "lr=0.1, 6 words\n", r
        assert all(p.poll() is None for p in procs)  # nothing the tour did stopped a role
    finally:
        _stop(procs)
    assert not (scratch / "twistd.pid").exists()
    assert {p.returncode for p in procs} <= {0, -signal.SIGTERM}


def _start_roles(body: str, scratch: Path, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """Start each ``twistd`` line of the README in the background, in ``scratch``, and
    wait until every worker it names has registered."""
    procs = []
    workers = []
    for line in body.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "twistd", line
        if "--name" in argv:
            workers.append(argv[argv.index("--name") + 1])
        log = open(scratch / f"{len(procs)}.log", "wb")  # noqa: SIM115 - closed with the dir
        procs.append(subprocess.Popen(argv, cwd=scratch, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def registered() -> bool | None:
        for p in procs:
            assert p.poll() is None, (scratch / f"{procs.index(p)}.log").read_text()
        r = subprocess.run(["dsml", "nodes", "--json"], cwd=scratch, env=env,
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return None
        alive = {w["name"] for w in json.loads(r.stdout)["workers"] if w["state"] == "alive"}
        return True if alive == set(workers) else None

    try:
        poll(registered, f"workers {workers} to register", timeout=60)
    except BaseException:
        _stop(procs)
        raise
    assert workers == ["w1", "w2"], workers
    return procs


def test_the_readme_certificate_commands_run_verbatim(scratch: Path) -> None:
    """The section on certificates: its commands, as written, in a scratch checkout."""
    blocks = [body for lang, body, _ in tour_blocks("## Certificates and TLS") if lang == "sh"]
    assert blocks
    for body in blocks:
        r = subprocess.run(["bash", "-e", "-u", "-c", body], cwd=scratch, env=_env(scratch),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"README block failed:\n{body}\n{r.stdout}\n{r.stderr}"
    assert (scratch / "var" / "pki" / "users" / "alice.crt").exists()
    assert (scratch / "var" / "pki" / "workers" / "w3.crt").exists()


# -- the demo -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture()
def demo() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "dsml.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def _started_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """Read the demo's output until it has said the pids of the three roles it started."""
    assert proc.stdout is not None
    pids = []
    while len(pids) < 3:
        line = proc.stdout.readline().decode()
        assert line, "the demo ended before starting its cluster"
        if m := re.match(r"\s+(?:master|w1|w2)\s+pid (\d+)", line):
            pids.append(int(m[1]))
    return pids


def test_demo_into_a_closed_pipe_stops_what_it_started(demo: subprocess.Popen[bytes]) -> None:
    """`make demo | head`: once the reader goes, the demo stops every process it started
    and exits 141, without a traceback."""
    pids = _started_pids(demo)
    assert demo.stdout is not None
    demo.stdout.close()
    assert demo.wait(timeout=120) == 141
    assert demo.stderr is not None
    assert b"Traceback" not in demo.stderr.read()
    assert [pid for pid in pids if _alive(pid)] == []


def test_demo_interrupted_stops_what_it_started(demo: subprocess.Popen[bytes]) -> None:
    """Ctrl-C during the demo (SIGINT to the demo; the terminal also sends it to the
    roles, which shut down by themselves): every process it started is gone."""
    pids = _started_pids(demo)
    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=120) == 130
    assert [pid for pid in pids if _alive(pid)] == []
