"""Exact linear models over a dataset's chunks, where they are stored (issue #15).

    import dsml.ml
    fit = dsml.ml.linear_regression("datasets/games", target="y", features=["a", "b"])
    fit.coef, fit.intercept

A map over the chunks (:func:`dsml.datasets.map_chunks`: one task per chunk, run by
preference on a worker that holds it, the chunk staged from its own store) returns each
chunk's sufficient statistics; the client merges them (or, past :data:`TREE_BYTES` of
them, a tree of reduce jobs on the cluster does: :mod:`dsml.datasets.reduce`) and solves.

Numerically: each chunk is read in blocks of :data:`BLOCK_ROWS` rows (memory flat in
the chunk's size), and every statistic is a count, a mean and a *centred* co-moment
matrix of ``[features..., target]`` in float64, merged pairwise (Chan, Golub and
LeVeque's update: ``C = C_a + C_b + d d' n_a n_b / n`` with ``d`` the difference of the
means), never the raw ``X'X`` whose entries grow with the data's offset.  The slopes
solve ``(S_xx + ridge I) b = S_xy`` by Cholesky, by least squares when ``S_xx`` is
singular (a feature constant or a combination of others); the intercept is
``mean_y - mean_x . b`` (not penalised).  With ``ridge=0`` that is the least-squares fit
with an intercept column, numpy's ``lstsq`` on the whole data.

:func:`logistic_regression` iterates: Newton's method on the summed log loss, one map
per step handing each chunk the current coefficients (:func:`chunk_logistic` returns the
chunk's loss, gradient and Hessian at them, a block at a time), the client solving for
the next step; its first map is the linear regression's statistics, which standardise
the features and make the first step.  It equals scikit-learn's ``LogisticRegression``
(``C`` here is its ``C``; ``l2 = 1/C``) to rounding, in 6 to 10 maps.
"""

from __future__ import annotations

import csv
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .errors import DsmlError

if TYPE_CHECKING:
    from .client.cluster import ClusterClient

#: A Parquet file's first (and last) bytes: a chunk that starts so is read by pyarrow.
PARQUET_MAGIC = b"PAR1"
#: Rows parsed at a time inside a chunk.
BLOCK_ROWS = 65536
#: Chunks from this size on are parsed by pandas (when installed) unless it is imported
#: already (a worker's ``preload``): its import (about 0.45 s beyond numpy's) costs what
#: the csv module takes to parse some 15 MiB, pandas' parser being 7x faster.
PANDAS_FROM = 16 << 20
#: A fit merges its chunks' statistics as a tree of reduce jobs on the cluster when
#: they come to more than this (chunks x the statistics' bytes), rather than read each
#: into the client: a tree costs a job per level (some 0.5 s on a small cluster), worth
#: it only when the statistics are large (many features) or the chunks many.
TREE_BYTES = 64 << 20

Stats = tuple[int, Any, Any]  # (n, mean vector, centred co-moment matrix)


@attrs.frozen
class LinearFit:
    """A fitted linear model: ``y ~ intercept + features . coef``."""

    features: tuple[str, ...]
    target: str
    coef: Any  # numpy array, one per feature
    intercept: float
    n: int
    ridge: float
    #: The chunks the map ran over, and the fraction of them run on a worker holding it.
    chunks: int = 0
    locality: float = 0.0

    def predict(self, x: Any) -> Any:
        import numpy as np

        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept


def merge(a: Stats, b: Stats) -> Stats:
    """The statistics of two disjoint sets of rows together (exact, pairwise)."""
    import numpy as np

    na, ma, ca = a
    nb, mb, cb = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    d = mb - ma
    return n, ma + d * (nb / n), ca + cb + np.outer(d, d) * (na * nb / n)


def _block_stats(rows: Any) -> Stats:
    import numpy as np

    z = np.asarray(rows, dtype=np.float64)
    m = z.mean(axis=0)
    zc = z - m
    return len(z), m, zc.T @ zc


def _blocks(path: Path, columns: Sequence[int]) -> Iterator[Any]:
    """``columns`` of the chunk at ``path`` (CSV, or Parquet:
    :func:`_parquet_blocks`) as float64 arrays of at most
    :data:`BLOCK_ROWS` rows each (its header skipped): the chunk is never whole in memory.
    Parsed by pandas' C reader where pandas is installed and the chunk is at least
    :data:`PANDAS_FROM` bytes or pandas already imported (measured 7x the ``csv`` module
    and ``float()`` per value, which is three quarters of a big chunk's time otherwise;
    its values equal ``float()``'s), else by the ``csv`` module.  A value that is not a
    number, missing or NaN is a ValueError naming the chunk."""
    import numpy as np

    with open(path, "rb") as f:
        if f.read(4) == PARQUET_MAGIC:
            yield from _parquet_blocks(path, columns)
            return
    if "pandas" not in sys.modules and os.path.getsize(path) < PANDAS_FROM:
        yield from _csv_blocks(path, columns)  # parsed before pandas would be imported
        return
    try:
        import pandas as pd
    except ImportError:
        yield from _csv_blocks(path, columns)
        return
    wanted = sorted(set(columns))
    order = [wanted.index(c) for c in columns]  # read in file order, used in ours
    try:
        for block in pd.read_csv(path, usecols=wanted, dtype=np.float64, header=0,
                                 chunksize=BLOCK_ROWS, engine="c"):
            z = block.to_numpy(dtype=np.float64)[:, order]
            if np.isnan(z).any():
                row = int(np.flatnonzero(np.isnan(z).any(axis=1))[0]) + int(block.index[0])
                raise ValueError(f"row {row + 1}: a value missing or not a number")
            if len(z):
                yield z
    except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{path.name}: {e}") from None


def _parquet_blocks(path: Path, columns: Sequence[int]) -> Iterator[Any]:
    """:func:`_blocks` of a Parquet chunk (pyarrow), :data:`BLOCK_ROWS` rows at a time:
    only the columns used are read; a null, NaN or non-numeric value is a ValueError."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        wanted = sorted(set(columns))
        order = [wanted.index(c) for c in columns]
        first = 0
        for batch in pf.iter_batches(batch_size=BLOCK_ROWS, columns=[names[c] for c in wanted]):
            cols = []
            for name, col in zip(batch.schema.names, batch.columns, strict=True):
                if col.null_count:
                    raise ValueError(f"column {name!r}: a value missing near row {first + 1}")
                cols.append(col.to_numpy(zero_copy_only=False).astype(np.float64))
            z = np.column_stack(cols)[:, order] if cols else np.empty((batch.num_rows, 0))
            if np.isnan(z).any():
                row = int(np.flatnonzero(np.isnan(z).any(axis=1))[0]) + first
                raise ValueError(f"row {row + 1}: a value not a number")
            first += len(z)
            if len(z):
                yield z
    except (ValueError, TypeError, IndexError, pa.ArrowException) as e:
        raise ValueError(f"{path.name}: {e}") from None


def _csv_blocks(path: Path, columns: Sequence[int]) -> Iterator[Any]:
    """:func:`_blocks` by the ``csv`` module (no pandas here)."""
    import numpy as np

    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        block: list[list[float]] = []
        for line, row in enumerate(reader, 2):
            try:
                block.append([float(row[c]) for c in columns])
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path.name} line {line}: {e}") from None
            if len(block) >= BLOCK_ROWS:
                yield np.asarray(block, dtype=np.float64)
                block = []
        if block:
            yield np.asarray(block, dtype=np.float64)


def chunk_stats(path: Path, columns: Sequence[int], binary: bool = False) -> Stats:
    """The statistics of ``columns`` (features then target) of the chunk at
    ``path``, read :data:`BLOCK_ROWS` rows at a time (runs on a worker); ``binary``: the
    target must be 0 or 1 (a logistic regression's)."""
    import numpy as np

    k = len(columns)
    total: Stats = (0, np.zeros(k), np.zeros((k, k)))
    for z in _blocks(path, columns):
        if binary:
            _check_binary(path, z[:, -1])
        total = merge(total, _block_stats(z))
    return total


def solve(stats: Stats, ridge: float = 0.0) -> tuple[Any, float]:
    """(slopes, intercept) from merged statistics (the last variable is the target)."""
    import numpy as np

    n, m, c = stats
    if n == 0:
        raise ValueError("no rows to fit")
    sxx, sxy = c[:-1, :-1], c[:-1, -1]
    a = sxx + ridge * np.eye(len(sxy))
    try:
        low = np.linalg.cholesky(a)
        coef = np.linalg.solve(low.T, np.linalg.solve(low, sxy))
    except np.linalg.LinAlgError:  # singular (rank-deficient features): least squares
        coef = np.linalg.lstsq(a, sxy, rcond=None)[0]
    return coef, float(m[-1] - m[:-1] @ coef)


def linear_regression(dataset: str, target: str, features: Sequence[str] | None = None,
                      ridge: float = 0.0, *, client: ClusterClient | None = None,
                      timeout: float | None = None, tree: bool | None = None) -> LinearFit:
    """Least squares (``ridge`` > 0: ridge) of ``target`` on ``features`` (default: every
    other column) with an intercept, over the CSV or Parquet dataset ``dataset`` (see
    :mod:`dsml.datasets`), one task per chunk; ``client``: else :func:`dsml.connect`.
    ``tree``: merge the chunks' statistics as a tree of reduce jobs on the cluster
    rather than in the client (default: when they are over :data:`TREE_BYTES`)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, not {ridge}")
    own = client is None
    if client is None:
        from . import connect

        client = connect()
    try:
        return _fit(_Maps(client, dataset, target, features, tree, timeout), ridge)
    finally:
        if own:
            client.close()


class _Maps:
    """The maps of one fit over a CSV or Parquet dataset: its columns (the features, then the
    target: ValueError naming what is missing) and every map's futures."""

    def __init__(self, client: ClusterClient, dataset: str, target: str,
                 features: Sequence[str] | None, tree: bool | None,
                 timeout: float | None) -> None:
        from .datasets import read_manifest

        m = read_manifest(client, dataset)
        if m.get("kind") not in ("csv", "parquet"):
            raise ValueError(f"{dataset}: a linear model reads a CSV or Parquet dataset, "
                             f"not {m.get('kind')!r}")
        names = m.get("columns") or next(csv.reader([m.get("header", "")]), [])
        features = [c for c in names if c != target] if features is None else list(features)
        missing = [c for c in (*features, target) if c not in names]
        if missing:
            raise ValueError(f"{dataset} has no column {', '.join(map(repr, missing))} "
                             f"(its columns: {', '.join(names)})")
        if not m["chunks"]:
            raise ValueError(f"{dataset}: no rows to fit")
        self.client, self.dataset, self.target = client, dataset, target
        self.features = tuple(features)
        self.columns = [names.index(c) for c in (*features, target)]
        self.chunks, self.timeout = len(m["chunks"]), timeout
        k = len(self.columns) + 1
        self.tree = tree if tree is not None else self.chunks * 8 * k * k > TREE_BYTES
        self.futures: list[Any] = []

    def run(self, fn: Callable[..., Any], reduce: Callable[[Any, Any], Any],
            *args: Any) -> Any:
        """``fn(chunk, columns, *args)`` over the chunks, its results folded by
        ``reduce``: on the cluster as a tree of jobs, or here as they arrive."""
        from .datasets import map_chunks

        if self.tree:
            root = map_chunks(self.client, fn, self.dataset, self.columns, *args,
                              reduce=reduce)
            self.futures += root.map_futures
            return root.result(self.timeout)
        futures = map_chunks(self.client, fn, self.dataset, self.columns, *args)
        self.futures += futures
        return functools.reduce(reduce, (f.result(self.timeout) for f in futures))

    def locality(self) -> float:
        from .datasets import chunk_locality

        return chunk_locality(self.client, self.futures)


def _fit(maps: _Maps, ridge: float) -> LinearFit:
    total = maps.run(chunk_stats, merge)
    coef, intercept = solve(total, ridge)
    return LinearFit(maps.features, maps.target, coef, intercept, total[0], ridge,
                     maps.chunks, maps.locality())


# -- logistic regression ---------------------------------------------------------------

#: Backtracking halvings of one Newton step before the fit gives up.
MAX_HALVINGS = 30


class SeparationError(DsmlError):
    """An unpenalised logistic fit whose maximum-likelihood estimate does not exist:
    a hyperplane of the features separates the classes (the fit met one: every row on
    its side of the decision boundary), so the likelihood grows without end as the
    coefficients do.  Fit with a penalty."""

    code = "separable"


class ConvergenceError(DsmlError):
    """A logistic fit that did not converge within its iterations."""

    code = "not-converged"


@attrs.frozen
class LogisticFit:
    """A fitted logistic model: ``P(target = 1) = expit(intercept + features . coef)``."""

    features: tuple[str, ...]
    target: str
    coef: Any  # numpy array, one per feature
    intercept: float
    n: int
    l2: float
    #: Newton steps taken, and maps run over the chunks (steps + backtracks + the first).
    iterations: int = 0
    passes: int = 0
    #: The objective at the solution (the summed log loss plus the penalty), as the
    #: last step's quadratic model predicts it (exact to the cube of that tiny step).
    objective: float = 0.0
    chunks: int = 0
    locality: float = 0.0

    def decision_function(self, x: Any) -> Any:
        import numpy as np

        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept

    def predict_proba(self, x: Any) -> Any:
        """P(target = 1) per row of ``x``."""
        import numpy as np

        return np.exp(-np.logaddexp(0.0, -self.decision_function(x)))

    def predict(self, x: Any) -> Any:
        return (self.decision_function(x) > 0).astype(int)


def chunk_logistic(path: Path, columns: Sequence[int], shift: Any, scale: Any,
                   theta: Any) -> tuple[int, float, Any, Any, int]:
    """At ``theta`` (intercept then slopes, for the features standardised by ``shift``
    and ``scale``): the rows, the summed log loss, its gradient and Hessian, and the rows
    on their side of the decision boundary (``eta > 0`` for a 1, ``< 0`` for a 0), of the
    chunk at ``path``, a block at a time (runs on a worker).  The target must be 0 or 1."""
    import numpy as np

    k = len(theta)
    n, loss, right = 0, 0.0, 0
    grad, hess = np.zeros(k), np.zeros((k, k))
    for z in _blocks(path, columns):
        y = z[:, -1]
        _check_binary(path, y)
        a = np.empty_like(z)
        a[:, 0] = 1.0
        a[:, 1:] = (z[:, :-1] - shift) / scale
        eta = a @ theta
        p = np.exp(-np.logaddexp(0.0, -eta))  # expit, with no overflow
        loss += float(np.sum(np.logaddexp(0.0, eta) - y * eta))
        grad += a.T @ (p - y)
        hess += (a * (p * (1.0 - p))[:, None]).T @ a
        right += int(np.count_nonzero(np.where(y == 1, eta > 0, eta < 0)))
        n += len(y)
    return n, loss, grad, hess, right


def _check_binary(path: Path, y: Any) -> None:
    bad = y[(y != 0) & (y != 1)]
    if len(bad):
        raise ValueError(f"{path.name}: the target is {float(bad[0])!r} in a row; a "
                         "logistic regression's target is 0 or 1")


def logistic_regression(dataset: str, target: str, features: Sequence[str] | None = None,
                        C: float | None = None, l2: float = 0.0, *,
                        client: ClusterClient | None = None, tol: float = 1e-8,
                        max_iter: int = 50, timeout: float | None = None,
                        tree: bool | None = None) -> LogisticFit:
    """Logistic regression of the 0/1 ``target`` on ``features`` (default: every other
    column) with an intercept, over the CSV or Parquet dataset ``dataset``, by Newton's method: one
    map over the chunks per step (:func:`chunk_logistic` sums each chunk's gradient and
    Hessian where it is stored), the client solving for the step.

    It minimises ``sum(log loss) + l2/2 * |coef|^2`` (the intercept is not penalised):
    scikit-learn's ``LogisticRegression(C=C)`` minimises ``|coef|^2 / 2 + C * sum(log
    loss)``, the same with ``l2 = 1/C``, so ``C`` may be given instead of ``l2``
    (``C=inf`` or ``l2=0``: no penalty).  Stops when a step moves no standardised
    coefficient by more than ``tol`` (times the largest, if over 1): Newton's
    convergence is quadratic, so the returned point is far closer than that.

    The first map is the linear regression's (:func:`chunk_stats`): the features' means
    and variances standardise them (the iterations are well conditioned wherever the
    data lie) and give the first step for free (at ``coef = 0``, ``intercept =
    logit(mean target)`` the gradient and Hessian are those statistics).  Each step is
    checked against the objective the next map computes and halved until it decreases
    (a damped Newton method, sure to converge with a penalty).

    Without a penalty on separable data (a hyperplane splits the classes: no finite
    maximum exists) it raises :class:`SeparationError` as soon as an iterate classifies
    every row right (proof that one does); if it does not converge within
    ``max_iter`` steps (quasi-separation: some coefficient growing without end), it
    raises :class:`ConvergenceError`.  Either names the remedy: a penalty.  ``tree``:
    as :func:`linear_regression`'s."""
    if C is not None:
        if l2:
            raise ValueError("give C or l2, not both (l2 = 1/C)")
        if not C > 0:
            raise ValueError(f"C must be > 0, not {C}")
        l2 = 1.0 / C
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, not {l2}")
    own = client is None
    if client is None:
        from . import connect

        client = connect()
    try:
        return _logistic(_Maps(client, dataset, target, features, tree, timeout), float(l2),
                         tol, max_iter)
    finally:
        if own:
            client.close()


def _newton_step(grad: Any, hess: Any) -> Any:
    import numpy as np

    try:
        low = np.linalg.cholesky(hess)
        return -np.linalg.solve(low.T, np.linalg.solve(low, grad))
    except np.linalg.LinAlgError:  # singular: a feature constant or a combination
        return -np.linalg.lstsq(hess, grad, rcond=None)[0]


def _add(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    """Sums, term by term (of :func:`chunk_logistic`'s results)."""
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _logistic(maps: _Maps, l2: float, tol: float, max_iter: int) -> LogisticFit:
    import numpy as np

    dataset, target = maps.dataset, maps.target
    n, mean, co = maps.run(chunk_stats, merge, True)
    k = len(mean)
    if n == 0:
        raise ValueError(f"{dataset}: no rows to fit")
    ybar = float(mean[-1])
    if not 0 < ybar < 1:
        raise ValueError(f"{dataset}: the target {target!r} has one class only "
                         f"(its mean is {ybar:g}; a logistic regression needs 0s and 1s)")
    shift = mean[:-1]
    scale = np.sqrt(np.diag(co)[:-1] / n)
    scale[scale == 0] = 1.0  # a constant feature: left as it is (the step is lstsq's)
    penalty = np.concatenate([[0.0], l2 / scale**2])  # |coef|^2 in the features' units
    # At coef 0 and intercept logit(ybar): p = ybar for every row, so the statistics
    # are the log loss, its gradient and Hessian (standardised).
    theta = np.concatenate([[np.log(ybar / (1 - ybar))], np.zeros(k - 1)])
    w = ybar * (1 - ybar)
    grad = np.concatenate([[0.0], -co[:-1, -1] / scale])
    hess = np.empty((k, k))
    hess[0, 0], hess[0, 1:], hess[1:, 0] = n * w, 0.0, 0.0
    hess[1:, 1:] = w * co[:-1, :-1] / np.outer(scale, scale)
    objective = -n * (ybar * np.log(ybar) + (1 - ybar) * np.log(1 - ybar))
    passes, steps = 1, 0
    while True:
        grad_p = grad + penalty * theta
        step = _newton_step(grad_p, np.diag(penalty) + hess)
        steps += 1
        slope = float(grad_p @ step)  # < 0: a descent direction
        if np.max(np.abs(step)) <= tol * max(1.0, float(np.max(np.abs(theta)))):
            theta, objective = theta + step, objective + 0.5 * slope  # the model's value
            break
        if steps > max_iter:
            raise ConvergenceError(
                f"the logistic regression did not converge in {max_iter} Newton steps"
                f"{'' if l2 else ' (without a penalty: the classes may be separable)'}; "
                "give a penalty (l2 > 0 or C) or more max_iter", "not-converged")
        t = 1.0
        for _halving in range(MAX_HALVINGS + 1):
            trial = theta + t * step
            _n, loss, grad, hess, right = maps.run(chunk_logistic, _add, shift, scale, trial)
            passes += 1
            value = loss + 0.5 * float(penalty @ trial**2)
            # Armijo's decrease, with room for the rounding of a sum over n rows.
            if value <= objective + 1e-4 * t * slope + 1e-12 * (abs(objective) + 1):
                break
            t /= 2
        else:
            raise ConvergenceError(f"the logistic regression's step {steps} did not "
                                   f"decrease the objective in {MAX_HALVINGS} halvings",
                                   "not-converged")
        theta, objective = trial, value
        if not l2 and right == n:
            raise SeparationError(
                f"{dataset}: the features separate the classes of {target!r} (every row "
                "is on its side of the decision boundary): an unpenalised logistic "
                "regression has no finite solution; give a penalty (l2 > 0, or C)",
                "separable")
    coef = theta[1:] / scale
    return LogisticFit(maps.features, target, coef, float(theta[0] - coef @ shift), n,
                       l2, steps, passes, float(objective), maps.chunks, maps.locality())
