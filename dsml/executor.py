"""``dsml.Executor``: a :class:`concurrent.futures.Executor` whose calls run as tasks of
the cluster's job queue (see :mod:`dsml.client.functions` for how calls, arguments and
results travel, and how a map is batched).

    with dsml.Executor(resources={"cpus": 1}) as ex:
        for lr, loss in zip(lrs, ex.map(train, lrs)):
            print(lr, loss)

Its futures are real :class:`concurrent.futures.Future` objects (``as_completed``,
``wait``, ``result(timeout)``), resolved exactly once by the executor's own background
thread.  ``submit(fn, *args, **kwargs)`` reserves no keyword: options are the
executor's (its constructor takes the fields of :class:`~dsml.client.functions.Options`)
or a call's own (:func:`dsml.options`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures as cf
from typing import Any

from .client.functions import FunctionRunner, Options


class Executor(cf.Executor):
    """Runs functions on a dsml cluster.

    ``client``: a :class:`~dsml.client.ClusterClient` to use (the executor opens its own
    connection for its thread; the client stays the caller's to close), else one made
    from the config file :func:`dsml.connect` finds (``config``), closed at shutdown.
    Other keywords are the defaults of every call (the fields of
    :class:`~dsml.client.functions.Options`: ``resources``, ``timeout``, ``retries``,
    ``python``, ``env``, ``name``, ``priority``, ...).
    """

    def __init__(self, client: Any = None, *, config: str | os.PathLike[str] | None = None,
                 **options: Any) -> None:
        if client is None:
            from .client.cluster import ClusterClient

            client = ClusterClient.from_config(config)
            self._own_client = True
        else:
            self._own_client = False
        self.client = client
        self._runner = FunctionRunner(client, Options().merged(options))
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """``fn(*args, **kwargs)`` as one task; every keyword is ``fn``'s."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._runner.submit(fn, args, kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """Results of ``fn`` over the iterables, in order, as one job (batched: a few
        tasks per CPU of the cluster; ``chunksize`` > 1 sets the calls per task).  The
        first call that raised raises from the iterator; leaving it cancels the rest."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        end = None if timeout is None else time.monotonic() + timeout
        fs = self._runner.map(fn, *iterables, batch_size=chunksize if chunksize > 1 else None)

        def results() -> Iterator[Any]:
            try:
                fs.reverse()
                while fs:
                    left = None if end is None else end - time.monotonic()
                    yield fs.pop().result(left)
            finally:
                for f in fs:
                    f.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; ``cancel_futures`` cancels every future not yet
        resolved (and the jobs all of whose calls are cancelled); ``wait`` blocks until
        every future is resolved."""
        self._shutdown = True
        if cancel_futures:
            self._runner.cancel_all()
        if wait:
            cf.wait(self._runner.pending())
        self._runner.close(when_idle=True, join=wait)
        if self._own_client:
            self.client.close()  # (the thread has a connection of its own)
