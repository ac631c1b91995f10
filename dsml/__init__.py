"""dsml: a small distributed storage and job cluster for machine-learning work.

    import dsml
    c = dsml.connect()                  # the cluster of $DSML_CONFIG or etc/dsml.yaml
    c.upload(b"a,b\n1,2\n", "datasets/x.csv")

Importing ``dsml`` stays light: :func:`connect` imports the client when called.  The
``dsml://`` filesystem for fsspec and pandas is :mod:`dsml.fs`.  Functions run as
tasks with ``c.submit(fn, *args)``, ``c.map(fn, items)`` or ``dsml.Executor()``
(:mod:`dsml.client.functions`); ``dsml.Key("datasets/x.npy")`` passes a stored key.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client.cluster import ClusterClient
    from .client.functions import Remote
    from .executor import Executor
    from .fnrun import Key

__version__ = "0.1.0"


def connect(
    config: str | os.PathLike[str] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    identity: str | None = None,
    timeout: float | None = 60.0,
    name: str = "dsml-python",
) -> ClusterClient:
    """A :class:`~dsml.client.ClusterClient` of a cluster, found as the ``dsml``
    command finds it.

    With ``host`` (and ``port``): that master, with ``token`` (else $DSML_TOKEN), no TLS.
    Else the config file ``config``, else $DSML_CONFIG, else ``etc/dsml.yaml``: its
    master's address, its token (``token``, else $DSML_TOKEN, else the config's) and,
    under ``cluster.tls``, the user certificate ``identity`` (else $DSML_IDENTITY,
    else ``admin``) from its pki_dir.  Close it (or use ``with``) when done.
    """
    from .client.cluster import ClusterClient

    if host is not None:
        if port is None:
            raise TypeError("connect(host=...) needs port= too")
        return ClusterClient(
            host, int(port), token or os.environ.get("DSML_TOKEN"), timeout, name
        )
    return ClusterClient.from_config(
        config, token=token, timeout=timeout, name=name, identity=identity
    )


def options(fn: Any, **changes: Any) -> Remote:
    """``fn`` with options for running it on the cluster (the fields of
    :class:`dsml.client.functions.Options`: ``resources``, ``timeout``, ``retries``,
    ``python``, ``env``, ``name``, ``priority``, ``batch_size``):
    ``client.submit(dsml.options(train, resources={"gpus": 1}), lr)``."""
    from .client.functions import options as _options

    return _options(fn, **changes)


def __getattr__(name: str) -> Any:
    if name == "Executor":  # imported when used: ``import dsml`` stays light
        from .executor import Executor

        return Executor
    if name == "Key":  # likewise, and so ``python -m dsml.fnrun`` (a function task)
        from .fnrun import Key  # does not find its module imported before it runs

        return Key
    raise AttributeError(f"module 'dsml' has no attribute {name!r}")


__all__ = ["Executor", "Key", "__version__", "connect", "options"]
