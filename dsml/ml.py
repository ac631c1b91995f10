"""Exact linear models over a dataset's chunks, where they are stored (issue #15).

    import dsml.ml
    fit = dsml.ml.linear_regression("datasets/games", target="y", features=["a", "b"])
    fit.coef, fit.intercept

A map over the chunks (:func:`dsml.datasets.map_chunks`: one task per chunk, run by
preference on a worker that holds it, the chunk staged from its own store) returns each
chunk's sufficient statistics; the client merges them and solves.

Numerically: each chunk is read in blocks of :data:`BLOCK_ROWS` rows (memory flat in
the chunk's size), and every statistic is a count, a mean and a *centred* co-moment
matrix of ``[features..., target]`` in float64, merged pairwise (Chan, Golub and
LeVeque's update: ``C = C_a + C_b + d d' n_a n_b / n`` with ``d`` the difference of the
means), never the raw ``X'X`` whose entries grow with the data's offset.  The slopes
solve ``(S_xx + ridge I) b = S_xy`` by Cholesky, by least squares when ``S_xx`` is
singular (a feature constant or a combination of others); the intercept is
``mean_y - mean_x . b`` (not penalised).  With ``ridge=0`` that is the least-squares fit
with an intercept column, numpy's ``lstsq`` on the whole data.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .client.cluster import ClusterClient

#: Rows parsed at a time inside a chunk.
BLOCK_ROWS = 65536

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


def _block_stats(rows: list[list[float]]) -> Stats:
    import numpy as np

    z = np.asarray(rows, dtype=np.float64)
    m = z.mean(axis=0)
    zc = z - m
    return len(rows), m, zc.T @ zc


def chunk_stats(path: Path, columns: Sequence[int]) -> Stats:
    """The statistics of ``columns`` (features then target) of the CSV chunk at
    ``path``, read :data:`BLOCK_ROWS` rows at a time (runs on a worker)."""
    import numpy as np

    k = len(columns)
    total: Stats = (0, np.zeros(k), np.zeros((k, k)))
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
                total = merge(total, _block_stats(block))
                block = []
        if block:
            total = merge(total, _block_stats(block))
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
                      timeout: float | None = None) -> LinearFit:
    """Least squares (``ridge`` > 0: ridge) of ``target`` on ``features`` (default: every
    other column) with an intercept, over the CSV dataset ``dataset`` (see
    :mod:`dsml.datasets`), one task per chunk; ``client``: else :func:`dsml.connect`."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, not {ridge}")
    own = client is None
    if client is None:
        from . import connect

        client = connect()
    try:
        return _fit(client, dataset, target, features, ridge, timeout)
    finally:
        if own:
            client.close()


def _fit(client: ClusterClient, dataset: str, target: str,
         features: Sequence[str] | None, ridge: float, timeout: float | None) -> LinearFit:
    import numpy as np

    from .datasets import chunk_locality, map_chunks, read_manifest

    m = read_manifest(client, dataset)
    if m.get("kind") != "csv":
        raise ValueError(f"{dataset}: a linear regression reads a CSV dataset, not "
                         f"{m.get('kind')!r}")
    names = next(csv.reader([m["header"]]))
    if features is None:
        features = [c for c in names if c != target]
    missing = [c for c in (*features, target) if c not in names]
    if missing:
        raise ValueError(f"{dataset} has no column {', '.join(map(repr, missing))} "
                         f"(its columns: {', '.join(names)})")
    columns = [names.index(c) for c in (*features, target)]
    futures = map_chunks(client, chunk_stats, dataset, columns)
    k = len(columns)
    total: Stats = (0, np.zeros(k), np.zeros((k, k)))
    for f in futures:
        total = merge(total, f.result(timeout))
    coef, intercept = solve(total, ridge)
    return LinearFit(tuple(features), target, coef, intercept, total[0], ridge,
                     len(futures), chunk_locality(client, futures))
