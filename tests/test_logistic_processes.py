"""The distributed logistic regression through real processes (issue #15): seeded CSVs
chunk-uploaded to four workers, fitted by Newton's method (one map over the chunks per
step), match scikit-learn's ``LogisticRegression`` unpenalised and L2-penalised within
1e-6; separable classes fit with a penalty and are refused without one."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import pytest

import dsml.ml
from dsml.client import ClusterClient
from dsml.localcluster import LocalCluster

np = pytest.importorskip("numpy")
linear_model = pytest.importorskip("sklearn.linear_model",
                                   reason="scikit-learn is the reference (the test extra)")
pytestmark = pytest.mark.processes

COEF = np.array([1.5, -0.8, 0.3, 0.0])


@pytest.fixture(scope="module")
def cluster(ml_cluster: LocalCluster) -> LocalCluster:
    """The session's ML cluster (conftest: four workers, replication 2)."""
    return ml_cluster


def _write(path: Path, x: object, y: object) -> tuple[object, object]:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["a", "b", "c", "d", "label"])
    w.writerows([*map(repr, map(float, r)), int(t)] for r, t in zip(x, y, strict=True))
    path.write_text(out.getvalue())
    back = np.loadtxt(path, delimiter=",", skiprows=1)
    return back[:, :-1], back[:, -1]


def _data(path: Path, n: int, seed: int) -> tuple[object, object]:
    """Seeded rows: features on different scales and offsets, a label drawn from the
    logistic model (one feature with no effect at all)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) * np.array([1.0, 3.0, 0.2, 5.0]) + np.array([40, -7, 2, 0])
    eta = -0.4 + (x - np.array([40, -7, 2, 0])) @ COEF
    y = rng.random(n) < 1 / (1 + np.exp(-eta))
    return _write(path, x, y)


def _sklearn(x: object, y: object, c: float) -> object:
    model = linear_model.LogisticRegression(C=c, solver="newton-cholesky", tol=1e-12,
                                            max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (a version deprecating an option)
        model.fit(x, y)
    return np.concatenate([model.intercept_, model.coef_[0]])


def _close(fit: dsml.ml.LogisticFit, ref: object) -> float:
    got = np.concatenate([[fit.intercept], fit.coef])
    return float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))))


def test_the_distributed_fit_matches_scikit_learn(client: ClusterClient, tmp_path: Path) -> None:
    x, y = _data(tmp_path / "d.csv", 6000, seed=21)
    # No more chunks than the cluster has slots: each step's map is one wave of tasks.
    m = client.upload_dataset(tmp_path / "d.csv", "datasets/logit", chunk="96KiB")
    assert 4 <= len(m["chunks"]) <= 6, len(m["chunks"])
    fit = dsml.ml.logistic_regression("datasets/logit", "label", client=client, timeout=300)
    err = _close(fit, _sklearn(x, y, np.inf))
    print(f"unpenalised: {fit.iterations} steps, {fit.passes} maps over {fit.chunks} chunks,"
          f" max relative difference from scikit-learn {err:.1e}")
    assert err < 1e-6
    assert fit.features == ("a", "b", "c", "d") and fit.n == 6000
    assert fit.iterations <= 10 and fit.passes <= 12
    assert 0.0 <= fit.locality <= 1.0
    # The gradient of the log loss is zero there: the solution, not a point near it.
    p = fit.predict_proba(x)
    assert np.max(np.abs(np.column_stack([np.ones(len(y)), x]).T @ (p - y))) < 1e-6 * len(y)
    for c in (0.5, 0.001):  # sklearn: |w|^2 / 2 + C * sum(loss); here l2 = 1/C
        fit = dsml.ml.logistic_regression("datasets/logit", "label", ["a", "b", "c", "d"],
                                          C=c, client=client, timeout=300)
        err = _close(fit, _sklearn(x, y, c))
        print(f"C={c}: {fit.iterations} steps, max relative difference {err:.1e}")
        assert err < 1e-6 and fit.l2 == 1 / c
    same = dsml.ml.logistic_regression("datasets/logit", "label", l2=1000.0, client=client,
                                       tree=True)  # (each step's sums as a tree of jobs)
    assert np.allclose(same.coef, fit.coef, rtol=1e-9, atol=0)


def test_separable_classes_need_a_penalty(client: ClusterClient, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 4))
    x, y = _write(tmp_path / "sep.csv", x, x[:, 0] + 0.5 * x[:, 1] > 0.1)
    client.upload_dataset(tmp_path / "sep.csv", "datasets/sep", chunk="32KiB")
    with pytest.raises(dsml.ml.SeparationError, match="separate the classes") as e:
        dsml.ml.logistic_regression("datasets/sep", "label", client=client, timeout=300)
    assert e.value.code == "separable"
    fit = dsml.ml.logistic_regression("datasets/sep", "label", C=10.0, client=client,
                                      timeout=300)
    assert _close(fit, _sklearn(x, y, 10.0)) < 1e-6
    assert np.mean(fit.predict(x) == y) > 0.99  # (a penalty blurs the closest rows)


def test_a_target_that_is_not_binary_is_refused(client: ClusterClient, tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("a,label\n1,0\n2,1\n3,2\n")
    client.upload_dataset(tmp_path / "bad.csv", "datasets/badlabel")
    with pytest.raises(ValueError, match="target is 2.0 in a row"):
        dsml.ml.logistic_regression("datasets/badlabel", "label", client=client, timeout=300)
    with pytest.raises(ValueError, match="give C or l2"):
        dsml.ml.logistic_regression("datasets/badlabel", "label", C=1.0, l2=1.0,
                                    client=client)
