"""Scatter a numpy array into the cluster in parts, compute on each part on a worker
(staged there like a job's input, never pickled through the master), gather the partial
sums, and check them against numpy on the whole array (issue #14).

    DSML_CONFIG=path/to/dsml.yaml python examples/scatter_gather.py
"""

import io

import numpy as np

import dsml


def part_sums(path):
    """A part's count, sum and sum of squares (a dsml.Key arrives as its staged path)."""
    a = np.load(path)
    return a.size, float(a.sum()), float(np.dot(a, a))


if __name__ == "__main__":
    data = np.random.default_rng(0).normal(3.0, 2.0, size=400_000)
    with dsml.connect() as client:
        keys = []
        for i, part in enumerate(np.array_split(data, 8)):
            buf = io.BytesIO()
            np.save(buf, part)
            keys.append(dsml.Key(f"examples/scatter/part{i}.npy"))
            client.upload(buf.getvalue(), keys[-1].key)
        with dsml.Executor(client) as ex:
            sums = list(ex.map(part_sums, keys))
    n, total, squares = (sum(s[i] for s in sums) for i in range(3))
    mean, var = total / n, squares / n - (total / n) ** 2
    print(f"{n} values in {len(sums)} parts: mean {mean:.6f}, variance {var:.6f}")
    assert abs(mean - data.mean()) < 1e-9 and abs(var - data.var()) < 1e-6
    print("the same as numpy over the whole array")
