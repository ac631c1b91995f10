"""The ``dsml`` command without a cluster: job files, safe YAML, download paths, help,
twistd's pid files.  Tests through a real cluster are in test_cli_processes.py."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage
from twisted.scripts._twistd_unix import ServerOptions

from dsml import cli, safeyaml
from dsml.cli import storage
from dsml.config import find_config
from dsml.jobfile import MAX_JOB_FILE, JobFileError, load_job_file

# -- safe YAML ------------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: 9 aliases per level, 9 levels: 9**9 strings once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        prev, name = chr(96 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append(f"tasks: [*{chr(97 + levels)}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_job_file_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    start = time.monotonic()
    with pytest.raises(JobFileError, match="expands to more than"):
        load_job_file(path)
    assert time.monotonic() - start < 1.0


def test_billion_laughs_through_the_cli_is_refused_under_a_second(tmp_path: Path) -> None:
    """The real command: refused with one line, exit 2, well within a second of work."""
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "dsml.cli", "--server", "127.0.0.1:9", "submit", "-f", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    took = time.monotonic() - start
    assert r.returncode == 2, r
    assert "expands to more than" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert took < 5.0, took  # an interpreter start; the bomb itself would take minutes


def test_aliases_that_share_are_fine_and_counted_per_use() -> None:
    doc = "env: &e {A: '1'}\ntasks: [{command: x, env: *e}, {command: y, env: *e}]\n"
    assert safeyaml.load(doc)["tasks"][1]["env"] == {"A": "1"}
    with pytest.raises(safeyaml.YAMLLimitError):
        safeyaml.load(doc, max_nodes=10)


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(safeyaml.YAMLLimitError, match="contains it"):
        safeyaml.load("tasks: &a [*a]\n")


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        safeyaml.load("a: 1\na: 2\n")


def test_deep_nesting_is_a_yaml_error_not_a_crash() -> None:
    with pytest.raises(yaml.YAMLError):
        safeyaml.load("[" * 100_000 + "]" * 100_000)


# -- job files ------------------------------------------------------------------------


def job_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_job_file_accepts_the_cli_pair_strings_and_lists(tmp_path: Path) -> None:
    spec = load_job_file(job_file(tmp_path, """\
name: sweep
priority: 3
after: j7
tasks:
  - command: python train.py --lr '0.1 x'
    inputs: ["datasets/train.csv:train.csv", "datasets/val.csv", [models/base, base.pt]]
    outputs: ["model.pt:models/{index}", "log.txt"]
    env: {LR: 0.1, NAME: run}
    slots: 2
    timeout: 60
    max_attempts: 1
  - [echo, 1]
  - true-command
"""))
    assert (spec.name, spec.priority, spec.after) == ("sweep", 3, ("j7",))
    first = spec.tasks[0]
    assert first["command"] == ["python", "train.py", "--lr", "0.1 x"]
    assert first["inputs"] == [["datasets/train.csv", "train.csv"],
                               ["datasets/val.csv", "val.csv"], ["models/base", "base.pt"]]
    assert first["outputs"] == [["model.pt", "models/{index}"], ["log.txt", "log.txt"]]
    assert first["env"] == {"LR": "0.1", "NAME": "run"}
    assert (first["slots"], first["timeout"], first["max_attempts"]) == (2, 60.0, 1)
    assert spec.tasks[1] == {"command": ["echo", "1"]}
    assert spec.tasks[2] == {"command": ["true-command"]}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("tasks:\n  - command: x\n    inputs: [5]\n", "tasks[0].inputs[0]: want KEY:PATH"),
        ("tasks:\n  - x\n  - command: y\n    outputs: [':k']\n", "tasks[1].outputs[0]:"),
        ("tasks:\n  - command: x\n    slots: 0\n", "tasks[0].slots: must be at least 1"),
        ("tasks:\n  - command: x\n    slots: yes\n", "tasks[0].slots: must be a whole number"),
        ("tasks:\n  - command: x\n    timeout: -1\n", "tasks[0].timeout: must be seconds"),
        ("tasks:\n  - command: x\n    cmd: y\n", "tasks[0].cmd: unknown field"),
        ("tasks:\n  - env: {}\n", "tasks[0].command: missing"),
        ("tasks:\n  - command: \"a 'b\"\n", "tasks[0].command: cannot split"),
        ("tasks:\n  - command: [a, [b]]\n", "tasks[0].command: must be a string or a list"),
        ("tasks:\n  - command: x\n    env: {A: [1]}\n", "tasks[0].env.A: must be a string"),
        ("tasks: []\n", "tasks: must be a non-empty list"),
        ("taskz: [x]\n", "taskz: unknown field"),
        ("- x\n", "a job file is a mapping"),
        ("tasks: [x\n", "line 2: not valid YAML"),
    ],
)
def test_job_file_errors_name_the_task_and_field(tmp_path: Path, text: str, where: str) -> None:
    path = job_file(tmp_path, text)
    with pytest.raises(JobFileError) as info:
        load_job_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and where in message, message
    assert "\n" not in message


def test_job_file_over_the_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(MAX_JOB_FILE + 1)  # sparse: no 64 MiB written
    with pytest.raises(JobFileError, match="larger than"):
        load_job_file(path)


# -- download -r paths ----------------------------------------------------------------


def test_relative_paths_under_the_prefix() -> None:
    assert storage._relative_path("datasets/a/b.csv", "datasets/") == ["a", "b.csv"]
    assert storage._relative_path("datasets/a.csv", "datasets") == ["datasets", "a.csv"]
    assert storage._relative_path("datasets/a.csv", "datasets/a") == ["a.csv"]
    assert storage._relative_path("top", "") == ["top"]
    for bad in ("datasets/../x", "datasets/./x", "datasets//x", "datasets/x/", "datasets/.."):
        with pytest.raises(ValueError):
            storage._relative_path(bad, "datasets/")


@given(st.lists(st.sampled_from(["a", "..", ".", "", "b/", "/", "x.y", "..."]), max_size=6))
def test_no_relative_path_leaves_its_directory(parts: list[str]) -> None:
    key = "p/" + "/".join(parts)
    try:
        segments = storage._relative_path(key, "p/")
    except ValueError:
        return
    root = "/r"
    assert os.path.normpath(os.path.join(root, *segments)).startswith(root + "/")


def test_safe_parent_refuses_a_symlink_out(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a").symlink_to(outside)
    with pytest.raises(ValueError, match="not a plain directory"):
        storage._safe_parent(root, ["a", "b", "c.txt"])
    assert list(outside.iterdir()) == []
    assert storage._safe_parent(root, ["x", "y", "z.txt"]) == root / "x" / "y"


# -- help, config discovery, imports ----------------------------------------------------


def _all_actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    out = [("dsml", a) for a in parser._actions]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(name, a) for a in sub._actions]
    return out


def test_every_option_and_argument_has_help() -> None:
    missing = [
        (cmd, a.dest) for cmd, a in _all_actions(cli.build_parser())
        if not a.help and not isinstance(a, argparse._SubParsersAction)
    ]
    assert missing == []


def test_top_level_help_names_storage_and_job_commands() -> None:
    text = cli.build_parser().format_help()
    for command in ("upload", "download", "cat", "submit", "jobs", "status", "logs", "wait",
                    "cancel", "nodes"):
        assert command in text
    assert "DSML_TOKEN" in cli.build_parser().format_help()


def test_token_option_warns_about_ps() -> None:
    token = next(a for _, a in _all_actions(cli.build_parser()) if a.dest == "token")
    assert "ps" in token.help and "DSML_TOKEN" in token.help


def test_config_found_from_flag_then_environment_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DSML_CONFIG", raising=False)
    assert find_config(None) is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "dsml.yaml").write_text("x: 1\n")
    assert find_config(None) == Path("etc/dsml.yaml")
    monkeypatch.setenv("DSML_CONFIG", "/elsewhere.yaml")
    assert find_config(None) == Path("/elsewhere.yaml")
    assert find_config("given.yaml") == Path("given.yaml")


def test_cli_imports_no_twisted() -> None:
    """Every dsml command pays for what the CLI imports: Twisted is not needed there."""
    code = "import sys, dsml.cli; print(sorted(m for m in sys.modules if 'twisted' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# -- twistd's pid and log files -------------------------------------------------------


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "dsml.yaml"
    path.parent.mkdir()
    path.write_text(
        "master: {port: 0, state_dir: ../var/master}\n"
        "workers:\n  w1: {port: 0, data_dir: ../var/w1}\n  w2: {port: 0, data_dir: ../var/w2}\n"
    )
    return path


@pytest.mark.parametrize(
    ("argv", "pidfile"),
    [
        (["-n", "dsml-master", "-c", "CONFIG"], "var/master/master.pid"),
        (["-n", "dsml-worker", "-c", "CONFIG", "--name", "w1"], "var/w1/worker.pid"),
        (["-n", "dsml-worker", "-c", "CONFIG", "--name", "w2"], "var/w2/worker.pid"),
        (["-n", "--pidfile", "mine.pid", "dsml-master", "-c", "CONFIG"], "mine.pid"),
    ],
)
def test_each_role_gets_its_own_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], pidfile: str
) -> None:
    """twistd's default twistd.pid in the working directory would let only one role start
    from a directory; each role's goes beside its own state unless --pidfile is given."""
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    options = ServerOptions()
    options.parseOptions([str(config) if a == "CONFIG" else a for a in argv])
    assert options["pidfile"] == str((tmp_path / pidfile).resolve())
    assert options["logfile"] is None  # -n: the log goes to stdout


def test_a_daemon_logs_beside_its_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    options = ServerOptions()
    options.parseOptions(["dsml-worker", "-c", str(_config(tmp_path)), "--name", "w2"])
    assert Path(options["logfile"]).resolve() == (tmp_path / "var/w2/worker.log").resolve()


def test_bad_worker_name_is_still_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(usage.UsageError, match="no worker named"):
        ServerOptions().parseOptions(["-n", "dsml-worker", "-c", str(_config(tmp_path)),
                                      "--name", "w9"])
    assert not (tmp_path / "twistd.pid").exists()


def test_a_job_file_and_the_flag_carry_retry_on(tmp_path: Path) -> None:
    """``retry_on`` in a job file (a list, or one comma-separated string) and
    ``--retry-on`` reach the submitted JSON; a wrong type is one clear line."""
    import json

    from dsml.jobfile import JobFileError, load_job_file
    from dsml.protocol.replies import job_body

    f = tmp_path / "job.yaml"
    f.write_text("tasks:\n  - command: train\n    retry_on: [exit, lost]\n"
                 "  - command: eval\n    retry_on: exit,timeout\n")
    spec = load_job_file(f)
    assert [t["retry_on"] for t in spec.tasks] == [["exit", "lost"], ["exit", "timeout"]]
    f.write_text("tasks:\n  - command: train\n    retry_on: 3\n")
    with pytest.raises(JobFileError, match=r"tasks\[0\]\.retry_on: must be a list of causes"):
        load_job_file(f)
    body = json.loads(job_body(["train"], retry_on=["exit"], array=3))
    assert body["tasks"][0]["retry_on"] == ["exit"]
    assert "retry_on" not in json.loads(job_body(["train"]))["tasks"][0]
