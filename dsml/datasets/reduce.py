"""A map over a dataset's chunks reduced as a tree on the cluster (issue #15).

``map_chunks(fn, "datasets/NAME", reduce=add)`` is a chain of jobs like any other
(durable, retried, shown by ``dsml jobs``, cancelled with the future):

- the **map** job, one task per chunk (:func:`dsml.datasets.map_chunks`), whose results
  stay stored (``_dsml/result/...``) rather than come back to the client;
- then **reduce** jobs, one per level of the tree, each coming ``after`` the one before:
  a task per group of at most ``fan_in`` results of the level below, staged as its
  inputs (so the master offers it to a worker holding them), which folds them with
  ``reduce`` in their order (:func:`combine`) and stores its own result;
- the last level is one task: its result is the future's value, the only one the client
  reads.  Once its job ended, the results below it are deleted.

The order of the chunks is kept (each group is consecutive, folded left to right), so
``reduce`` need only be associative, not commutative: the value is
``reduce(...reduce(reduce(r0, r1), r2)..., rN)`` up to the grouping.  A map call that
raised raises through the reduce that meets it (with its remote traceback); a task that
failed (a worker lost more often than retries allow) fails the jobs after it, and the
future with ``dependency ... failed``.  Cancelling the future cancels every job of it.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..client.cluster import ClusterClient

#: Results one reduce task folds at most.
FAN_IN = 8


def combine(reduce: Callable[[Any, Any], Any], *paths: Path) -> Any:
    """Fold, left to right, the call results stored in the function-task result files
    ``paths`` (staged inputs) with ``reduce`` (runs on a worker)."""
    import cloudpickle

    from ..fnrun import RemoteError, RemoteTraceback, mismatch, read_header, versions

    values: list[Any] = []
    for path in paths:
        head, payload = read_header(path.read_bytes())
        why = mismatch(head, versions())
        if why:
            raise RemoteError(f"cannot read a result to reduce: {why}")
        for part in pickle.loads(payload):
            _number, ok, value, tb = cloudpickle.loads(part)
            if not ok:
                if tb:
                    value.__cause__ = RemoteTraceback(tb)
                raise value
            values.append(value)
    return functools.reduce(reduce, values)


def tree_reduce(client: ClusterClient, fn: Callable[..., Any],
                calls: Sequence[tuple[Any, ...]], reduce: Callable[[Any, Any], Any], *,
                fan_in: int = FAN_IN, name: str = "",
                resources: dict[str, Any] | None = None) -> Future[Any]:
    """``fn(*call)`` for each call, one task each, reduced as a tree of jobs (see the
    module's doc); the future of the value.  It has ``jobs`` (the map's id, then each
    level's) and ``map_futures`` (one per call, resolving to None, with ``job_id`` and
    ``task``)."""
    from ..client.functions import Options, unwrap
    from ..fnrun import Key

    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, not {fan_in}")
    if not calls:
        raise ValueError("nothing to reduce: no calls")
    runner = client.functions()
    base = runner.defaults if resources is None else Options(resources=resources)
    fn, opts = unwrap(fn, base)
    label = name or getattr(fn, "__qualname__", type(fn).__name__)
    opts = opts.merged({"name": f"map:{label}"})
    maps = runner._submit(fn, [(tuple(c), {}) for c in calls], opts, 1, keep=True)  # noqa: SLF001
    futures, level, jobs = list(maps), [f.result_key for f in maps], [maps[0].job_id]
    kept = list(level)
    depth = 1
    while True:
        groups = [level[i:i + fan_in] for i in range(0, len(level), fan_in)]
        last = len(groups) == 1
        here = runner._submit(  # noqa: SLF001
            combine, [((reduce, *map(Key, g)), {}) for g in groups],
            opts.merged({"name": f"reduce:{label} (level {depth})"}), 1,
            after=[jobs[-1]], keep=not last, cleanup=kept if last else ())
        jobs.append(here[0].job_id)
        if last:
            break
        futures += here
        level = [f.result_key for f in here]
        kept += level
        depth += 1
    (root,) = here
    root.jobs, root.map_futures = jobs, maps  # type: ignore[attr-defined]

    def cancelled(f: Future[Any]) -> None:
        if f.cancelled():
            for other in futures:
                other.cancel()  # each job's futures all cancelled: the job is

    root.add_done_callback(cancelled)
    return root
