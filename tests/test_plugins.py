"""Tests for the twistd plugins and dsml.tap: discovery, option parsing, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.application.service import IService, IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from dsml import tap
from dsml.config import ConfigError, load_config
from dsml.tap import MasterOptions, WorkerOptions, makeMasterService, makeWorkerService

GOOD = """\
master:
  host: {host}
  port: 0
  state_dir: var/master
workers:
  w1:
    host: {host}
    port: 0
    data_dir: var/w1
  w2:
    port: 0
    data_dir: var/w2
"""

BAD = GOOD.format(host="127.0.0.1").replace("    data_dir: var/w1\n", "    slotz: 3\n")


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without DSML_CONFIG, whatever the developer's shell has."""
    monkeypatch.delenv("DSML_CONFIG", raising=False)


def write(tmp_path: Path, text: str) -> Path:
    """Write a config file into ``tmp_path`` and return its path."""
    path = tmp_path / "dsml.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def good_config(tmp_path: Path, host: str = "127.0.0.1") -> Path:
    """A valid two-worker config with OS-chosen ports."""
    return write(tmp_path, GOOD.format(host=host))


def config_error(path: Path) -> str:
    """The one-line ConfigError that loading ``path`` gives."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_getplugins_finds_both_roles() -> None:
    """twistd sees dsml-worker and dsml-master after an (editable-compat) install."""
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert {"dsml-worker", "dsml-master"} <= set(makers)
    assert makers["dsml-worker"].options is WorkerOptions
    assert makers["dsml-master"].options is MasterOptions
    assert IServiceMaker.providedBy(makers["dsml-worker"])


def test_plugin_module_imports_nothing_heavy() -> None:
    """Importing the plugin stub loads neither dsml nor the reactor (twistd imports every
    plugin module to list them)."""
    code = (
        "import sys, twisted.plugins.dsml_plugins as p; "
        "print(p.dsmlWorker.tapname, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('dsml', 'yaml')), "
        "'twisted.internet.reactor' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["dsml-worker", "[]", "False"]


def test_missing_config_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config, DSML_CONFIG or ./etc/dsml.yaml the options refuse to parse."""
    monkeypatch.chdir(tmp_path)
    for options in (WorkerOptions(), MasterOptions()):
        with pytest.raises(usage.UsageError, match=r"^--config is required"):
            options.parseOptions([])


def test_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DSML_CONFIG stands in for --config."""
    path = good_config(tmp_path)
    monkeypatch.setenv("DSML_CONFIG", str(path))
    options = MasterOptions()
    options.parseOptions([])
    assert options["config"] == str(path)
    assert options.loaded_config.path == path


@pytest.mark.parametrize(
    ("options_class", "extra_args"), [(WorkerOptions, ["--name", "w1"]), (MasterOptions, [])]
)
def test_bad_config_is_the_one_line_config_error(
    tmp_path: Path, options_class: type[usage.Options], extra_args: list[str]
) -> None:
    """A bad file is a UsageError whose message is exactly the config error line."""
    path = write(tmp_path, BAD)
    with pytest.raises(usage.UsageError) as info:
        options_class().parseOptions(["--config", str(path), *extra_args])
    assert str(info.value) == config_error(path)
    assert str(info.value) == (
        f"{path}: workers.w1.slotz: unknown key "
        "(known: host, port, data_dir, cpus, slots, mem, gpus, input_cache, task_env, task_user,"
        " python, preload)"
    )


def test_worker_options_parse(tmp_path: Path) -> None:
    """A good config and a known name parse; the loaded config is kept on the options."""
    path = good_config(tmp_path)
    options = WorkerOptions()
    options.parseOptions(["-c", str(path), "--name", "w2"])
    assert options["name"] == "w2"
    assert options.loaded_config.worker("w2").name == "w2"


def test_worker_needs_a_name(tmp_path: Path) -> None:
    """--name is required and the error lists the configured workers."""
    path = good_config(tmp_path)
    with pytest.raises(usage.UsageError) as info:
        WorkerOptions().parseOptions(["-c", str(path)])
    assert str(info.value) == f"--name is required (workers in {path}: w1, w2)"


def test_worker_name_must_be_configured(tmp_path: Path) -> None:
    """An unknown --name is a one-line error naming the known workers."""
    path = good_config(tmp_path)
    with pytest.raises(usage.UsageError) as info:
        WorkerOptions().parseOptions(["-c", str(path), "--name", "w9"])
    assert str(info.value) == f"{path}: workers: no worker named 'w9' (known: w1, w2)"


def test_options_refuse_non_loopback_without_token(tmp_path: Path) -> None:
    """Both roles refuse, at option time, to listen on 0.0.0.0 without a token."""
    path = good_config(tmp_path, host="0.0.0.0")
    with pytest.raises(usage.UsageError) as info:
        WorkerOptions().parseOptions(["-c", str(path), "--name", "w1"])
    assert str(info.value) == (
        f"{path}: workers.w1.host: refusing to listen on non-loopback 0.0.0.0 without cluster.token"
    )
    with pytest.raises(usage.UsageError, match=r": master\.host: refusing to listen"):
        MasterOptions().parseOptions(["-c", str(path)])
    # w2 keeps the default loopback host, so it may start.
    WorkerOptions().parseOptions(["-c", str(path), "--name", "w2"])


def test_make_service_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    """makeService checks again, for callers that build options without parsing them."""
    config = load_config(good_config(tmp_path, host="0.0.0.0"))
    worker_options = WorkerOptions()
    worker_options["name"] = "w1"
    worker_options.loaded_config = config
    with pytest.raises(ConfigError, match=r"workers\.w1\.host: refusing"):
        makeWorkerService(worker_options, reactor=MemoryReactorClock())
    master_options = MasterOptions()
    master_options.loaded_config = config
    with pytest.raises(ConfigError, match=r"master\.host: refusing"):
        makeMasterService(master_options, reactor=MemoryReactorClock())


class _MemoryReactorWithThreads(MemoryReactorClock):
    """A MemoryReactorClock that also hands out a (never started) thread pool."""

    def __init__(self) -> None:
        super().__init__()
        self._pool = ThreadPool(minthreads=0, maxthreads=1)

    def getThreadPool(self) -> ThreadPool:
        """The pool a service would run blocking work in; its threads never start here."""
        return self._pool


def test_make_worker_service(tmp_path: Path) -> None:
    """makeWorkerService builds an IService for the named worker."""
    pytest.importorskip("dsml.worker.service")
    options = WorkerOptions()
    options.parseOptions(["-c", str(good_config(tmp_path)), "--name", "w1"])
    built = makeWorkerService(options, reactor=_MemoryReactorWithThreads())
    assert IService.providedBy(built)
    built.stopService()


def test_make_master_service(tmp_path: Path) -> None:
    """makeMasterService builds an IService for the master."""
    pytest.importorskip("dsml.master.service")
    options = MasterOptions()
    options.parseOptions(["-c", str(good_config(tmp_path))])
    built = makeMasterService(options, reactor=_MemoryReactorWithThreads())
    assert IService.providedBy(built)
    built.stopService()


def test_twistd_builds_both_roles_on_the_daemon_reactor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a reactor (as twistd calls them), both roles take the daemon's reactor,
    whose timers run on the monotonic clock (tests/test_clocks.py tests that one)."""
    handed: list[_MemoryReactorWithThreads] = []

    def daemon_reactor() -> _MemoryReactorWithThreads:
        handed.append(_MemoryReactorWithThreads())
        return handed[-1]

    monkeypatch.setattr(tap, "daemon_reactor", daemon_reactor)
    path = str(good_config(tmp_path))
    worker = WorkerOptions()
    worker.parseOptions(["-c", path, "--name", "w1"])
    master = MasterOptions()
    master.parseOptions(["-c", path])
    for built in (makeWorkerService(worker), makeMasterService(master)):
        built.stopService()
    assert len(handed) == 2


def test_twistd_prints_one_line_error_for_bad_config(tmp_path: Path) -> None:
    """A real ``twistd -n dsml-worker`` with a bad file exits 1 with the one-line error
    and no traceback.  (twistd prints usage errors on stdout, after the role's usage.)"""
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    twistd = shutil.which("twistd", path=search)
    assert twistd is not None, "twistd not found next to the test interpreter or on PATH"
    path = write(tmp_path, BAD)
    env = {**os.environ, "PATH": search}
    env.pop("DSML_CONFIG", None)
    result = subprocess.run(
        [twistd, "-n", "dsml-worker", "-c", str(path), "--name", "w1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if str(path) in line]
    assert len(error_lines) == 1
    assert error_lines[0].endswith(f": {config_error(path)}")
