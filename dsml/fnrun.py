"""Function calls as tasks: the task side, ``python -m dsml.fnrun CALLS RESULT``, and the
file format it shares with the client (:mod:`dsml.client.functions`).

A task of a function job runs this module with the worker's interpreter (the client
names it: ``python3`` on the worker's PATH by default).  It reads

- ``CALLS`` (a staged input, or ``-``: the ``DSML_FN_CALLS`` variable, base64, for a
  small batch): a JSON header line (format, the client's Python and cloudpickle
  versions, the staged file holding the function) and then a pickle of the batch's
  calls ``[(call number, args, kwargs), ...]``;
- the function, a cloudpickle staged from ``_dsml/fn/<sha256>``;
- arguments stored apart (``_dsml/arg/<sha256>``, staged) and :class:`Key` arguments
  (any stored key, staged as an input): both are persistent ids in the pickle
  (``("arg", path)`` is loaded from the staged file, ``("key", path)`` becomes the
  :class:`pathlib.Path` of the staged copy, relative to the task's working directory,
  so a large file is never read into memory unless the function does; relative, since
  a task running as the worker's task user cannot reach its directory through the
  worker's data dir, which stays the worker's alone).

It runs each call in turn and writes ``RESULT``: the same kind of header, then a pickle
of ``[(call number, ok, value or exception, traceback text or None), ...]``.  A raising
function is a result, not a failed task: the task exits 0 once the file is written.  A
version mismatch with the client (Python major.minor, cloudpickle version) or a missing
cloudpickle exits 2 with one clear line on stderr, which the client's error names.

``python -m dsml.fnrun --warm`` is the same run started ahead of its attempt (a *warm*
interpreter, :mod:`dsml.worker.tasks.warm`): it imports what a run needs, then waits on
its standard input, a Unix socket from the worker, for one message (:func:`read_go`):
the attempt's directory as a descriptor and its environment and arguments.  It moves
into that directory, takes that environment, makes its standard input ``/dev/null`` and
runs as above, once; it exits quietly if the worker closes the socket first.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import struct
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

#: The calls and results format; a reader refuses another.
FORMAT = 1
#: The modules a warm interpreter imports while it waits (comma-separated; the worker's
#: ``preload``); gone from its environment once it runs an attempt.
PRELOAD_ENV = "DSML_WARM_PRELOAD"
#: Set (to its socket's descriptor), ``--warm`` is a zygote (:mod:`dsml.fnzygote`).
ZYGOTE_ENV = "DSML_WARM_ZYGOTE"
#: The variable holding a small batch's calls (base64) when CALLS is ``-``.
CALLS_ENV = "DSML_FN_CALLS"
#: Exit status for a task that could not run its calls at all (mismatch, bad file).
EXIT_SETUP = 2
#: The largest message a warm interpreter accepts (its environment and arguments).
GO_MAX = 1 << 20
#: A message's length, before it.
GO_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class Key:
    """A stored key passed as an argument of a function call: staged on the worker as a
    task input (fetched from the store, never pickled through the master), it arrives in
    the function as the :class:`pathlib.Path` of its local copy (read-only)."""

    key: str


class RemoteTraceback(Exception):
    """The traceback of an exception raised by a function on a worker: set as the
    re-raised exception's ``__cause__`` (as ``concurrent.futures.process`` does), so
    it prints under it; ``str()`` is the traceback text."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(Exception):
    """Stands for what a call raised (or returned) that could not be pickled back:
    its type's name and its message."""


def versions() -> dict[str, str]:
    """This interpreter's Python (major.minor) and cloudpickle versions."""
    import cloudpickle

    major, minor = sys.version_info[:2]
    return {"python": f"{major}.{minor}", "cloudpickle": cloudpickle.__version__}


def runtime() -> str:
    """What this interpreter runs function calls with, in one line for a worker's
    registration (``Fn-Runtime``) and the client's check at submit: "python 3.11
    cloudpickle 3.1.1"; "" without cloudpickle (then it cannot run them)."""
    try:
        v = versions()
    except ImportError:
        return ""
    return f"python {v['python']} cloudpickle {v['cloudpickle']}"


def mismatch(theirs: dict[str, Any], ours: dict[str, str]) -> str:
    """Why a file written under ``theirs`` versions cannot be read here ("" if it can)."""
    if theirs.get("format") != FORMAT:
        return f"format {theirs.get('format')!r}, not {FORMAT}"
    diff = [k for k in ("python", "cloudpickle") if theirs.get(k) != ours[k]]
    if not diff:
        return ""
    return (f"the client has Python {theirs.get('python')} and cloudpickle "
            f"{theirs.get('cloudpickle')}, this worker's {sys.executable} has Python "
            f"{ours['python']} and cloudpickle {ours['cloudpickle']}")


def write_file(out: IO[bytes], payload: bytes) -> None:
    """A header line (format and versions) and then ``payload``."""
    out.write(json.dumps({"format": FORMAT, **versions()}).encode() + b"\n")
    out.write(payload)


def read_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(the header, the rest) of a calls or results file."""
    line, _, rest = data.partition(b"\n")
    try:
        head = json.loads(line)
    except ValueError:
        head = None
    if not isinstance(head, dict):
        raise ValueError("not a dsml function-call file (no header line)")
    return head, rest


class _Loader(pickle.Unpickler):
    """Resolves the persistent ids the client's pickler wrote (see the module doc)."""

    def persistent_load(self, pid: Any) -> Any:
        kind, path = pid
        if kind == "key":
            return Path(path)
        if kind == "arg":
            return load_file(Path(path))
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def loads(data: bytes) -> Any:
    import io

    return _Loader(io.BytesIO(data)).load()


def load_file(path: Path) -> Any:
    return loads(path.read_bytes())


def _fail(message: str) -> int:
    print(f"dsml.fnrun: {message}", file=sys.stderr, flush=True)
    return EXIT_SETUP


def _result(number: int, ok: bool, value: Any, tb: str | None) -> bytes:
    """One call's result pickled; what cannot be pickled becomes a RemoteError."""
    import cloudpickle

    try:
        return cloudpickle.dumps((number, ok, value, tb))
    except Exception as e:  # noqa: BLE001 - any pickling failure is reported the same
        what = "exception" if not ok else "result"
        text = f"{type(value).__qualname__}: {value}" if not ok else repr(e)
        err = RemoteError(f"the call's {what} could not be pickled ({e!r}): {text}")
        return cloudpickle.dumps((number, False, err, tb))


def go_message(env: dict[str, str], args: list[str]) -> bytes:
    """What the worker sends a warm interpreter (with the directory's descriptor)."""
    body = json.dumps({"env": env, "args": args}).encode()
    return GO_LENGTH.pack(len(body)) + body


def read_go(sock: socket.socket) -> tuple[int, dict[str, str], list[str]] | None:
    """(directory descriptor, environment, arguments) from the worker; None if the
    socket closes first.  Raises ValueError for a malformed message."""
    data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
    if not data:
        return None
    if len(fds) != 1 or len(data) < GO_LENGTH.size:
        for fd in fds:
            os.close(fd)
        raise ValueError("no directory with the message")
    (size,) = GO_LENGTH.unpack_from(data)
    if size > GO_MAX:
        raise ValueError(f"a message of {size} bytes")
    body = bytearray(data[GO_LENGTH.size:])
    while len(body) < size:
        more = sock.recv(size - len(body))
        if not more:
            raise ValueError("the message was cut short")
        body += more
    go = json.loads(body)
    env, args = go["env"], go["args"]
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
            and isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise ValueError("a malformed message")
    return fds[0], env, args


def _dumpable(on: bool) -> None:
    """``prctl(PR_SET_DUMPABLE)``: while it waits, a warm interpreter cannot be traced
    (nor its memory read) by another process of the task user, such as another task
    that would plant code in it for the next attempt, a job of someone else's maybe.
    Made dumpable again for its own attempt, as a cold one is.  Linux only; a no-op
    elsewhere."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, int(on), 0, 0, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


def warm_main() -> int:
    """Import what a run needs, then wait for the attempt (see the module doc) and run it
    as :func:`main` would; or, as a zygote, fork such interpreters (:mod:`.fnzygote`)."""
    _dumpable(False)
    zygote = os.environ.get(ZYGOTE_ENV)
    import importlib

    import cloudpickle  # noqa: F401 - imported now, before the attempt: the point

    for name in filter(None, os.environ.get(PRELOAD_ENV, "").split(",")):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S110 - not installed here: the call imports it
            pass
    if zygote:
        from .fnzygote import serve

        return serve(int(zygote), warm_run, end)
    return warm_run(socket.socket(fileno=0))


def warm_run(sock: socket.socket) -> int:
    """Wait on ``sock`` (standard input) for the attempt, then run it."""
    try:
        go = read_go(sock)
    except (OSError, ValueError) as e:
        return _fail(f"warm start: {e}")
    finally:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the socket's descriptor: what a task gets is /dev/null
        os.close(null)
        sock.detach()
    if go is None:
        return 0  # not wanted after all
    fd, env, args = go
    _dumpable(True)
    os.fchdir(fd)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    forked = sys.modules.get("dsml.fnzygote")
    if forked is not None:  # forked by a zygote, whose imports ran with one thread
        forked.blas_threads(env)
    if sys.path and sys.path[0]:
        sys.path[0] = os.getcwd()  # as ``python -m`` started here would have them
    sys.argv[1:] = args
    return main(args)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--warm"]:
        return warm_main()
    if len(args) != 2:
        return _fail("usage: python -m dsml.fnrun CALLS|- RESULT")
    try:
        ours = versions()
    except ImportError as e:
        return _fail(f"cannot import cloudpickle in {sys.executable}: {e}")
    if args[0] == "-":
        data = base64.b64decode(os.environ.get(CALLS_ENV, ""))
    else:
        data = Path(args[0]).read_bytes()
    try:
        head, payload = read_header(data)
    except ValueError as e:
        return _fail(str(e))
    why = mismatch(head, ours)
    if why:
        return _fail(f"version mismatch: {why}; run functions with a matching interpreter "
                     "(dsml.options(fn, python=...))")
    try:
        fn = load_file(Path(head["fn"]))
        calls = loads(payload)
    except Exception as e:  # noqa: BLE001 - a setup failure: the whole task fails, loudly
        traceback.print_exc()
        return _fail(f"could not load the function or its arguments: "
                     f"{type(e).__qualname__}: {e}")
    parts = []
    for number, fargs, fkwargs in calls:
        try:
            parts.append(_result(number, True, fn(*fargs, **fkwargs), None))
        except BaseException as e:  # noqa: BLE001 - SystemExit too: a result, not a death
            if isinstance(e, KeyboardInterrupt):
                raise
            # From the function's frame on (this module's own frame left out).
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
            parts.append(_result(number, False, e, tb))
    out_path = Path(args[1])
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as out:
        # One pickle of the list of each call's own pickle: a bad one spoils nothing else.
        write_file(out, pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(tmp, out_path)
    return 0


def end(code: int) -> None:
    """Exit as Python's own exit does, less its module teardown (which took about 7 ms
    of every call here, after cloudpickle's import): non-daemon threads the calls left
    are joined, atexit handlers run, standard streams flushed (exit status 120 if that
    fails, as Python's).  Where this Python lacks the hooks, a normal exit."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:
        sys.exit(code)
    shutdown()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)


if __name__ == "__main__":
    end(main())
