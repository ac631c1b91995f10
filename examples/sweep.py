"""A hyperparameter sweep on a dsml cluster with ``dsml.Executor`` (issue #14).

Run where ``dsml`` finds the cluster ($DSML_CONFIG or etc/dsml.yaml); the workers run
the calls with their own Python (or $DSML_PYTHON), which has dsml and cloudpickle.
"""

import dsml


def train(lr: float, epochs: int = 50) -> float:
    """A toy model: gradient descent on (w - 3)^2; returns the final loss."""
    w = 0.0
    for _ in range(epochs):
        w -= lr * 2 * (w - 3)
    return (w - 3) ** 2


if __name__ == "__main__":
    lrs = [0.001, 0.01, 0.1, 0.3, 1.0, 1.5]
    with dsml.Executor(resources={"cpus": 1}) as ex:
        losses = list(ex.map(train, lrs))
    for lr, loss in zip(lrs, losses, strict=True):
        print(f"lr={lr:<6} loss={loss:.3g}")
    print(f"best: lr={min(zip(losses, lrs, strict=True))[1]}")
