"""``workers.<name>.task_user`` (dsml.config) and who tasks run as (dsml.worker.tasks.taskuser):
the key's values, its resolution at the worker's start, the drop wrapper, the hand-over."""

from __future__ import annotations

import os
import pwd
import subprocess
import textwrap
from pathlib import Path

import pytest
from twisted.python import usage

from dsml.config import ConfigError, load_config
from dsml.tap import WorkerOptions
from dsml.worker.tasks.taskuser import (
    DEFAULT_TASK_USER,
    TaskUser,
    TaskUserError,
    for_worker,
    lent_mode,
    resolve,
)

NOBODY = pwd.getpwnam("nobody")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it changes uids")


def config_with(tmp_path: Path, task_user: str | None) -> Path:
    path = tmp_path / "dsml.yaml"
    line = "" if task_user is None else f"    task_user: {task_user}\n"
    path.write_text(textwrap.dedent("""\
        master:
          port: 0
          state_dir: state
        workers:
          w1:
            port: 0
            data_dir: data/w1
        """) + line)
    return path


# -- the config key ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "stored"), [
    (None, None), ("nobody", "nobody"), ("65534", "65534"), ("0", "0"), ("'1000'", "1000"),
    ("svc.tasks", "svc.tasks"), ("dsml-task", "dsml-task"),
])
def test_task_user_is_a_name_or_a_uid(tmp_path: Path, value: str | None,
                                      stored: str | None) -> None:
    assert load_config(config_with(tmp_path, value)).worker("w1").task_user == stored


@pytest.mark.parametrize("value", ["''", "true", "-1", "[nobody]", "'a b'", "'../x'",
                                   "4294967296", "'x;rm'", "{a: 1}"])
def test_task_user_refuses_other_values(tmp_path: Path, value: str) -> None:
    path = config_with(tmp_path, value)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: workers.w1.task_user: must be a user name or a "
                              "numeric uid")


# -- resolving it at the worker's start ---------------------------------------------------


def test_a_root_worker_runs_tasks_as_nobody_by_default() -> None:
    user = resolve(None, euid=0)
    assert user is not None
    assert (user.name, user.uid, user.gid, user.home) == (
        DEFAULT_TASK_USER, NOBODY.pw_uid, NOBODY.pw_gid, NOBODY.pw_dir)
    assert user.env() == {"HOME": NOBODY.pw_dir, "USER": "nobody", "LOGNAME": "nobody"}


def test_a_name_or_a_uid_resolves_to_the_same_user() -> None:
    assert resolve("nobody", euid=0) == resolve(str(NOBODY.pw_uid), euid=0)


def test_root_is_the_explicit_opt_out() -> None:
    assert resolve("root", euid=0) is None
    assert resolve("0", euid=0) is None


def test_a_worker_that_is_not_root_runs_tasks_as_itself() -> None:
    assert resolve(None, euid=NOBODY.pw_uid) is None
    assert resolve("nobody", euid=NOBODY.pw_uid) is None  # itself: allowed
    with pytest.raises(TaskUserError, match=r"needs the worker to run as root"):
        resolve("root", euid=NOBODY.pw_uid)


@pytest.mark.parametrize("name", ["no-such-user-dsml", "4000000000"])
def test_an_unknown_user_is_refused(name: str) -> None:
    with pytest.raises(TaskUserError, match=r"^no such user: "):
        resolve(name, euid=0)


def test_the_worker_does_not_start_with_an_unknown_user(tmp_path: Path) -> None:
    """At option time (twistd), one line naming the file and the key."""
    path = config_with(tmp_path, "no-such-user-dsml")
    with pytest.raises(ConfigError) as info:
        for_worker(load_config(path), "w1")
    assert str(info.value) == (f"{path}: workers.w1.task_user: no such user: "
                               "'no-such-user-dsml'")
    with pytest.raises(usage.UsageError) as caught:
        WorkerOptions().parseOptions(["-c", str(path), "--name", "w1"])
    assert str(caught.value) == str(info.value)


def test_lent_files_are_read_only_and_only_to_the_task_group() -> None:
    assert lent_mode(None) == (0o400, None)
    assert lent_mode(TaskUser("nobody", 65534, 4242, "/")) == (0o440, 4242)


# -- the drop and the hand-over -------------------------------------------------------------


@ROOT_ONLY
@pytest.mark.parametrize("setpriv", [True, False], ids=["setpriv", "python"])
def test_the_wrapper_drops_to_the_user_in_its_cwd(tmp_path: Path, setpriv: bool) -> None:
    """setpriv, or the Python trampoline where it is missing: uid, gid, no other group,
    and the working directory kept although its parents are closed to the user."""
    user = resolve("nobody", euid=0)
    assert user is not None
    if not setpriv:
        user = TaskUser(user.name, user.uid, user.gid, user.home, None)
    elif user.setpriv is None:
        pytest.skip("no setpriv here")
    closed = tmp_path / "closed"
    work = closed / "work"
    work.mkdir(parents=True)
    closed.chmod(0o700)
    user.hand_over(work, [])
    script = "id -u; id -g; id -G; pwd -P; echo x > out"
    out = subprocess.run(user.wrap(["sh", "-c", script]), cwd=work,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    g = str(NOBODY.pw_gid)
    assert out.split("\n") == [str(NOBODY.pw_uid), g, g, str(work), ""]
    assert (work / "out").stat().st_uid == NOBODY.pw_uid


@ROOT_ONLY
def test_hand_over_gives_the_directory_and_own_copies_not_lent_links(tmp_path: Path) -> None:
    user = TaskUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid, "/")
    root = tmp_path / "attempt"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "own").write_text("copy")
    store = tmp_path / "object"
    store.write_text("lent")
    os.link(store, root / "lent")
    target = tmp_path / "victim"
    target.write_text("")
    (root / "sym").symlink_to(target)
    user.hand_over(root, ["a/b/own", "lent", "sym", "missing/x"])
    owner = {p: os.lstat(root / p).st_uid for p in ["", "a", "a/b", "a/b/own", "lent"]}
    assert owner == {"": NOBODY.pw_uid, "a": NOBODY.pw_uid, "a/b": NOBODY.pw_uid,
                     "a/b/own": NOBODY.pw_uid, "lent": 0}
    assert target.stat().st_uid == 0  # a link is never followed
    assert not (root / "missing").exists()


def test_the_task_path_leaves_out_what_the_user_cannot_search(tmp_path: Path) -> None:
    user = TaskUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid, "/")
    closed = tmp_path / "closed"
    (closed / "bin").mkdir(parents=True)
    closed.chmod(0o700)
    opened = tmp_path / "open"
    opened.mkdir()
    opened.chmod(0o755)
    path = os.pathsep.join([str(closed / "bin"), "/usr/bin", "rel/bin", str(tmp_path / "x")])
    shown = user.env(path)["PATH"].split(os.pathsep)
    assert "/usr/bin" in shown and "rel/bin" in shown
    assert str(closed / "bin") not in shown and str(tmp_path / "x") not in shown
    assert user.can_search(str(opened)) == (os.stat(tmp_path).st_mode & 0o001 != 0
                                            and user.can_search(str(tmp_path)))
