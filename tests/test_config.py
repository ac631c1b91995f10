"""Tests for dsml.config: the example file, every class of error, paths and listen safety."""

from __future__ import annotations

import textwrap
from pathlib import Path

import attrs
import pytest

from dsml.config import (
    ClusterConfig,
    Config,
    ConfigError,
    Limits,
    check_listen_safe,
    is_loopback,
    load_config,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "dsml.yaml"

#: The smallest valid file; error tests change one thing in it.
MINIMAL = """\
master:
  port: 0
  state_dir: state
workers:
  w1:
    port: 0
    data_dir: data/w1
"""


def write(directory: Path, text: str, name: str = "dsml.yaml") -> Path:
    """Write ``text`` (dedented) to ``directory/name`` and return its path."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    """Load ``path``, expect a ConfigError, check it is one line naming the file, return it."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_example_file_loads_with_expected_values() -> None:
    """etc/dsml.yaml describes a token-protected master and two workers on loopback."""
    config = load_config(EXAMPLE)
    assert config.path == EXAMPLE
    assert config.cluster == ClusterConfig(
        token="dev-token-change-me",
        value_max=1024 * 1024,
        replication=2,
        heartbeat_interval=1.0,
        heartbeat_timeout=10.0,
        tls=True,
    )
    assert config.pki_dir == (ROOT / "var" / "pki").resolve()
    assert (config.master.host, config.master.port) == ("127.0.0.1", 7400)
    assert config.master.state_dir == (ROOT / "var" / "master").resolve()
    assert list(config.workers) == ["w1", "w2"]
    for name, port in [("w1", 7401), ("w2", 7402)]:
        worker = config.worker(name)
        assert worker.name == name
        assert (worker.host, worker.port, worker.slots) == ("127.0.0.1", port, 2)
        assert worker.data_dir == (ROOT / "var" / name).resolve()
    assert config.limits == Limits()


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    """Everything but the master's state_dir and each worker's port and data_dir defaults."""
    config = load_config(write(tmp_path, MINIMAL))
    assert config.cluster == ClusterConfig(
        token=None,
        value_max=1024 * 1024,
        replication=2,
        heartbeat_interval=1.0,
        heartbeat_timeout=10.0,
    )
    assert config.master.host == "127.0.0.1"
    assert config.worker("w1").host == "127.0.0.1"
    from dsml.config import default_cpus

    assert config.worker("w1").slots == default_cpus() >= 1  # the CPUs it may run on
    assert config.worker("w1").mem is None and config.worker("w1").gpus is None  # detected
    assert config.limits == Limits(
        max_connections=1024,
        max_unauthenticated=64,
        auth_timeout=10.0,
        head_timeout=10.0,
        idle_timeout=60.0,
        payload_timeout=60.0,
    )


def test_config_is_frozen(tmp_path: Path) -> None:
    """The loaded objects cannot be changed, the workers mapping included."""
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.master.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.workers["w2"] = config.worker("w1")  # type: ignore[index]


def test_token_is_not_in_repr(tmp_path: Path) -> None:
    """A logged config object does not reveal the shared secret."""
    config = load_config(EXAMPLE)
    assert "dev-token-change-me" not in repr(config)


BAD_FILES = [
    pytest.param(
        "masterz: {}\n" + MINIMAL,
        "masterz: unknown key (known: cluster, master, workers, limits, retention)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        MINIMAL + "    slotz: 2\n",
        "workers.w1.slotz: unknown key (known: host, port, data_dir, cpus, slots, mem, gpus,"
        " input_cache, task_env, task_user, python, preload)",
        id="unknown-worker-key",
    ),
    pytest.param(
        MINIMAL.replace("  port: 0\n  state", "  hostname: x\n  port: 0\n  state"),
        "master.hostname: unknown key (known: host, port, state_dir)",
        id="unknown-master-key",
    ),
    pytest.param(MINIMAL + "limits:\n  idle: 5\n", "limits.idle: unknown key", id="unknown-limit"),
    pytest.param(
        MINIMAL.replace("port: 0\n    data", "port: abc\n    data"),
        "workers.w1.port: must be an integer from 0 to 65535, got 'abc'",
        id="port-not-integer",
    ),
    pytest.param(
        MINIMAL.replace("port: 0\n  state", "port: 65536\n  state"),
        "master.port: must be an integer from 0 to 65535, got 65536",
        id="port-out-of-range",
    ),
    pytest.param(
        MINIMAL.replace("port: 0\n  state", "port: -1\n  state"),
        "master.port: must be an integer from 0 to 65535, got -1",
        id="port-negative",
    ),
    pytest.param(
        MINIMAL.replace("port: 0\n  state", "port: true\n  state"),
        "master.port: must be an integer from 0 to 65535, got True",
        id="port-bool",
    ),
    pytest.param(
        MINIMAL.replace("port: 0\n  state", "port:\n  state"),
        "master.port: must be an integer from 0 to 65535, got nothing (null)",
        id="port-null",
    ),
    pytest.param(
        MINIMAL + "    slots: 0\n",
        "workers.w1.slots: must be an integer from 1 to 1024, got 0",
        id="slots-zero",
    ),
    pytest.param(
        MINIMAL + "    slots: 2.5\n",
        "workers.w1.slots: must be an integer from 1 to 1024, got 2.5",
        id="slots-float",
    ),
    pytest.param(
        MINIMAL + "limits:\n  idle_timeout: -1\n",
        "limits.idle_timeout: must be a number of seconds greater than 0, got -1",
        id="negative-timeout",
    ),
    pytest.param(
        MINIMAL + "limits:\n  auth_timeout: .inf\n",
        "limits.auth_timeout: must be a number of seconds greater than 0, got inf",
        id="infinite-timeout",
    ),
    pytest.param(
        MINIMAL + "limits:\n  head_timeout: '10'\n",
        "limits.head_timeout: must be a number of seconds greater than 0, got '10'",
        id="timeout-string",
    ),
    pytest.param(
        MINIMAL + "limits:\n  max_connections: 10\n  max_unauthenticated: 11\n",
        "limits.max_unauthenticated: must be an integer from 1 to 10, got 11",
        id="unauthenticated-above-connections",
    ),
    pytest.param(
        "cluster:\n  heartbeat_interval: 2\n  heartbeat_timeout: 2\n" + MINIMAL,
        "cluster.heartbeat_timeout: must be greater than cluster.heartbeat_interval (2), got 2",
        id="heartbeat-timeout-not-above-interval",
    ),
    pytest.param(
        "cluster:\n  replication: 0\n" + MINIMAL,
        "cluster.replication: must be an integer of at least 1, got 0",
        id="replication-zero",
    ),
    pytest.param(
        "cluster:\n  value_max: 1MB\n" + MINIMAL,
        "cluster.value_max: unknown size unit 'MB' (use B, KiB, MiB, GiB, TiB or K, M, G, T)",
        id="size-decimal-unit",
    ),
    pytest.param(
        "cluster:\n  value_max: lots\n" + MINIMAL,
        "cluster.value_max: expected a size such as 1MiB or 512KiB, got 'lots'",
        id="size-not-a-size",
    ),
    pytest.param(
        "cluster:\n  value_max: 65MiB\n" + MINIMAL,
        "cluster.value_max: must be from 1 B to 64 MiB, got '65MiB'",
        id="size-too-large",
    ),
    pytest.param(
        "cluster:\n  value_max: 0\n" + MINIMAL,
        "cluster.value_max: must be from 1 B to 64 MiB, got 0",
        id="size-zero",
    ),
    pytest.param(
        "cluster:\n  token: abc\n  token_file: t\n" + MINIMAL,
        "cluster: token and token_file are mutually exclusive; set one",
        id="token-and-token-file",
    ),
    pytest.param(
        "cluster:\n  token: ''\n" + MINIMAL, "cluster.token: the token is empty", id="empty-token"
    ),
    pytest.param(
        "cluster:\n  token: 'two words'\n" + MINIMAL,
        "cluster.token: the token contains whitespace or control characters",
        id="token-with-space",
    ),
    pytest.param(
        'cluster:\n  token: "a\\x01b"\n' + MINIMAL,
        "cluster.token: the token contains whitespace or control characters",
        id="token-with-control-char",
    ),
    pytest.param(
        "cluster:\n  token: 12345\n" + MINIMAL,
        "cluster.token: must be a string (put it in quotes), not int",
        id="token-not-string",
    ),
    pytest.param(
        "cluster: [1]\n" + MINIMAL,
        "cluster: must be a mapping, got a list",
        id="section-not-mapping",
    ),
    pytest.param(
        MINIMAL.replace("  w1:", "  'w 1':"),
        "workers: worker name must be 1 to 64 of A-Z a-z 0-9 _ . -, got 'w 1'",
        id="bad-worker-name",
    ),
    pytest.param(
        MINIMAL.replace("  w1:", "  " + "w" * 65 + ":"),
        "workers: worker name must be 1 to 64",
        id="worker-name-too-long",
    ),
    pytest.param(
        MINIMAL.replace("  w1:", "  1:"),
        "workers: worker name must be 1 to 64 of A-Z a-z 0-9 _ . -, got 1",
        id="worker-name-not-string",
    ),
    pytest.param(
        "master: {port: 0, state_dir: s}\nworkers: {}\n",
        "workers: at least one worker is required",
        id="no-workers",
    ),
    pytest.param(
        "master: {port: 0, state_dir: s}\nworkers:\n",
        "workers: at least one worker is required",
        id="workers-null",
    ),
    pytest.param(
        "master: {port: 0, state_dir: s}\n",
        "workers: required section is missing",
        id="workers-missing",
    ),
    pytest.param(
        MINIMAL.replace("    data_dir: data/w1\n", ""),
        "workers.w1.data_dir: required key is missing",
        id="data-dir-missing",
    ),
    pytest.param(
        MINIMAL.replace("  state_dir: state\n", ""),
        "master.state_dir: required key is missing",
        id="state-dir-missing",
    ),
    pytest.param(
        MINIMAL.replace("data_dir: data/w1", "data_dir: ''"),
        "workers.w1.data_dir: must be a non-empty path, got ''",
        id="data-dir-empty",
    ),
    pytest.param(
        MINIMAL.replace("port: 0\n  state", "host: ''\n  port: 0\n  state"),
        "master.host: must be a host name or IP address with no spaces, got ''",
        id="host-empty",
    ),
    pytest.param(
        MINIMAL.replace("port: 0\n  state", "port: 7400\n  state")
        + "  w2: {port: 7400, data_dir: d2}\n",
        "workers.w2.port: port 7400 on 127.0.0.1 is already used by master",
        id="same-port-twice",
    ),
    pytest.param("- 1\n- 2\n", "the top level must be a mapping, got a list", id="top-level-list"),
    pytest.param("", "the file is empty", id="empty-file"),
    pytest.param(
        MINIMAL + "  w1: {port: 0, data_dir: x}\n",
        "line 8, column 3: invalid YAML: found duplicate key 'w1'",
        id="duplicate-worker",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_bad_file_is_one_line_naming_file_key_and_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    """Each schema violation is a ConfigError of one line: file, key path, what is wrong."""
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: {expected}")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """A YAML syntax error is one line with its 1-based line number."""
    path = write(tmp_path, MINIMAL + "limits: [unclosed\n")
    message = load_error(path)
    assert f"{path}: line 9, column 1: invalid YAML: " in message


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a one-line ConfigError naming it."""
    path = tmp_path / "absent.yaml"
    assert load_error(path) == f"{path}: cannot read config file: No such file or directory"


def test_file_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"master: {state_dir: \xe9}\n")
    assert "not UTF-8 text" in load_error(path)


def test_error_does_not_reveal_the_token(tmp_path: Path) -> None:
    """A rejected token is described, never quoted: it is a secret."""
    path = write(tmp_path, "cluster:\n  token: 'hunter2 x'\n" + MINIMAL)
    assert "hunter2" not in load_error(path)


def test_long_bad_value_is_shortened(tmp_path: Path) -> None:
    """An error quotes at most a short prefix of a long bad value."""
    path = write(tmp_path, MINIMAL.replace("port: 0\n  state", f"port: {'x' * 500}\n  state"))
    assert len(load_error(path)) < len(str(path)) + 150


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    """token_file is relative to the config's directory and its content is stripped."""
    (tmp_path / "secret").write_text("  s3cret-token-in-a-file\n", encoding="utf-8")
    (tmp_path / "secret").chmod(0o600)
    config = load_config(write(tmp_path, "cluster:\n  token_file: secret\n" + MINIMAL))
    assert config.cluster.token == "s3cret-token-in-a-file"


def test_missing_token_file(tmp_path: Path) -> None:
    """A token_file that cannot be read is an error naming the resolved file."""
    path = write(tmp_path, "cluster:\n  token_file: nope\n" + MINIMAL)
    message = load_error(path)
    assert message == (
        f"{path}: cluster.token_file: cannot read {(tmp_path / 'nope').resolve()}: "
        "No such file or directory"
    )


def test_empty_token_file(tmp_path: Path) -> None:
    """A token_file holding only blanks is an error naming that file."""
    (tmp_path / "secret").write_text("\n \n", encoding="utf-8")
    (tmp_path / "secret").chmod(0o600)
    path = write(tmp_path, "cluster:\n  token_file: secret\n" + MINIMAL)
    assert load_error(path).endswith(
        f"cluster.token_file: the token in {(tmp_path / 'secret').resolve()} is empty"
    )


def test_relative_paths_resolve_against_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_dir and state_dir are relative to the file's directory, not the working one."""
    write(tmp_path / "etc", MINIMAL.replace("state_dir: state", "state_dir: ../var/master"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "dsml.yaml")
    assert config.master.state_dir == (tmp_path / "var" / "master").resolve()
    assert config.worker("w1").data_dir == (tmp_path / "etc" / "data" / "w1").resolve()
    assert config.master.state_dir.is_absolute()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    """An absolute data_dir is used as it is."""
    target = (tmp_path / "abs" / "w1").resolve()
    config = load_config(write(tmp_path / "etc", MINIMAL.replace("data/w1", str(target))))
    assert config.worker("w1").data_dir == target


def test_unknown_worker_names_the_known_ones(tmp_path: Path) -> None:
    """Config.worker with an unknown name says which workers exist."""
    path = write(tmp_path, MINIMAL + "  w2: {port: 0, data_dir: d2}\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        config.worker("w9")
    assert str(info.value) == f"{path}: workers: no worker named 'w9' (known: w1, w2)"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1MiB", 1024**2),
        ("512 KiB", 512 * 1024),
        ("100B", 100),
        ("2gib", 2 * 1024**3),
        ("4096", 4096),
        (7, 7),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    """Sizes take B, KiB, MiB or GiB (any case) or are plain byte counts."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5MiB", "-1", "1 MB", "MiB", "", True, -3, 1.0])
def test_parse_size_rejects(text: object) -> None:
    """Fractions, negative numbers, decimal units and non-sizes are ValueErrors."""
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.org", False),
        ("128.0.0.1", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    """Only 127.0.0.0/8, ::1 and localhost count as loopback."""
    assert is_loopback(host) is loopback


def _config(tmp_path: Path, token: str | None) -> Config:
    cluster = f"cluster:\n  token: {token}\n" if token else ""
    return load_config(write(tmp_path, cluster + MINIMAL))


def test_listen_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    """Without a token, listening on a non-loopback address is refused in one line."""
    config = _config(tmp_path, None)
    with pytest.raises(ConfigError) as info:
        check_listen_safe(config, "0.0.0.0", "workers.w1.host")
    assert str(info.value) == (
        f"{config.path}: workers.w1.host: refusing to listen on non-loopback 0.0.0.0 "
        "without cluster.token"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_listen_allows_loopback_without_token(tmp_path: Path, host: str) -> None:
    """Loopback addresses are fine without a token."""
    check_listen_safe(_config(tmp_path, None), host, "master.host")


def test_listen_refuses_non_loopback_with_token_but_no_tls(tmp_path: Path) -> None:
    """A token alone (clear text) is not enough for a non-loopback address."""
    config = _config(tmp_path, "t0ken-of-16-chars")
    with pytest.raises(ConfigError) as info:
        check_listen_safe(config, "0.0.0.0", "master.host")
    assert "without cluster.tls: true" in str(info.value)


def test_listen_allows_non_loopback_with_tls(tmp_path: Path) -> None:
    """With cluster.tls, any address may be used."""
    config = load_config(write(tmp_path, "cluster:\n  tls: true\n" + MINIMAL))
    assert config.cluster.tls
    check_listen_safe(config, "0.0.0.0", "master.host")


def test_pki_dir_default_and_relative(tmp_path: Path) -> None:
    """cluster.pki_dir is relative to the config file; by default ../var/pki beside it."""
    config = load_config(write(tmp_path, MINIMAL))
    assert config.pki_dir == (config.path.parent / "../var/pki").resolve()
    config = load_config(write(tmp_path, "cluster:\n  pki_dir: keys\n" + MINIMAL))
    assert config.pki_dir == (config.path.parent / "keys").resolve()


def test_cluster_admins_default_and_list(tmp_path: Path) -> None:
    """cluster.admins: the users who may act on every job; by default [admin]."""
    assert load_config(write(tmp_path, MINIMAL)).cluster.admins == ("admin",)
    config = load_config(write(tmp_path, "cluster:\n  admins: [root, ops.team]\n" + MINIMAL))
    assert config.cluster.admins == ("root", "ops.team")
    assert load_config(write(tmp_path, "cluster:\n  admins: []\n" + MINIMAL)).cluster.admins == ()


@pytest.mark.parametrize("value", ["admin", "[bad name]", "[1]", "['']"])
def test_cluster_admins_must_be_a_list_of_names(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"cluster:\n  admins: {value}\n" + MINIMAL))
    assert "cluster.admins: must be a list of user names" in str(info.value)


def test_a_workers_python_for_functions_is_an_absolute_path(tmp_path: Path) -> None:
    base = "master: {port: 0, state_dir: m}\nworkers:\n  w1: {port: 0, data_dir: w1%s}\n"
    path = tmp_path / "dsml.yaml"
    for extra, want in [("", None), (", python: /opt/venv/bin/python", "/opt/venv/bin/python")]:
        path.write_text(base % extra)
        assert load_config(path).worker("w1").python == want
    for bad in ("python3", "3", "[]"):
        path.write_text(base % f", python: {bad}")
        with pytest.raises(ConfigError, match="workers.w1.python: must be the absolute path"):
            load_config(path)


def test_a_workers_preload_is_a_list_of_module_names(tmp_path: Path) -> None:
    base = "master: {port: 0, state_dir: m}\nworkers:\n  w1: {port: 0, data_dir: w1%s}\n"
    path = tmp_path / "dsml.yaml"
    for extra, want in [("", ()), (", preload: [numpy, os.path]", ("numpy", "os.path"))]:
        path.write_text(base % extra)
        assert load_config(path).worker("w1").preload == want
    for bad in ("numpy", "[1]", "['a b']", "['os..path']", "['x,y']", f"[{'a' * 201}]"):
        path.write_text(base % f", preload: {bad}")
        with pytest.raises(ConfigError, match="workers.w1.preload: must be a list of module"):
            load_config(path)


def test_a_workers_input_cache_is_bytes_from_zero(tmp_path: Path) -> None:
    """``input_cache`` defaults to 8 GiB; 0 turns the cache off; negative is refused."""
    base = "master: {port: 0, state_dir: m}\nworkers:\n  w1: {port: 0, data_dir: w1%s}\n"
    for extra, want in [("", 8 << 30), (", input_cache: 0", 0), (", input_cache: 1000", 1000),
                        (", input_cache: 2GiB", 2 << 30)]:
        path = tmp_path / "dsml.yaml"
        path.write_text(base % extra)
        assert load_config(path).worker("w1").input_cache == want
    path.write_text(base % ", input_cache: -1")
    with pytest.raises(ConfigError, match="workers.w1.input_cache"):
        load_config(path)
