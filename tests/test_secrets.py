"""Secrets and files at rest: owner-only modes whatever the umask, the token's rules, and
no secret in a log line, an error message or a command line.

* **Modes.**  Every directory a node makes for its state and data is 0700 and every file
  it writes there 0600, under a umask of 022 too: the pieces in-process (the store, the
  SQLite opener, task logs and attempt directories, the tightening of an older install),
  then a real master and worker started with umask 022, walked after an upload, a value
  and a job.
* **Token rules** (``dsml.config``): at least 16 characters; ``token_file`` at most
  4 KiB, a regular file, and refused when group or others may open it.
* **No secret shown**: a real cluster with a recognisable token and a job whose
  environment holds a recognisable secret; a wrong token, a bad submission; then every
  log file and every output of the ``dsml`` command is searched for both, and while the
  task runs every process's command line.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from dsml.config import ConfigError, load_config
from dsml.fsutil import current_umask, private_dir
from dsml.localcluster import LocalCluster
from dsml.sqlitedb import Schema, open_database
from dsml.testing.poll import poll
from dsml.worker.store import Store
from dsml.worker.tasks.logs import CappedLog
from dsml.worker.tasks.workdirs import AttemptDirs

MINIMAL = "master:\n  state_dir: state\nworkers:\n  w1:\n    port: 7401\n    data_dir: data/w1\n"


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which a plain mkdir is 0755 and a plain file 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def offenders(*roots: Path) -> list[str]:
    """Every directory under ``roots`` (themselves included) that is not 0700 and every
    regular file that is not 0600 (or 0400: a store object lent read-only to a task, and
    its link in the attempt's directory; 0440 where the task runs as another user, whose
    group alone may read it), with its mode."""
    bad = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode) and mode != 0o700:
                bad.append(f"{path} (dir {mode:04o})")
            elif stat.S_ISREG(st.st_mode) and mode not in (0o600, 0o400, 0o440):
                bad.append(f"{path} (file {mode:04o})")
    return bad


# -- modes, in-process ----------------------------------------------------------------


def test_a_store_is_private_whatever_the_umask(tmp_path: Path, umask_022: None) -> None:
    """The store's root, objects/, its 256 fan-out directories and tmp/ are 0700; its
    index (and WAL), values log, objects and temporary files 0600."""
    root = tmp_path / "deep" / "store"
    store = Store(root)
    try:
        store.put_value("v", b"a value")
        w = store.begin_file("f")
        w.write(b"a file")
        assert offenders(root / "tmp") == []  # the temporary file, before its rename
        w.prepare()
        w.commit()
        store.flush()
        assert offenders(tmp_path / "deep") == []
        assert (root / "index.sqlite3-wal").exists()  # the WAL was checked too
    finally:
        store.close()


def test_sqlite_files_are_created_private(tmp_path: Path, umask_022: None) -> None:
    """SQLite would create the database with the umask and its WAL with the database's
    mode; both are 0600, and a missing directory is made 0700."""
    schema = Schema(1, ("CREATE TABLE IF NOT EXISTS meta (name PRIMARY KEY, value)",))
    path = tmp_path / "a" / "b" / "x.sqlite3"
    db, _ = open_database(path, what="test", schema=schema, synchronous="NORMAL",
                          error=RuntimeError)
    try:
        db.execute("BEGIN")
        db.execute("INSERT INTO meta VALUES ('k', 'v')")
        db.execute("COMMIT")
        assert Path(f"{path}-wal").exists()
        assert offenders(tmp_path / "a") == []
    finally:
        db.close()


def test_an_older_databases_modes_are_tightened(tmp_path: Path, umask_022: None) -> None:
    """A database (and WAL) an older version left 0644 is made 0600 when opened."""
    schema = Schema(1, ("CREATE TABLE IF NOT EXISTS meta (name PRIMARY KEY, value)",))
    path = tmp_path / "x.sqlite3"
    db, _ = open_database(path, what="test", schema=schema, synchronous="NORMAL",
                          error=RuntimeError)
    db.close()
    path.chmod(0o644)
    Path(f"{path}-wal").write_bytes(b"")
    Path(f"{path}-wal").chmod(0o644)
    db, _ = open_database(path, what="test", schema=schema, synchronous="NORMAL",
                          error=RuntimeError)
    db.close()
    assert offenders(tmp_path) == []


def test_task_logs_and_attempt_directories_are_private(tmp_path: Path, umask_022: None) -> None:
    """Attempt directories (and the run/ directory above them) are 0700; a task's log is
    0600, also once trimmed (rewritten through a temporary file)."""
    dirs = AttemptDirs(tmp_path / "tasks", keep_finished=10)
    attempt = dirs.make(1)
    log = CappedLog(attempt / "dsml-stdout.log", cap=10)
    log.write(b"x" * 15)
    log.write(b"y" * 15)  # past twice the cap: trimmed
    assert log.dropped
    log.close()
    assert offenders(tmp_path / "tasks") == []


def test_an_older_installs_open_directory_is_tightened_in_one_line(tmp_path: Path) -> None:
    """An existing state directory that others may enter is made owner-only with all it
    holds, and one line says so; existing parents are left alone."""
    tmp_path.chmod(0o755)
    state = tmp_path / "state"
    (state / "sub").mkdir(parents=True)
    for d in (state, state / "sub"):
        d.chmod(0o755)
    (state / "old.sqlite3").write_bytes(b"")
    (state / "old.sqlite3").chmod(0o644)
    (state / "sub" / "script").write_bytes(b"")
    (state / "sub" / "script").chmod(0o755)
    (state / "link").symlink_to("/etc/passwd")
    with capturedLogs() as events:
        private_dir(state)
        private_dir(state)  # now private: nothing more to say
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (state, state / "sub",
             state / "old.sqlite3", state / "sub" / "script")}
    assert modes == {"state": 0o700, "sub": 0o700, "old.sqlite3": 0o600, "script": 0o700}
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # not ours to change
    assert stat.S_IMODE(Path("/etc/passwd").stat().st_mode) & 0o004  # links not followed
    lines = [e for e in events if "open to other users" in e.get("log_format", "")]
    assert len(lines) == 1
    assert lines[0]["dirs"] == 2 and lines[0]["files"] == 2


def test_the_umask_is_read_without_changing_it(umask_022: None) -> None:
    assert current_umask() == 0o022
    os.umask(0o027)
    assert current_umask() == 0o027


def test_twistd_gets_a_private_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd's own --umask (applied before it writes the pid file) keeps others out,
    and a stricter one given on the command line stays."""
    from twisted.scripts._twistd_unix import ServerOptions

    config = tmp_path / "dsml.yaml"
    config.write_text(MINIMAL)
    monkeypatch.chdir(tmp_path)
    for argv, want in [([], 0o077), (["--umask", "022"], 0o077), (["--umask", "0277"], 0o277)]:
        options = ServerOptions()
        options.parseOptions(["-n", *argv, "dsml-master", "-c", str(config)])
        assert options["umask"] == want, argv


# -- token rules ------------------------------------------------------------------------


def write_config(tmp_path: Path, cluster: str) -> Path:
    path = tmp_path / "dsml.yaml"
    path.write_text(f"cluster:\n{cluster}" + MINIMAL)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_short_token_is_refused_without_showing_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, "  token: 'Sh0rt-s3cret-15'\n")  # 15 characters
    message = config_error(path)
    assert message.startswith(f"{path}: cluster.token: the token is shorter than 16 characters")
    said = message.removeprefix(f"{path}:")  # the path may hold any digits (pytest-158)
    assert "Sh0rt" not in said and "15" not in said


@pytest.mark.parametrize("token", ["x" * 16, "dev-token-change-me", secrets.token_hex(16)])
def test_tokens_of_16_characters_or_more_are_accepted(tmp_path: Path, token: str) -> None:
    assert load_config(write_config(tmp_path, f"  token: '{token}'\n")).cluster.token == token


def token_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    f = tmp_path / "token"
    f.write_bytes(content)
    f.chmod(mode)
    return write_config(tmp_path, "  token_file: token\n")


def test_a_token_file_of_up_to_4_kib_is_read(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    path = token_file(tmp_path, (token + "\n").ljust(4096).encode())
    assert load_config(path).cluster.token == token


def test_a_token_file_over_4_kib_is_refused(tmp_path: Path) -> None:
    path = token_file(tmp_path, b"x" * 4097)
    assert config_error(path) == (
        f"{path}: cluster.token_file: {(tmp_path / 'token').resolve()} is larger than 4096"
        " bytes: not a token file"
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602])
def test_a_token_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    token = "s3cret-" + secrets.token_hex(8)
    path = token_file(tmp_path, token.encode(), mode)
    message = config_error(path)
    where = (tmp_path / "token").resolve()
    assert message == (
        f"{path}: cluster.token_file: {where} is open to group or others (mode {mode:04o});"
        f" a token is a secret: chmod 600 {where}"
    )
    assert token not in message


def test_a_token_file_must_be_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "token", 0o600)  # would block a plain open()
    path = write_config(tmp_path, "  token_file: token\n")
    assert config_error(path).endswith(f"{(tmp_path / 'token').resolve()} is not a regular file")


def test_a_short_token_in_a_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = token_file(tmp_path, b"tiny\n")
    message = config_error(path)
    assert f"the token in {(tmp_path / 'token').resolve()} is shorter than 16" in message
    assert "tiny" not in message


# -- a real cluster -----------------------------------------------------------------------


@pytest.mark.processes
def test_a_real_cluster_keeps_its_files_private_and_its_secrets_quiet(tmp_path: Path) -> None:
    """With umask 022 for every process: an older install's open state directory, then a
    master and a worker, an upload, a value, a job with a secret in its environment, a
    wrong token and a bad submission.  Every directory of the state and data is then
    0700 and every file 0600; no log, no output of dsml and no command line shows the
    token or the secret."""
    token = "TOKEN" + secrets.token_hex(16)
    secret = "ENVSECRET" + secrets.token_hex(8)
    wrong = "WRONGTOKEN" + secrets.token_hex(8)
    old = os.umask(0o022)  # inherited by every process started below
    try:
        cluster = LocalCluster(tmp_path, workers=("w1",), token=token)
        # An older install: its state directory and a file in it open to everyone.
        (tmp_path / "master").mkdir(mode=0o755)
        (tmp_path / "master" / "notes.txt").write_text("old\n")
        (tmp_path / "master" / "notes.txt").chmod(0o644)
        outputs: list[bytes] = []

        def dsml(*args: str, check: bool = True) -> bytes:
            result = cluster.cli(*args, check=check)
            outputs.extend([result.stdout, result.stderr])
            return result.stdout

        with cluster:
            cluster.start("master")
            cluster.start("w1")
            poll(lambda: True if [w["state"] for w in json.loads(dsml("nodes", "--json"))[
                "workers"]] == ["alive"] else None, "w1 to register", timeout=30)
            data = tmp_path / "data.bin"
            data.write_bytes(os.urandom(5000))
            dsml("upload", str(data), "corpus/data.bin")
            dsml("set", "experiments/lr", "0.001")
            dsml("submit", "--env", f"SECRET={secret}", "--input", "corpus/data.bin:in/sub/d.bin",
                 "--output", "out.txt:results/out.txt", "--", "sh", "-c",
                 'wc -c < in/sub/d.bin > out.txt; echo to stdout; echo to stderr >&2;'
                 ' touch started; sleep 3; test -n "$SECRET"')
            started = poll(lambda: next((tmp_path / "w1").rglob("started"), None),
                           "the task to start", timeout=30)
            command_lines = []
            for proc in Path("/proc").iterdir():
                try:
                    command_lines.append((proc / "cmdline").read_bytes())
                except OSError:
                    continue
            assert started.exists(), "the task ended before every command line was read"
            dsml("wait", "j1")
            assert dsml("cat", "results/out.txt").strip() == b"5000"
            # A download is the user's file: their umask (022) decides, not dsml.
            dsml("download", "corpus/data.bin", str(tmp_path / "copy.bin"))
            assert stat.S_IMODE((tmp_path / "copy.bin").stat().st_mode) == 0o644
            # A wrong token, and a job the master refuses, and one the CLI refuses.
            refused = cluster.cli("--token", wrong, "ls", check=False)
            outputs.extend([refused.stdout, refused.stderr])
            assert refused.returncode != 0 and b"auth" in refused.stderr
            refused = cluster.cli("submit", "--env", f"1BAD={secret}", "--", "true", check=False)
            outputs.extend([refused.stdout, refused.stderr])
            assert refused.returncode != 0 and b"1BAD" in refused.stderr
            refused = cluster.cli("submit", "--env", secret, "--", "true", check=False)
            outputs.extend([refused.stdout, refused.stderr])
            assert refused.returncode != 0 and b"--env" in refused.stderr
            pid_files = [tmp_path / "master.pid", tmp_path / "w1.pid"]
            assert offenders(*pid_files) == []
    finally:
        os.umask(old)

    # Modes: every directory and file of the master's state and the worker's data.
    assert offenders(tmp_path / "master", tmp_path / "w1") == []
    assert "was open to other users" in cluster.tail("master", lines=1000)
    assert list((tmp_path / "w1").rglob("dsml-stdout.log"))  # the task's logs were walked
    assert list((tmp_path / "w1").rglob("d.bin"))  # and its input, one directory down

    # Secrets: logs of every process and of the task, every output, every command line.
    logs = [p for p in tmp_path.rglob("*.log*") if p.is_file()]
    assert {"master.log", "w1.log", "dsml-stdout.log", "dsml-stderr.log"} <= {
        p.name for p in logs
    }
    for name, text in [*((str(p), p.read_bytes()) for p in logs),
                       *((f"output {i}", o) for i, o in enumerate(outputs)),
                       *((f"cmdline {i}", c) for i, c in enumerate(command_lines))]:
        for what, value in [("token", token), ("env secret", secret), ("wrong token", wrong)]:
            assert value.encode() not in text, f"the {what} is in {name}"


# -- error messages -----------------------------------------------------------------------


def test_a_too_long_header_is_named_not_quoted() -> None:
    """The encoder's error names the header, never its value (a Token may be a secret)."""
    from dsml.protocol.codec import encode_request

    with pytest.raises(ValueError) as info:
        encode_request("auth", 1, {"Token": "S3CRET" * 400})
    assert "'Token'" in str(info.value) and "S3CRET" not in str(info.value)


def test_a_bad_environment_name_is_shown_up_to_its_equals_sign() -> None:
    """An environment "name" holding "=" is cut there: what follows may be a secret."""
    from dsml.master.jobs.model import JobError, JobSpec, TaskSpec, check_job_spec

    spec = JobSpec("j", (TaskSpec(("true",), env=(("1A=S3CRET", "v"),)),))
    with pytest.raises(JobError) as info:
        check_job_spec(spec)
    assert "'1A'" in str(info.value) and "S3CRET" not in str(info.value)
