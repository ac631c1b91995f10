"""The sweep of examples/sweep.py written for Dask distributed on this machine, kept to
compare the two (``benchmarks/functions.py`` prints both line counts)."""

from distributed import Client, LocalCluster


def train(lr: float, epochs: int = 50) -> float:
    """A toy model: gradient descent on (w - 3)^2; returns the final loss."""
    w = 0.0
    for _ in range(epochs):
        w -= lr * 2 * (w - 3)
    return (w - 3) ** 2


if __name__ == "__main__":
    lrs = [0.001, 0.01, 0.1, 0.3, 1.0, 1.5]
    with LocalCluster(n_workers=2, threads_per_worker=2) as cluster, Client(cluster) as client:
        losses = client.gather(client.map(train, lrs))
    for lr, loss in zip(lrs, losses, strict=True):
        print(f"lr={lr:<6} loss={loss:.3g}")
    print(f"best: lr={min(zip(losses, lrs, strict=True))[1]}")
